"""Serving on this machine: a local Ray head started with `ray start`, the app deployed on it.

The head outlives the CLI process (Serve apps keep running after their driver exits), and
`stop` shuts Serve down and stops Ray, leaving nothing listening.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from common.artifacts import read_manifest
from common.config import RayrecConfig, ServeConfig
from common.ray_env import new_head_haproxy_env, ray_serving_env, remove_haproxy_link
from common.workdir import Workdir
from ray_apps.app import APP_NAME, build_app, serve_config
from ray_apps.haproxy_admission import admission_for, serving_env, without_admission
from ray_apps.ray_auth import use_ray_token

RAY_PORT = 6390
METRICS_PORT = 8080  # Prometheus metrics of Ray and Serve: http://127.0.0.1:8080/metrics (the web page links it)


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def check_port_free(host: str, port: int) -> None:
    """Raise when another process listens on Serve's HTTP port: a new head's proxy could not bind
    it, and `serve.run` would wait for a proxy that never becomes ready."""
    if _listening("127.0.0.1" if host in ("", "0.0.0.0") else host, port):
        raise RuntimeError(f"port {port} on {host} is in use by another process: stop it or set serve.port "
                           "to a free port")


def ray_address() -> str:
    return f"127.0.0.1:{RAY_PORT}"


def haproxy_admits(serve_cfg: ServeConfig) -> bool:
    """Whether the head `start_ray` starts has HAProxy enforce the replicas' admission bounds."""
    return serve_cfg.haproxy and serve_cfg.haproxy_admission


def start_ray(wd: Workdir, serve_cfg: ServeConfig) -> None:
    """Start a Ray head for serving unless one is already up on our port. With `serve.haproxy`,
    Serve's HTTP ingress is HAProxy (the variant benchmarks/serve_load.py found faster here), and
    with `serve.haproxy_admission` that HAProxy enforces the replicas' admission bounds
    (ray_apps/haproxy_admission.py); both are fixed for the head's life, and HAProxy's files are
    in the workdir (`Workdir.haproxy_dir`). Ray's workers, the replicas among them, get
    `serve.worker_niceness` added to this process's niceness instead of Ray's 15."""
    use_ray_token(wd)
    if _listening("127.0.0.1", RAY_PORT):
        return
    cmd = [_ray_bin(), "start", "--head", "--num-cpus=2", f"--port={RAY_PORT}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=false", "--disable-usage-stats", f"--metrics-export-port={METRICS_PORT}"]
    if wd.ray_temp_dir is not None:
        cmd.append(f"--temp-dir={wd.ray_temp_dir}")
    log = wd.ray_dir / "ray_start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = without_admission(dict(os.environ, **ray_serving_env(serve_cfg.haproxy, serve_cfg.worker_niceness,
                                                                  serve_cfg.control_loop_interval_s, serve_cfg.drain_s)))
    if haproxy_admits(serve_cfg):
        env |= serving_env(admission_for(serve_cfg))
    if serve_cfg.haproxy:
        env |= new_head_haproxy_env(wd.haproxy_dir)
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"`ray start` failed (exit {rc}); see {log}")


def check_deployable(cfg: RayrecConfig, wd: Workdir) -> None:
    """What `deploy` needs before it starts anything: the run, and Serve's port unless a head of
    ours is already up (then it may be the one serving there)."""
    read_manifest(wd)
    if not _listening("127.0.0.1", RAY_PORT):
        check_port_free(cfg.serve.host, cfg.serve.port)


def deploy(cfg: RayrecConfig, wd: Workdir) -> str:
    """Deploy the app for this workdir on the local head; returns the base URL."""
    import ray
    from ray import serve

    check_deployable(cfg, wd)
    start_ray(wd, cfg.serve)
    ray.init(address=ray_address(), log_to_driver=False)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    admission = haproxy_admits(cfg.serve)  # as start_ray started HAProxy
    serve.run(build_app({"workdir": str(wd.root), "haproxy_admission": admission}), name=APP_NAME, route_prefix="/",
              blocking=False)
    conf = wd.root / "serve_config.yaml"
    conf.write_text(yaml.safe_dump(serve_config(wd.root, cfg.serve.host, cfg.serve.port, haproxy_admission=admission),
                                   sort_keys=False))
    ray.shutdown()
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def stop(wd: Workdir) -> bool:
    """Shut Serve down and stop the local Ray head; False when nothing was running. HAProxy's short
    link goes either way: a head that died leaves it behind."""
    if not _listening("127.0.0.1", RAY_PORT):
        remove_haproxy_link(wd.haproxy_dir)
        return False
    use_ray_token(wd)
    try:
        import ray
        from ray import serve

        ray.init(address=ray_address(), log_to_driver=False)
        serve.shutdown()
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - stopping must go on even if Serve is unhealthy
        print(f"[serve] shutdown: {e}", file=sys.stderr)
    subprocess.call([_ray_bin(), "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        if not _listening("127.0.0.1", RAY_PORT):
            break
        time.sleep(0.2)
    remove_haproxy_link(wd.haproxy_dir)
    return True


def sample_requests(url: str, customer_ids: list[str], k: int = 12) -> list[dict[str, Any]]:
    """POST /v1/recommend for a few customers (what `make demo` prints)."""
    out = []
    with httpx.Client(timeout=60) as c:
        for cid in customer_ids:
            r = c.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": k, "debug": True})
            r.raise_for_status()
            out.append(r.json())
    return out


def curl_line(url: str, customer_id: str) -> str:
    body = json.dumps({"customer_id": customer_id, "k": 12})
    return f"curl -s -X POST {url}/v1/recommend -H 'Content-Type: application/json' -d '{body}'"
