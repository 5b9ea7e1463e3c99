"""Run config: YAML loading, `a.b=c` overrides, and errors that name the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from leaf_ray.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, RunConfig, load_config, parse_args

CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.y*ml")
                 if "cluster" not in p.relative_to(REPO_ROOT / "configs").parts)


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_quickstart_loads_with_its_values():
    cfg = load_config(DEFAULT_CONFIG)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "quickstart"
    assert cfg.teacher.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.student.kind == "teacher_layers" and cfg.student.layers == [0, 2, 4]
    assert [s.path for s in cfg.data.sources] == ["train-text/texts.jsonl.gz"]
    assert cfg.data.sources[0].limit_queries == 6000
    assert cfg.evaluate.dims == [256, 128]
    assert load_config() == cfg  # no path: the default config


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO_ROOT)) for p in CONFIGS])
def test_every_run_config_loads(path):
    assert isinstance(load_config(path), RunConfig)


def test_overrides_nested_list_index_and_yaml_types():
    cfg = load_config(None, ["data.sources.0.limit=5", "evaluate.dims=[64,32]", "train.lr=3e-4",
                             "train.grad_clip=null", "teacher.normalize=false", "name=my-run"])
    assert cfg.data.sources[0].limit == 5
    assert cfg.evaluate.dims == [64, 32]
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip is None
    assert cfg.teacher.normalize is False
    assert cfg.name == "my-run"


def test_override_creates_a_section_absent_from_the_file(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text("name: minimal\n")
    cfg = load_config(path, ["ray.address=auto", "train.max_steps=7"])
    assert cfg.ray.address == "auto" and cfg.train.max_steps == 7
    assert cfg.teacher.model == "sentence-transformers/all-MiniLM-L6-v2"  # defaults fill the rest


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == RunConfig()


@pytest.mark.parametrize("override, key, suggestion", [
    ("train.lrr=1e-4", "train.lrr", "train.lr"),
    ("teacher.modle=x", "teacher.modle", "teacher.model"),
    ("data.sources.0.limt=5", "data.sources.0.limt", "data.sources.0.limit"),
    ("trian.lr=1", "trian", "train"),
])
def test_unknown_key_names_it_and_suggests_the_closest(override, key, suggestion):
    message = _error([override])
    assert f"{key}: unknown key" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_key_in_the_file_itself(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("teacher:\n  batch_sise: 8\n")
    message = _error([], path)
    assert str(path) in message
    assert "teacher.batch_sise: unknown key; did you mean 'teacher.batch_size'?" in message


def test_unknown_key_with_nothing_close_has_no_suggestion():
    message = _error(["train.zzzzzzzz=1"])
    assert "train.zzzzzzzz: unknown key" in message and "did you mean" not in message


@pytest.mark.parametrize("override, key, bad", [
    ("train.lr=fast", "train.lr", "'fast'"),
    ("train.epochs=1.5", "train.epochs", "1.5"),
    ("train.schedule=cosine", "train.schedule", "'cosine'"),
    ("evaluate.quantizations=[int4]", "evaluate.quantizations.0", "'int4'"),
    ("data.sources.0.limit=0", "data.sources.0.limit", "0"),
    ("train.lr={a: 1}", "train.lr", "{'a': 1}"),
])
def test_wrong_type_names_the_key_and_the_value(override, key, bad):
    message = _error([override])
    assert f"{key}: " in message
    assert f"(got {bad})" in message


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _error([], missing)
    assert "not found" in message and str(missing) in message


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1, 2\n  epochs: 3\n")
    message = _error([], path)
    assert "not valid YAML" in message and str(path) in message


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "mapping" in _error([], path)


@pytest.mark.parametrize("override", ["train.lr", "=3", "  =3"])
def test_bad_override_syntax(override):
    message = _error([override])
    assert repr(override) in message and "key.path=value" in message


def test_override_value_that_is_not_yaml():
    message = _error(["evaluate.dims=[64,"])
    assert "evaluate.dims=[64," in message and "not valid YAML" in message


def test_override_into_a_scalar():
    message = _error(["train.lr.x=1"])
    assert "'train.lr' is not a section" in message


@pytest.mark.parametrize("override", ["data.sources.1.limit=5", "data.sources.-1.limit=5",
                                      "data.sources.x.limit=5"])
def test_override_index_past_the_end_of_a_list(override):
    message = _error([override])
    assert "'data.sources' has 1 items" in message
    assert "not a valid index" in message


def test_pretrained_student_needs_a_model():
    message = _error(["student.kind=pretrained"])
    assert "student" in message and "student.model is required" in message
    cfg = load_config(None, ["student.kind=pretrained", "student.model=some/encoder"])
    assert cfg.student.model == "some/encoder"


def test_teacher_pool_range():
    message = _error(["teacher.min_actors=3", "teacher.max_actors=2"])
    assert "teacher" in message and "max_actors (2) < min_actors (3)" in message
    assert load_config(None, ["teacher.min_actors=2", "teacher.max_actors=4"]).teacher.max_actors == 4


def test_every_error_of_a_config_is_listed(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("train:\n  lrr: 1\n  epochs: -1\nevaluate:\n  dimz: [1]\n")
    message = _error([], path)
    assert "train.lrr" in message and "train.epochs" in message and "evaluate.dimz" in message


def test_parse_args_reads_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: from-file\ntrain:\n  epochs: 3\n")
    cfg, args = parse_args(["--config", str(path), "train.epochs=5", "name=cli"])
    assert cfg.name == "cli" and cfg.train.epochs == 5 and args.config == str(path)


def test_data_paths_resolve_against_the_data_root(tmp_path, monkeypatch):
    cfg = load_config(None, [f"data.root={tmp_path}"])
    (tmp_path / "train-text").mkdir()
    (tmp_path / "train-text" / "x.jsonl").write_text("")
    assert cfg.data.resolve_path("train-text/x.jsonl") == tmp_path / "train-text" / "x.jsonl"
    assert cfg.data.resolve_path("/abs/file.jsonl") == Path("/abs/file.jsonl")
    monkeypatch.setenv("LEAF_DATA_DIR", str(tmp_path / "env-root"))
    assert load_config().data.resolved_root() == tmp_path / "env-root"
