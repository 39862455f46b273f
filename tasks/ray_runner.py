"""Diff shards on Ray: the `generate-diffs` flow's task runner and each shard task's resources (params `ray`).

    ray:
      address: ray://head:10001    # null: shards run in this process, one at a time (the default)
      num_gpus_per_shard: auto     # 1 where the Ray cluster has GPUs, else 0
      num_cpus_per_shard: 1

With an address, flows/pipeline.py gives the flow a `prefect_ray.RayTaskRunner` and submits each shard
(`train_shard`, one task per shard) with these resources. Each task loads the model itself (once per Ray
worker process) and writes its shard into the store exactly as a local run does (atomically, with its
sha256; a shard already complete is skipped), so every node must see the store at the same path: a
shared filesystem. Needs the `distributed` extra (`pip install -e ".[distributed]"`).
"""

from __future__ import annotations

import copy
import logging
import os

log = logging.getLogger("dit_core.ray")

INSTALL_HINT = 'pip install -e ".[distributed]" (prefect-ray and ray)'


def ray_enabled(params: dict) -> bool:
    """Whether params `ray.address` sends the shards to Ray."""
    return params["ray"]["address"] is not None


def task_runner(params: dict):
    """A `RayTaskRunner` for `ray.address`: `local` starts a new Ray instance here (shut down with the flow),
    `auto` joins the cluster started on this machine, ray://HOST:PORT or HOST:PORT a remote one."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise ImportError(f"ray.address={params['ray']['address']!r} needs prefect-ray: {INSTALL_HINT}, "
                          "or set ray.address=null to run the shards here") from e
    address = params["ray"]["address"]
    # RayTaskRunner calls ray.init() without an address for None and "auto"; pass ours so that "auto"
    # fails when no cluster runs here and "local" never joins one by accident.
    if address in ("local", "auto"):
        return RayTaskRunner(init_kwargs={"address": address})
    return RayTaskRunner(address=address)


def shard_resources(params: dict) -> dict:
    """Ray resources of one shard task, `num_gpus_per_shard: auto` resolved on the connected cluster."""
    import ray

    cfg = params["ray"]
    gpus = cfg["num_gpus_per_shard"]
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if gpus == 0 and params["model"]["device"] == "cuda":
        raise ValueError("model.device=cuda but the shard tasks reserve no GPU (ray.num_gpus_per_shard is 0 or the "
                         "Ray cluster has no GPUs); set ray.num_gpus_per_shard=1 or model.device=auto")
    return {"num_cpus": cfg["num_cpus_per_shard"], "num_gpus": gpus}


def worker_params(params: dict) -> dict:
    """`params` with `paths` made absolute: a Ray worker need not start in this directory."""
    out = copy.deepcopy(params)
    for key in ("data", "models", "reports"):
        out["paths"][key] = os.path.abspath(out["paths"][key])
    return out


def describe_cluster() -> str:
    """Nodes, CPUs and GPUs of the connected Ray cluster, for the log."""
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
