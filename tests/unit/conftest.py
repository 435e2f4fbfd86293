"""Unit-test fixtures."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each unit test leaves the process environment as it found it. Code under test sets
    variables for the processes it would start (`use_ray_token` sets RAY_AUTH_MODE and a token
    path in a temp dir); left behind, they reached the Ray of any later test in the session.

    Only the variables a test changed are put back: setenv/unsetenv are not thread-safe against
    getenv in C threads, and gRPC threads that Ray leaves in the process call getenv. Clearing
    and refilling the whole environment after every test crashed a CI run (a segfault in getenv
    on a gRPC "default-executor" thread)."""
    saved = dict(os.environ)
    yield
    for name in [k for k in os.environ if k not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
