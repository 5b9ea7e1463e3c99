"""Cluster configs (offline) and an autoscaling simulation on one machine.

- Every launcher YAML in configs/cluster/ passes Ray's own checks (`prepare_config` + `ray-schema.json`)
  and the project's rules; the KubeRay RayJob has the fields the project relies on.
- The slow test runs the teacher stage on a fake multi-node cluster whose head has no GPU: its
  `num_gpus: 1` actors make the autoscaler add fake GPU nodes, which are removed once idle. Its figures go to
  bench/results/autoscaling_sim.json when LEAF_RECORD_BENCH=1 is set, else to the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from leaf_ray.cluster import (
    CLUSTER_DIR,
    ClusterConfigError,
    LocalAutoscalingCluster,
    gpu_worker_types,
    launcher_problems,
    load_yaml,
    rayjob_problems,
    validate_launcher_config,
)
from leaf_ray.config import REPO_ROOT, TeacherConfig, load_config
from leaf_ray.teacher.chunks import chunk_count
from tests.conftest import REPO

LAUNCHERS = ["aws.yaml", "gcp.yaml"]
RESULTS = REPO / "bench" / "results" / "autoscaling_sim.json"  # refreshed only with LEAF_RECORD_BENCH=1


# -- launcher YAMLs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_schema_and_project_rules(name):
    prepared = validate_launcher_config(CLUSTER_DIR / name)
    raw = load_yaml(CLUSTER_DIR / name)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head.get("max_workers", 0) == 0
    gpu = gpu_worker_types(prepared)
    # a GPU pool for teacher actors (L4 / A10G, spot) and one for training (A100 / H100, on demand)
    teacher = [t for t in gpu.values() if any(k in t["resources"] for k in ("accelerator_type:L4",
                                                                            "accelerator_type:A10G"))]
    train = [t for t in gpu.values() if any(k in t["resources"] for k in ("accelerator_type:A100",
                                                                          "accelerator_type:H100"))]
    assert teacher and train, f"{name}: need an L4/A10G teacher pool and an A100/H100 training pool"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu.values())
    assert 0 < raw["idle_timeout_minutes"] <= 30
    assert raw["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    setup = " ".join(raw["setup_commands"])
    assert "torch==2.13.0" in setup and "leaf-ray" in setup
    # spot for the teacher pool only: its work is resumable chunk by chunk; training is on demand
    if name == "aws.yaml":
        assert all(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in teacher)
        assert all("InstanceMarketOptions" not in t["node_config"] for t in train)
        assert {t["node_config"]["InstanceType"].split(".")[0] for t in teacher} <= {"g6", "g5"}
        assert {t["node_config"]["InstanceType"].split(".")[0] for t in train} <= {"p4d", "p4de", "p5"}
    else:
        assert all(t["node_config"]["scheduling"]["provisioningModel"] == "SPOT" for t in teacher)
        assert all(t["node_config"]["scheduling"].get("provisioningModel", "STANDARD") == "STANDARD" for t in train)
        assert all(t["node_config"]["machineType"].startswith("g2-standard") for t in teacher)
        assert all(t["node_config"]["machineType"].startswith(("a2-", "a3-")) for t in train)
        assert all(t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE" for t in gpu.values())


def test_launcher_validation_reports_broken_configs():
    cfg = load_yaml(CLUSTER_DIR / "aws.yaml")
    cfg["available_node_types"]["teacher_l4"]["resources"]["GPU"] = 0.5  # Ray's schema: integers only
    with pytest.raises(ClusterConfigError, match="Ray schema"):
        validate_launcher_config(cfg)
    cfg = load_yaml(CLUSTER_DIR / "aws.yaml")
    cfg["available_node_types"]["ray.head.default"]["resources"]["CPU"] = 4
    cfg["available_node_types"]["teacher_l4"]["min_workers"] = 1
    cfg["docker"]["image"] = "rayproject/ray-ml:2.49.0-gpu"
    with pytest.raises(ClusterConfigError) as err:
        validate_launcher_config(cfg)
    message = str(err.value)
    assert "CPU: 0" in message and "min_workers must be 0" in message and "docker.image" in message


def test_fake_multinode_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    cfg = load_yaml(CLUSTER_DIR / "local-fake-gpu.yaml")
    validate_config(cfg)  # the v1 autoscaler validates it as is (no defaults are merged for this provider)
    worker = cfg["available_node_types"]["fake.gpu.teacher"]
    assert worker["resources"]["GPU"] == 1 and worker["min_workers"] == 0
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["idle_timeout_minutes"] < 1
    assert launcher_problems(cfg)  # not a cloud config: the cloud rules flag it


# -- KubeRay ----------------------------------------------------------------------------------------------

def test_kuberay_rayjob_has_required_fields_gpu_limits_and_scales_from_zero():
    docs = [d for d in yaml.safe_load_all((CLUSTER_DIR / "kuberay-rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert rayjob_problems(job) == []
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/distill.py --config configs/leaf-ir-gpu.yaml")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(":0.1.0-ray2.60.0-py311-gpu")  # the project image:
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()  # built on Ray's GPU image, with CUDA torch
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile and '"torch==2.13.0"' in dockerfile
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["autoscalerOptions"]["version"] == "v2"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values()
                  if any("nvidia.com/gpu" in (c["resources"].get("limits") or {})
                         for c in g["template"]["spec"]["containers"])]
    assert len(gpu_groups) >= 2 and all(g["minReplicas"] == 0 for g in groups.values())
    # the config the entrypoint names exists and loads
    assert load_config(REPO_ROOT / "configs" / "leaf-ir-gpu.yaml").teacher.num_gpus_per_actor == 1


def test_rayjob_checks_catch_missing_fields():
    job = next(d for d in yaml.safe_load_all((CLUSTER_DIR / "kuberay-rayjob.yaml").read_text())
               if d and d.get("kind") == "RayJob")
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 1
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            c["resources"].get("limits", {}).pop("nvidia.com/gpu", None)
            c["resources"].get("requests", {}).pop("nvidia.com/gpu", None)
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault(
        "env", []).append({"name": "RAY_enable_autoscaler_v2", "value": "1"})
    problems = "\n".join(rayjob_problems(job))
    assert "shutdownAfterJobFinishes" in problems and "minReplicas must be 0" in problems
    assert "nvidia.com/gpu" in problems and "RAY_enable_autoscaler_v2" in problems


def test_gpu_run_config_loads():
    cfg = load_config(REPO_ROOT / "configs" / "leaf-ir-gpu.yaml")
    t = cfg.teacher
    assert t.model == "sentence-transformers/all-mpnet-base-v2" and t.dtype == "float16"
    assert (t.min_actors, t.max_actors, t.num_gpus_per_actor) == (1, 8, 1)
    assert cfg.student.kind == "pretrained" and cfg.student.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert (cfg.train.num_workers, cfg.train.gpus_per_worker) == (2, 1)
    assert cfg.ray.address is None and cfg.ray.num_cpus is None  # joins the cluster it is submitted to
    assert t.accelerator_type == "L4"  # teacher actors stay on the L4 pool of the cluster configs
    assert cfg.train.accelerator_type == "A100"  # and DDP workers on the A100 pool


def _pools(name: str) -> dict[str, tuple[set[str], int]]:
    """Worker pool -> (accelerator types it advertises to Ray's autoscaler, most GPUs it can bring)."""
    if name.endswith("rayjob.yaml"):
        job = next(d for d in yaml.safe_load_all((CLUSTER_DIR / name).read_text()) if d and d.get("kind") == "RayJob")
        pools = {}
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            advertised = json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))  # a quoted JSON map
            gpus = sum(int((c["resources"].get("limits") or {}).get("nvidia.com/gpu", 0))
                       for c in g["template"]["spec"]["containers"])
            pools[g["groupName"]] = (advertised, gpus * g["maxReplicas"])
    else:
        pools = {t: (spec["resources"], spec["resources"].get("GPU", 0) * spec.get("max_workers", 0))
                 for t, spec in load_yaml(CLUSTER_DIR / name)["available_node_types"].items()}
    return {pool: ({k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}, gpus)
            for pool, (resources, gpus) in pools.items()}


