"""Cluster configs offline: validate Ray launcher YAMLs and KubeRay RayJob manifests, and run a local
autoscaling simulation (Ray's fake multi-node provider) that starts and stops only its own processes.

- `validate_launcher_config(path)`: the checks `ray up` makes before touching a cloud (defaults merged,
  Ray's own JSON schema, node types), plus the project's rules (see `launcher_problems`).
- `rayjob_problems(manifest)`: no RayJob CRD schema ships on PyPI, so the fields this project relies on
  are checked structurally.
- `LocalAutoscalingCluster`: `ray start --head --autoscaling-config=<fake_multinode config>` on free
  ports, in its own temp dir and its own process group; `stop()` ends that group and nothing else
  (never `ray stop`, which ends every Ray process on the machine).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from leaf_ray.errors import LeafRayError
from leaf_ray.runtime import free_ports

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "configs" / "cluster"


class ClusterConfigError(LeafRayError, ValueError):
    """A launcher YAML or KubeRay manifest that would fail (or misbehave) on a real cluster."""


# -- Ray cluster launcher YAMLs (`ray up`) ---------------------------------------------------------------

def load_yaml(path: str | Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def validate_launcher_config(config: str | Path | dict) -> dict:
    """Validate a cluster launcher config offline, as `ray up` does before it calls the cloud.

    Merges the provider's defaults (`prepare_config`), validates against Ray's `ray-schema.json`
    (`validate_config`), then applies `launcher_problems`. Returns the prepared config; raises
    ClusterConfigError (schema and project rules) with every problem found.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(config) if not isinstance(config, dict) else copy.deepcopy(config)
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{config}: a launcher config must be a mapping")
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "<root>"
        raise ClusterConfigError(f"{config}: Ray schema: {where}: {exc.message}") from None
    except (ValueError, RuntimeError, AssertionError, KeyError) as exc:
        raise ClusterConfigError(f"{config}: {exc}") from None
    problems = launcher_problems(prepared)
    if problems:
        raise ClusterConfigError(f"{config}:\n  " + "\n  ".join(problems))
    return prepared


