"""Errors a user can cause end a job with one `error: <message>` line and exit status 2, not a traceback.

The jobs' `main` runs in this process through `run_job`, exactly as their `__main__` blocks call it; the
unwritable-run-folder test in test_reliability.py runs a job as a real process.
"""

from __future__ import annotations

import shutil

import pytest

from leaf_ray.config import ConfigError
from leaf_ray.errors import USAGE_ERROR, LeafRayError, run_job, user_error
from tests.conftest import DATA_ROOT, build_tiny_bert, load_script

pytestmark = pytest.mark.timeout(300)


def job_error(capsys, script: str, *argv: str) -> str:
    """Run `script` with `argv` as its __main__ block does; the one error line it printed last (Ray's own log
    lines may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_job(load_script(script).main, list(argv))
    assert stopped.value.code == USAGE_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def test_every_error_class_is_a_leaf_ray_error_and_still_its_builtin():
    from leaf_ray.data import DataError
    from leaf_ray.models import ModelNotFoundError
    from leaf_ray.storage import StorageError
    from leaf_ray.teacher.cache import CacheMismatchError

    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (StorageError, ValueError),
                         (ModelNotFoundError, FileNotFoundError), (CacheMismatchError, ValueError)):
        assert issubclass(cls, LeafRayError) and issubclass(cls, builtin)
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = DataError("inner")
    assert str(user_error(wrapped)) == "inner" and user_error(RuntimeError("a bug")) is None


def test_a_bad_key_and_a_bad_type_are_one_line_each(capsys):
    line = job_error(capsys, "jobs/distill.py", "train.lrr=1")
    assert line.startswith("error: invalid config") and line.endswith(
        "train.lrr: unknown key; did you mean 'train.lr'?") and "\n" not in line
    line = job_error(capsys, "jobs/train_student.py", "train.epochs=many")
    assert line.startswith("error: ") and "train.epochs" in line and "\n" not in line


def test_debug_lets_the_traceback_through(monkeypatch):
    with pytest.raises(ConfigError, match="train.lrr"):
        run_job(load_script("jobs/distill.py").main, ["--debug", "train.lrr=1"])
    monkeypatch.setenv("LEAF_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lrr"):
        run_job(load_script("jobs/distill.py").main, ["train.lrr=1"])


def test_a_bug_keeps_its_traceback():
    def broken(argv):
        raise KeyError("not the user's fault")

    with pytest.raises(KeyError):
        run_job(broken, [])


def test_a_missing_data_file_and_an_unwritable_root(capsys, ray_local, tmp_path):
    store = [f"storage.cache_root={tmp_path / 'cache'}", f"storage.runs_root={tmp_path / 'runs'}"]
    line = job_error(capsys, "jobs/embed_teacher.py", "data.sources.0.path=nowhere/texts.jsonl", *store)
    assert "data source 'train-text'" in line and "nowhere/texts.jsonl does not exist" in line
    (tmp_path / "file").write_text("")
    line = job_error(capsys, "jobs/distill.py", f"storage.runs_root={tmp_path / 'file' / 'runs'}")
    assert "storage.runs_root" in line and "is not writable" in line


@pytest.mark.e2e
def test_an_unknown_model_and_a_mismatched_cache(capsys, ray_local, tmp_path):
    """Both raised inside the teacher stage's Ray actors: the line is the remote error's, not Ray's traceback."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(f'{{"id": "t{i}", "text": "text {i}", "kind": "query"}}\n' for i in range(40)))
    model = build_tiny_bert(tmp_path / "teacher", hidden=32)
    run = [f"data.root={DATA_ROOT}", f"data.sources=[{{path: {texts}}}]", "data.validation_size=0",
           f"storage.cache_root={tmp_path / 'cache'}", "teacher.chunk_rows=16", "teacher.num_cpus_per_actor=0.5",
           "teacher.torch_threads=1"]
    line = job_error(capsys, "jobs/embed_teacher.py", *run, "teacher.model=no-such-org/no-such-model")
    assert line.startswith("error: model 'no-such-org/no-such-model' not found. Tried:")

    load_script("jobs/embed_teacher.py").main([*run, f"teacher.model={model}"])
    next((tmp_path / "cache").rglob("part-00000.parquet")).unlink()  # a missing part: the teacher runs again
    shutil.rmtree(tmp_path / "teacher")
    assert build_tiny_bert(tmp_path / "teacher", hidden=48) == model  # the same path, now 48-d weights
    line = job_error(capsys, "jobs/embed_teacher.py", *run, f"teacher.model={model}")
    assert "32-d" in line and "48-d" in line
