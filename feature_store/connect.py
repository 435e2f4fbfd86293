"""Open the configured online store, with the password from the environment or the local file."""
from __future__ import annotations

import os

from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store.online.mysql import MySQLOnlineStore


def db_password(cfg: DatabaseConfig, wd: Workdir) -> str:
    """The environment variable named in the config wins; a local database falls back to its file."""
    pw = os.environ.get(cfg.password_env)
    if pw:
        return pw
    if cfg.local:
        from feature_store.local_db import LocalMariaDB

        return LocalMariaDB(wd, cfg).password()
    raise RuntimeError(
        f"database password not set: export {cfg.password_env} (config database.password_env) "
        f"for {cfg.user}@{cfg.host}:{cfg.port}"
    )


def open_online_store(cfg: DatabaseConfig, wd: Workdir, **timeouts: float) -> MySQLOnlineStore:
    """Connect; `timeouts` (connect_timeout, read_timeout, write_timeout in seconds) bound how
    long a call may wait on the server (serving sets them short, so a slow store degrades)."""
    return MySQLOnlineStore.from_config(cfg, db_password(cfg, wd), **timeouts)