def launcher_problems(cfg: dict) -> list[str]:
    """The project's rules for a cloud launcher config (empty list: fine).

    A CPU-only head that takes no work (CPU 0); every worker type scales from zero; some worker type
    offers GPUs; the docker image is a `rayproject/ray:<installed ray>-...-gpu` image; the project is
    installed on every node.
    """
    import ray

    problems = []
    types = cfg.get("available_node_types", {})
    head = types.get(cfg.get("head_node_type"), {})
    if head.get("resources", {}).get("CPU") != 0:
        problems.append("head node type must declare resources CPU: 0 (no tasks or actors on the head)")
    if head.get("resources", {}).get("GPU", 0):
        problems.append("head node type must not offer GPUs")
    workers = {name: t for name, t in types.items() if name != cfg.get("head_node_type")}
    for name, t in workers.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"worker type {name}: min_workers must be 0 (scale from zero)")
    if not any(t.get("resources", {}).get("GPU", 0) > 0 for t in workers.values()):
        problems.append("no worker type offers GPUs")
    image = (cfg.get("docker") or {}).get("image", "")
    wanted = rf"^rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(cu\d+|gpu)$"
    if not re.match(wanted, image):
        problems.append(f"docker.image {image!r} is not a rayproject/ray:{ray.__version__}-py3XX-gpu image")
    commands = " ".join(cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", []))
    if "pip install" not in commands or "leaf-ray" not in commands:
        problems.append("setup_commands must pip install the project (leaf-ray) on every node")
    return problems


def gpu_worker_types(cfg: dict) -> dict[str, dict]:
    """Worker node types that offer GPUs, by name."""
    return {name: t for name, t in cfg.get("available_node_types", {}).items()
            if name != cfg.get("head_node_type") and t.get("resources", {}).get("GPU", 0) > 0}


# -- KubeRay RayJob manifests ----------------------------------------------------------------------------

def rayjob_problems(manifest: dict) -> list[str]:
    """Structural checks of a `ray.io/v1` RayJob (empty list: fine).

    What the project relies on: an autoscaling cluster spec (in-tree autoscaler, v2), a head that
    takes no work, GPU worker groups that scale from zero with `nvidia.com/gpu` limits, an entrypoint
    that runs a job script with a config, and the cluster torn down when the job ends.
    """
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    need(manifest.get("apiVersion") == "ray.io/v1", "apiVersion must be ray.io/v1")
    need(manifest.get("kind") == "RayJob", "kind must be RayJob")
    need(bool((manifest.get("metadata") or {}).get("name")), "metadata.name is required")
    spec = manifest.get("spec") or {}
    entry = spec.get("entrypoint", "")
    need(bool(re.match(r"^python\s+jobs/\w+\.py\s+--config\s+configs/\S+\.yaml", entry)),
         f"spec.entrypoint must run `python jobs/<job>.py --config configs/<file>.yaml` (got {entry!r})")
    need(spec.get("shutdownAfterJobFinishes") is True, "spec.shutdownAfterJobFinishes must be true")
    cluster = spec.get("rayClusterSpec") or {}
    need(bool(cluster), "spec.rayClusterSpec is required")
    need(cluster.get("enableInTreeAutoscaling") is True, "rayClusterSpec.enableInTreeAutoscaling must be true")
    opts = cluster.get("autoscalerOptions") or {}
    need(opts.get("version") == "v2", "rayClusterSpec.autoscalerOptions.version must be v2")
    head = cluster.get("headGroupSpec") or {}
    need(str((head.get("rayStartParams") or {}).get("num-cpus")) == "0",
         "headGroupSpec.rayStartParams.num-cpus must be \"0\"")
    head_env = {e.get("name") for c in _containers(head) for e in c.get("env", [])}
    need("RAY_enable_autoscaler_v2" not in head_env,
         "do not set RAY_enable_autoscaler_v2 on the head when autoscalerOptions.version is set "
         "(KubeRay rejects both)")
    groups = cluster.get("workerGroupSpecs") or []
    need(bool(groups), "rayClusterSpec.workerGroupSpecs is required")
    gpu_groups = 0
    for i, group in enumerate(groups):
        name = group.get("groupName") or f"#{i}"
        need(bool(group.get("groupName")), f"worker group {name}: groupName is required")
        need(group.get("minReplicas") == 0, f"worker group {name}: minReplicas must be 0")
        need(isinstance(group.get("maxReplicas"), int) and group["maxReplicas"] >= 1,
             f"worker group {name}: maxReplicas must be an integer >= 1")
        need(group.get("replicas", 0) == 0, f"worker group {name}: replicas must start at 0")
        containers = _containers(group)
        need(bool(containers), f"worker group {name}: template.spec.containers is required")
        for c in containers:
            need(bool(c.get("image")), f"worker group {name}: container {c.get('name')} has no image")
        gpus = [_gpu_limit(c) for c in containers]
        if any(gpus):
            gpu_groups += 1
            for c, n in zip(containers, gpus):
                requests = (c.get("resources") or {}).get("requests") or {}
                if n and "nvidia.com/gpu" in requests:
                    need(str(requests["nvidia.com/gpu"]) == str((c["resources"]["limits"])["nvidia.com/gpu"]),
                         f"worker group {name}: nvidia.com/gpu request and limit differ")
    need(gpu_groups > 0, "no worker group has nvidia.com/gpu limits")
    return problems


def _containers(group: dict) -> list[dict]:
    return (((group.get("template") or {}).get("spec")) or {}).get("containers") or []


def _gpu_limit(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    try:
        return int(limits.get("nvidia.com/gpu", 0))
    except (TypeError, ValueError):
        return 0


# -- A local autoscaling cluster (fake multi-node provider) ----------------------------------------------

class LocalAutoscalingCluster:
    """A fake multi-node autoscaling cluster on this machine, isolated from other Ray instances.

    The head runs `ray start --head --block` with RAY_FAKE_CLUSTER=1 in a new session (process group),
    on free ports and its own short temp dir; the autoscaler's fake provider starts each worker "node"
    as extra raylets on this machine, inside that same process group. `stop()` signals the group (TERM,
    then KILL), then kills any process still naming the temp dir, by pid. Nothing else is touched.

    `config`: a fake_multinode autoscaling config (dict or YAML path); its provider's gcs_address is set
    to this head. `head_cpus`/`head_gpus` are the head's resources (`ray start` flags). `auth`: "token"
    (Ray 2.60's token auth, as the cloud configs use it: a fresh token in the temp dir, passed to the head
    and to drivers through RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH in `client_env()`) or "disabled".
    """

    def __init__(self, config: dict | str | Path, head_cpus: float = 1, head_gpus: int = 0,
                 object_store_memory: int = 150 * 1024 ** 2, env: dict[str, str] | None = None,
                 update_interval_s: int = 1, auth: str = "token"):
        if auth not in ("token", "disabled"):
            raise ValueError(f"auth must be 'token' or 'disabled', not {auth!r}")
        self.auth = auth
        self.config = copy.deepcopy(config) if isinstance(config, dict) else load_yaml(config)
        if self.config.get("provider", {}).get("type") != "fake_multinode":
            raise ClusterConfigError("LocalAutoscalingCluster needs a provider of type fake_multinode")
        self.head_cpus, self.head_gpus = head_cpus, head_gpus
        self.object_store_memory = object_store_memory
        self.extra_env = dict(env or {})
        self.update_interval_s = update_interval_s
        self.temp_dir: Path | None = None
        self.address: str | None = None
        self.process: subprocess.Popen | None = None
        self._log = None

    def client_env(self) -> dict[str, str]:
        """Environment for the head and for drivers that join it: the same auth mode and token on both sides."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env["RAY_AUTH_MODE"] = self.auth
        if self.auth == "token":
            if self.temp_dir is None:
                raise RuntimeError("start the cluster first: its token is made at start")
            env["RAY_AUTH_TOKEN_PATH"] = str(self.temp_dir / "auth_token")
        else:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 90) -> str:
        from ray._private.services import get_node_ip_address

        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lrfake-", dir="/tmp"))
        ip = get_node_ip_address()
        port, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(8)
        self.address = f"{ip}:{port}"
        self.config.setdefault("provider", {})["gcs_address"] = self.address
        if self.auth == "token":
            from ray._private.authentication.authentication_token_generator import (
                generate_new_authentication_token,
            )

            token = self.temp_dir / "auth_token"
            token.write_text(generate_new_authentication_token())
            token.chmod(0o600)
        config_path = self.temp_dir / "autoscaling.yaml"
        config_path.write_text(json.dumps(self.config))
        ray_cli = Path(sys.executable).parent / "ray"
        cmd = [str(ray_cli if ray_cli.exists() else shutil.which("ray")), "start", "--head", "--block",
               f"--port={port}", f"--num-cpus={self.head_cpus}", f"--num-gpus={self.head_gpus}",
               f"--object-store-memory={self.object_store_memory}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={config_path}", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0"]
        env = self.client_env() | {"RAY_FAKE_CLUSTER": "1",
                                   "AUTOSCALER_UPDATE_INTERVAL_S": str(self.update_interval_s)}
        self._log = open(self.temp_dir / "head.log", "w")
        self.process = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                log = self.log_text()
                self.stop()
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{log[-3000:]}")
            if "Ray runtime started" in self.log_text():
                return self.address
            time.sleep(0.5)
        log = self.log_text()
        self.stop()
        raise TimeoutError(f"the fake cluster head did not start in {timeout_s:.0f}s:\n{log[-3000:]}")

    def log_text(self) -> str:
        if self.temp_dir is None or not (self.temp_dir / "head.log").exists():
            return ""
        return (self.temp_dir / "head.log").read_text(errors="replace")

    def own_pids(self) -> list[int]:
        """Live processes of this cluster: its process group, plus any process naming its temp dir."""
        pids = set()
        pgid = self.process.pid if self.process else None
        marker = str(self.temp_dir).encode() if self.temp_dir else None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if pgid is not None and os.getpgid(int(entry.name)) == pgid:
                    pids.add(int(entry.name))
                    continue
                if marker and marker in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
        return sorted(pids)

    def stop(self, grace_s: float = 10) -> None:
        if self.process is not None:
            pgid = self.process.pid  # session leader: its pid is the group id
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
                deadline = time.time() + wait
                while time.time() < deadline and self.own_pids():
                    time.sleep(0.25)
                if not self.own_pids():
                    break
            for pid in self.own_pids():  # strays that left the group but still name our temp dir
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalAutoscalingCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
