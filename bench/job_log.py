"""What a person reads of a job run with `ray job submit`: the log's lines per minute of run, and how many of them
are Ray Data's progress blocks or repeats of an earlier line. A head is started here on free ports (its own temp
dir and process group, stopped after), the job is submitted from `--working-dir` (this checkout, or another one
to compare with), and the log `ray job submit` streams is saved and counted.

    python bench/job_log.py --label after [-- key.path=value ...]
    python bench/job_log.py --label before --working-dir /path/to/older/checkout

Each label's figures go into one JSON (default bench/results/job-log.json), so two checkouts measured one after
the other sit side by side; the job's outputs and teacher cache are fresh for every run (a cold cache each time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from leaf_ray.runtime import free_ports

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# The quickstart shrunk to minutes (same stages, fewer texts, one epoch, a slice of SciFact).
SHORT_RUN = ["data.sources=[{path: train-text/texts.jsonl.gz, name: train-text, limit_queries: 1200, "
             "limit_documents: 300}]", "data.validation_size=100", "train.epochs=1", "evaluate.max_corpus=1000",
             "evaluate.max_queries=100", "evaluate.quantizations=[float32]"]
# Lines of Ray Data's progress display as it prints without a terminal (its operator and dataset status rows).
# A dataset's one-line "execution finished" notice is not a progress row.
RAY_DATA_PROGRESS = re.compile(r"Running Dataset|Dataset .* progress|^\s*[-+]\s*\w.*: (Tasks|Queued|Active|"
                               r"\d+ active)|Tasks: \d|Active & requested resources|object store: ")
WORKER_PREFIX = re.compile(r"^\(\S+ pid=\d+(, ip=[\d.]+)?\)\s*")


def head_env() -> dict[str, str]:
    """The environment a local head and its `ray job submit` share: no token auth, the venv's `ray` on PATH."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def local_head(num_cpus: int = 2, timeout_s: float = 120):
    """A Ray head with a job server on 127.0.0.1, in its own process group and temp dir, ended on exit (only this
    group: `ray stop` would end every Ray process on the machine). Yields the job server's address."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    dashboard, gcs, agent = free_ports(3)
    temp_dir = Path(tempfile.mkdtemp(prefix="lrjob-", dir="/tmp"))  # short: Ray's socket paths are limited
    log_path = temp_dir / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                 f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                 f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                                 # the job agent's default port may be held by another Ray on this machine
                                 f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
                                env=head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while "Ray runtime started" not in log_path.read_text():
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the Ray head did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{dashboard}"
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, working_dir: Path, entrypoint: list[str], env_vars: dict[str, str], log: Path,
           timeout_s: float = 3600) -> int:
    """`ray job submit` of `entrypoint` from `working_dir`, its streamed log written to `log`; the exit status.
    A head's job agent comes up some time after the head (much after on a loaded machine): until it does, the
    submission is retried."""
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir",
               str(working_dir), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint]
    deadline = time.time() + 120
    while True:
        with log.open("w") as out:
            status = subprocess.run(command, env=head_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                                    cwd=working_dir).returncode
        if "No available agent to submit job" not in log.read_text() or time.time() > deadline:
            return status
        time.sleep(2)


def count_lines(text: str, minutes: float) -> dict:
    """Lines of a job's log, per minute of run, and which are Ray Data progress rows or repeat an earlier line
    (the same text printed by a worker and again by the driver counts as a repeat)."""
    lines = [line for line in text.splitlines() if line.strip()]
    seen, repeats = set(), 0
    for line in lines:
        bare = WORKER_PREFIX.sub("", line).strip()
        repeats += bare in seen
        seen.add(bare)
    progress = sum(bool(RAY_DATA_PROGRESS.search(line)) for line in lines)
    return {"lines": len(lines), "lines_per_minute": len(lines) / minutes, "ray_data_progress_lines": progress,
            "repeated_lines": repeats, "minutes": minutes}


def commit_of(working_dir: Path) -> str | None:
    found = subprocess.run(["git", "-C", str(working_dir), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True)
    return found.stdout.strip() or None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="this measurement's name in the JSON (e.g. before, after)")
    parser.add_argument("--working-dir", default=str(REPO), help="checkout whose jobs/distill.py is submitted")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="job config, relative to the checkout")
    parser.add_argument("--full", action="store_true", help="the config as it is, not shrunk to a short run")
    parser.add_argument("--data-dir", default=os.environ.get("LEAF_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(RESULTS / "job-log.json"))
    parser.add_argument("overrides", nargs="*", help="more key.path=value overrides for the job")
    args = parser.parse_args(argv)
    working_dir = Path(args.working_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="leaf-job-log-"))
    overrides = [*([] if args.full else SHORT_RUN), f"storage.runs_root={work}/runs",
                 f"storage.cache_root={work}/cache", *args.overrides]
    entrypoint = ["python", "jobs/distill.py", "--config", args.config, "name=job-log", *overrides]
    env_vars = {"LEAF_DATA_DIR": str(Path(args.data_dir).resolve()), "HF_HUB_OFFLINE": "1"}
    log = work / "job.log"
    with local_head() as address:
        started = time.monotonic()
        status = submit(address, working_dir, entrypoint, env_vars, log)
        minutes = (time.monotonic() - started) / 60
    if status != 0:
        raise SystemExit(f"the job failed (exit {status}); its log: {log}")
    result = {"commit": commit_of(working_dir), "command": " ".join(entrypoint), "log": str(log),
              **count_lines(log.read_text(errors="replace"), minutes)}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"benchmark": "job_log", "runs": {}}
    results["runs"][args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({args.label: result}, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
