"""Environment variables that Ray and Serve read when their processes start.

Kept apart from `ray_apps.local` (which imports Serve and FastAPI) so that light processes, such
as the load benchmark's client, can name the same settings without loading the app."""
from __future__ import annotations


def ray_serving_env(haproxy: bool, worker_niceness: int, control_loop_interval_s: float,
                    drain_s: float) -> dict[str, str]:
    """Environment of the Ray processes that serve: Serve's HAProxy ingress on or off, the
    niceness Ray adds to its workers (replicas, and the HAProxy one of them starts), how often
    Serve's controller runs its control loop, and how long a stopped replica behind HAProxy still
    answers (common.config.ServeConfig says why each)."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0", "RAY_worker_niceness": str(worker_niceness),
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": repr(float(control_loop_interval_s)),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": repr(float(drain_s))}
