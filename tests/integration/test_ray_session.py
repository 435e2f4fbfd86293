"""The pipeline's Ray: a local instance of its own, whatever cluster file the workdir holds."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from common.workdir import Workdir
from training.ray_session import init_ray

pytestmark = pytest.mark.integration


def test_a_stale_cluster_file_from_a_stopped_serving_head_does_not_stop_a_run() -> None:
    """`rayrec serve start` writes the head's address into the workdir's Ray temp dir and a stopped
    head can leave it behind: the next `rayrec pipeline` must still start its own Ray (before, ray.init
    took the file for a cluster to join and refused num_cpus)."""
    import ray

    root = Path(tempfile.mkdtemp(prefix="rrrs", dir="/tmp"))  # short: Ray's unix sockets live under it
    wd = Workdir.at(root / "run")
    temp = wd.ray_temp_dir
    assert temp is not None
    temp.mkdir(parents=True)
    (temp / "ray_current_cluster").write_text("127.0.0.1:1")  # nothing listens there
    assert not ray.is_initialized()
    try:
        assert init_ray(wd) is True
        assert ray.cluster_resources().get("CPU") == 2
        assert ray.get(ray.put("ok")) == "ok"
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
