"""Shared test setup.

* Offline by default: no test may reach the Hugging Face hub (the ``tiny-llama`` preset
  is built locally; hub ids must hit the offline guard).
* ``DPLORA_RAY_CACHE`` is left alone so the converted models in the user's cache folder
  are reused between test sessions.
* One Ray instance for the whole session (:func:`ray_session`), started lazily by the
  first test that asks for it; the runner's ``ActorBackend`` reuses an initialised Ray,
  so tests that use the ``actors`` backend must request ``ray_session`` first.
* Tests that read the real data sets in ``../shared/data`` use the :func:`shared_data`
  fixture: without that folder they FAIL with a message saying so, never skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: the real data sets shipped beside the repository (see ../shared/data/README)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test fails loudly when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"this test needs the real data sets in {SHARED_DATA} (the folder "
                    "../shared/data beside the repository); it is missing", pytrace=False)
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One local Ray instance (2 CPUs, no dashboard) shared by every test that needs it."""
    import ray

    if ray.is_initialized():  # started by someone else: use it, leave it running
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token (Ray 2.60)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rt")  # short: Ray's socket paths are limited
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        logging_level="WARNING",
        _temp_dir=temp_dir,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
