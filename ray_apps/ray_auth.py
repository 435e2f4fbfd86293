"""Ray token authentication for the local head, set before Ray is imported."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from common.workdir import Workdir
from training.ray_session import in_ray_job


def use_ray_token(wd: Workdir) -> Path | None:
    """Token authentication with a token file in the workdir, for the head and every client.

    Ray 2.60 turns token auth on by default but its CLI and drivers only send the token when
    RAY_AUTH_MODE=token; setting both variables here keeps `ray start`, drivers and
    `serve deploy` consistent (export the same two variables to use the Ray CLI by hand).

    Nothing is changed (None) in a process that joins an existing cluster (RAY_ADDRESS is set, as
    in a `ray job submit` driver): that cluster's token is the node's own (~/.ray/auth_token or
    RAY_AUTH_TOKEN[_PATH], see docs/deploy.md), and a workdir token would be refused.
    """
    if in_ray_job():
        return None
    path = wd.ray_dir / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    return path