@pytest.mark.parametrize("name", [*LAUNCHERS, "kuberay-rayjob.yaml"])
def test_gpu_run_config_accelerator_types_are_served_by_separate_pools(name):
    """teacher.accelerator_type and train.accelerator_type of the GPU run config each name a pool the cluster
    config advertises (so the autoscaler starts the right machines), and the training pool has the GPUs."""
    cfg = load_config(REPO_ROOT / "configs" / "leaf-ir-gpu.yaml")
    pools = _pools(name)
    teacher = {p for p, (types, _) in pools.items() if cfg.teacher.accelerator_type in types}
    train = {p for p, (types, _) in pools.items() if cfg.train.accelerator_type in types}
    assert teacher and train and not teacher & train, pools
    assert sum(pools[p][1] for p in train) >= cfg.train.num_workers * cfg.train.gpus_per_worker


def test_teacher_placement_options_reach_map_batches_only_when_set():
    from ray.data import DataContext

    from leaf_ray.models import ModelStore
    from leaf_ray.teacher.stage import embed_dataset

    class Recorder:  # stands in for a Ray Dataset: records what the stage asks of map_batches
        context = DataContext()

        def map_batches(self, fn, **kwargs):
            self.kwargs = kwargs
            return self

    pinned = TeacherConfig(num_gpus_per_actor=1, accelerator_type="L4", resources_per_actor={"teacher_pool": 1})
    recorded = embed_dataset(Recorder(), pinned, ModelStore(Path("/unused")))
    kwargs = recorded.kwargs
    assert recorded.context.raise_original_map_exception  # a teacher's own error reaches the driver
    assert kwargs["accelerator_type"] == "L4" and kwargs["resources"] == {"teacher_pool": 1}
    assert kwargs["num_gpus"] == 1
    kwargs = embed_dataset(Recorder(), TeacherConfig(), ModelStore(Path("/unused"))).kwargs
    assert "accelerator_type" not in kwargs and "resources" not in kwargs


