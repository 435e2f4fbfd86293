"""How a command gets its Ray: the cluster it was submitted to, else a local instance for the run."""
from __future__ import annotations

import os

from common.ray_env import use_train_env
from common.workdir import Workdir


def in_ray_job() -> bool:
    """True in the driver of `ray job submit` (and wherever RAY_ADDRESS names a cluster to join)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_ray(wd: Workdir) -> bool:
    """Join the cluster of a Ray job, else start a local Ray (2 CPUs, the workdir's temp dir, Ray
    Train's controller polling often: common.ray_env.RAY_TRAIN_ENV).

    Returns:
        True when this call connected or started Ray (the caller shuts it down), False when this
        process already had Ray.
    """
    import ray

    if ray.is_initialized():
        return False
    if in_ray_job():
        ray.init(log_to_driver=False)  # resources are the cluster's: asking for CPUs here is an error
    else:
        use_train_env()
        temp = str(wd.ray_temp_dir) if wd.ray_temp_dir else None
        # "local": a Ray of its own, even where the temp dir names a cluster (the serving head that
        # `rayrec serve start` runs, or a stale file a stopped head left behind): joining that by
        # accident fails ("num_cpus ... must not be provided") or trains on the serving head.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True
