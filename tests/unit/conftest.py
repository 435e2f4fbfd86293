"""Unit-test fixtures."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each unit test leaves the process environment as it found it. Code under test sets
    variables for the processes it would start (`use_ray_token` sets RAY_AUTH_MODE and a token
    path in a temp dir); left behind, they reached the Ray of any later test in the session."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