# -- autoscaling simulation --------------------------------------------------------------------------------

def _kill_a_gpu_node(ray, cache_root: Path, after_parts: int, stop: threading.Event, killed: dict) -> None:
    """Once `after_parts` cache parts exist, SIGKILL every daemon of one live fake GPU node (its raylet and
    agents; its actors and the objects it held die with them), as a reclaimed spot instance goes."""
    import psutil

    while not stop.is_set() and len(list(cache_root.rglob("part-*.parquet"))) < after_parts:
        time.sleep(0.1)
    gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("GPU", 0) > 0]
    if stop.is_set() or not gpu_nodes:
        return
    flags = {f"--node_id={gpu_nodes[0]}", f"--node-id={gpu_nodes[0]}"}
    daemons = [p for p in psutil.process_iter(["cmdline"]) if flags & set(p.info["cmdline"] or [])]
    for process in daemons:
        process.kill()
    killed.update(node=gpu_nodes[0], processes=len(daemons),
                  parts_before=len(list(cache_root.rglob("part-*.parquet"))))


def _drive(spec_json: str) -> None:
    """Driver process: join the fake cluster, run the teacher stage, watch nodes come and go (and kill one
    mid-stage when the spec says `kill_gpu_node_after_parts`); print JSON."""
    import numpy as np
    import pyarrow as pa
    import ray

    from leaf_ray.teacher import build_cache
    from tests.conftest import random_texts

    spec = json.loads(spec_json)
    ray.init(address=spec["address"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    nodes: dict[str, dict] = {}
    gpus_in_use = [0.0]  # most GPUs held at once: the teacher actors hold them
    stop = threading.Event()
    t0 = time.time()

    def watch():
        while not stop.is_set():
            now = round(time.time() - t0, 2)
            for n in ray.nodes():
                rec = nodes.setdefault(n["NodeID"], {"gpu": n.get("Resources", {}).get("GPU", 0),
                                                     "first_alive_s": None, "dead_s": None})
                if n["Alive"] and rec["first_alive_s"] is None:
                    rec["first_alive_s"] = now
                if not n["Alive"] and rec["dead_s"] is None:
                    rec["dead_s"] = now
            held = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
            gpus_in_use[0] = max(gpus_in_use[0], held)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    killed: dict = {}
    if spec.get("kill_gpu_node_after_parts"):
        threading.Thread(target=_kill_a_gpu_node, daemon=True, args=(
            ray, Path(spec["cache_root"]), spec["kill_gpu_node_after_parts"], stop, killed)).start()
    time.sleep(0.5)
    n = spec["rows"]
    table = pa.table({"id": [f"t{i}" for i in range(n)], "text": random_texts(n, 7),
                      "kind": ["query" if i % 3 else "document" for i in range(n)]})
    teacher = TeacherConfig(**spec["teacher"])
    stage_start = round(time.time() - t0, 2)
    cache = build_cache(table, teacher, spec["cache_root"])
    stage_end = round(time.time() - t0, 2)
    ids = cache.read_table().column("id").to_pylist()
    vectors = cache.embeddings()
    gpu_nodes = lambda: {k: v for k, v in nodes.items() if v["gpu"] > 0}  # noqa: E731
    deadline = time.time() + spec["scale_down_timeout_s"]
    while time.time() < deadline and any(v["dead_s"] is None for v in gpu_nodes().values()):
        time.sleep(0.5)
    time.sleep(0.5)
    stop.set()
    watcher.join()
    gpu = gpu_nodes()
    up = [v["first_alive_s"] for v in gpu.values() if v["first_alive_s"] is not None]
    down = [v["dead_s"] for v in gpu.values() if v["dead_s"] is not None]
    out = {
        "rows": n, "rows_in_cache": len(ids), "unique_ids": len(set(ids)), "ids_match": sorted(ids) == sorted(
            table.column("id").to_pylist()), "finite": bool(np.isfinite(vectors).all()), "dim": int(vectors.shape[1]),
        "initial_nodes": sum(1 for v in nodes.values() if v["first_alive_s"] is not None and v["first_alive_s"] < 1
                             and v["gpu"] == 0),
        "gpu_nodes_launched": len(gpu), "gpu_nodes_removed": len(down), "max_gpus_in_use": gpus_in_use[0],
        "max_gpu_nodes_alive": max((sum(1 for v in gpu.values() if v["first_alive_s"] is not None
                                        and v["first_alive_s"] <= t and (v["dead_s"] is None or v["dead_s"] > t))
                                    for t in up), default=0),
        "stage_start_s": stage_start, "stage_end_s": stage_end, "stage_seconds": round(stage_end - stage_start, 2),
        "scale_up_first_node_s": round(min(up) - stage_start, 2) if up else None,
        "scale_up_all_nodes_s": round(max(up) - stage_start, 2) if up else None,
        "scale_down_after_stage_s": round(max(down) - stage_end, 2) if down and len(down) == len(gpu) else None,
        "last_run": cache.manifest.get("last_run"), "killed": killed,
        "parts": len(list(Path(spec["cache_root"]).rglob("part-*.parquet"))),
    }
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()


def _teacher_stage_on_a_fake_cluster(config: dict, tiny_teacher: Path, tmp_path: Path, rows: int, actors: int,
                                     **spec) -> dict:
    """The teacher stage of `rows` texts on `actors` one-GPU actors, driven in a process joined to a fresh fake
    autoscaling cluster (stopped after): the driver's figures plus the harness's."""
    teacher = dict(model=str(tiny_teacher), max_length=64, batch_size=16, chunk_rows=50, torch_threads=1,
                   min_actors=actors, max_actors=actors, num_gpus_per_actor=1, num_cpus_per_actor=0.5)
    started = time.time()
    cluster = LocalAutoscalingCluster(config, head_cpus=1, head_gpus=0)
    try:
        address = cluster.start()
        head_up_s = round(time.time() - started, 2)
        spec = {"address": address, "rows": rows, "teacher": teacher, "cache_root": str(tmp_path / "cache"),
                "scale_down_timeout_s": 90, **spec}
        proc = subprocess.run([sys.executable, "-c", "import sys, tests.test_cluster as t; t._drive(sys.argv[1])",
                               json.dumps(spec)], cwd=REPO, env=cluster.client_env(), capture_output=True,
                              text=True, timeout=200)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                                f"{proc.stderr[-5000:]}\nhead log:\n{cluster.log_text()[-2000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
    finally:
        cluster.stop()
    leftovers = cluster.own_pids()
    return result | {"head_start_s": head_up_s, "total_seconds": round(time.time() - started, 2),
                     "actors": actors, "idle_timeout_minutes": config["idle_timeout_minutes"],
                     "autoscaler_update_interval_s": cluster.update_interval_s, "auth_mode": cluster.auth,
                     "processes_left_after_stop": len(leftovers)}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.e2e
def test_autoscaler_adds_fake_gpu_nodes_for_teacher_actors_and_removes_them(tiny_teacher, tmp_path):
    config = load_yaml(CLUSTER_DIR / "local-fake-gpu.yaml")
    rows = 300
    result = _teacher_stage_on_a_fake_cluster(config, tiny_teacher, tmp_path, rows, actors=2)
    print(json.dumps(result, indent=1))
    record = RESULTS if os.environ.get("LEAF_RECORD_BENCH") == "1" else tmp_path / RESULTS.name  # checkout stays clean
    record.write_text(json.dumps(result, indent=1) + "\n")

    assert result["rows_in_cache"] == rows and result["unique_ids"] == rows and result["ids_match"]
    assert result["finite"] and result["dim"] == 32
    assert result["last_run"]["rows_computed"] == rows
    assert result["gpu_nodes_launched"] >= 1, "the autoscaler launched no GPU node"
    assert result["gpu_nodes_launched"] <= config["max_workers"]
    assert result["max_gpus_in_use"] >= 1, "no actor ever held a (fake) GPU"
    assert result["gpu_nodes_removed"] == result["gpu_nodes_launched"], "idle GPU nodes were not removed"
    assert result["processes_left_after_stop"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_a_gpu_node_killed_mid_stage_loses_and_duplicates_no_row(tiny_teacher, tmp_path):
    """One of two fake GPU nodes is killed once 2 of 16 parts are written: its chunks are redone on a node the
    autoscaler brings up instead, and the cache holds every id exactly once."""
    config = load_yaml(CLUSTER_DIR / "local-fake-gpu.yaml")
    rows = 600
    result = _teacher_stage_on_a_fake_cluster(config, tiny_teacher, tmp_path, rows, actors=2,
                                              kill_gpu_node_after_parts=2, scale_down_timeout_s=0)
    print(json.dumps(result, indent=1))
    killed = result["killed"]
    assert killed.get("processes", 0) >= 1 and killed["parts_before"] < result["parts"], "no node died mid-stage"
    assert result["rows_in_cache"] == rows and result["unique_ids"] == rows and result["ids_match"]
    assert result["finite"] and result["parts"] == chunk_count(rows, 50) == 16
    assert result["processes_left_after_stop"] == 0
