"""Connecting to Ray: a running cluster when one is named, else a fresh local instance.

A local run starts its own instance explicitly (`address="local"`): a stale `ray_current_cluster`
file from an earlier `ray stop` would otherwise make `ray.init()` retry for minutes.
"""

from __future__ import annotations

import logging
import os

from leaf_ray.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> str:
    """Start or join Ray once per process; returns the address joined ("local" for a new instance)."""
    import ray

    if ray.is_initialized():
        return "already-initialized"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # No runtime_env here: a `ray job submit` job already carries one (its working_dir).
        ray.init(address=address)
        log.info("joined Ray cluster at %s", address)
        return address
    # Workers of a local instance inherit this process's environment (HF_HUB_OFFLINE, LEAF_DATA_DIR).
    ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
    return "local"
