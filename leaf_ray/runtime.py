"""Connecting to Ray: a running cluster when one is named, else a fresh local instance.

A local run starts its own instance explicitly (`address="local"`): a stale `ray_current_cluster`
file from an earlier `ray stop` would otherwise make `ray.init()` retry for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from leaf_ray.config import RayConfig

log = logging.getLogger(__name__)
# Logical CPUs of the light Ray Data tasks that feed training (reading cache parts, hashing ids). Training workers
# and a streaming teacher actor hold their CPUs for the whole run; a task asking a whole CPU beside them waits for
# ever on a small machine (1 worker x 0.5 CPU + a 1-CPU teacher actor on 2 cores leave half a CPU).
DATA_TASK_CPUS = 0.25


def init_ray(cfg: RayConfig) -> str:
    """Start or join Ray once per process (showing Ray Data's progress as `ray.progress_bars` says, and off a
    terminal no library's weight-loading bars); returns the address joined ("local" for a new instance)."""
    import ray
    from ray.data import DataContext

    from leaf_ray.progress import bars_shown, quiet_library_bars

    context = DataContext.get_current()
    context.enable_progress_bars = bars_shown(cfg.progress_bars)
    # Parquet through Ray Data's first datasource: its successor starts a pool of footer-reading actors (one
    # process each) for every execution, so every training epoch over the teacher cache, whose parts the
    # cache's manifest already lists, would pay for new processes.
    context.use_datasource_v2 = False
    quiet_library_bars()
    if ray.is_initialized():
        return "already-initialized"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # No runtime_env here: a `ray job submit` job already carries one (its working_dir).
        ray.init(address=address)
        log.info("joined Ray cluster at %s", address)
        return address
    # One machine has no preemptible nodes for Ray Train to watch (the watcher is one more Python process per run),
    # and its Train controller may poll its workers more often than a cluster's: each report and the end of a run
    # wait for the next poll (Ray's 2 s suits clusters). Both stay as set when the environment sets them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Workers of a local instance inherit this process's environment (HF_HUB_OFFLINE, LEAF_DATA_DIR).
    # The dashboard process serves the State API, which Ray Train's placement-group cleaner polls every
    # second (without it, the log fills with "Failed to query Ray Train Controller actor state").
    # The cleaner finds that API by auto-detection, which fails ("Found multiple active Ray instances") when
    # other Ray instances run on the machine; its thread then dies, and a Train run whose driver is killed
    # (a trial Ray Tune's ASHA stops) keeps its workers' placement group. So the dashboard gets a known
    # port, and the instance's processes (started with this environment) are told where it is.
    port, = free_ports(1)
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    return "local"


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on this machine now. Every socket stays bound until all are chosen: asked
    one at a time, the OS may hand the port it just released out again (two Ray components on one port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
