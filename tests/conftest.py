"""Shared fixtures: paths to the real data, a seeded RNG, a real LocalCluster."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
FORMATS = DATA / "tenx_h5_format_tests"
# ../shared beside the project root: real labelled data and Cell Ranger's golden DE.
SHARED = HERE.parent.parent / "shared"


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"{p} is missing: the tests need ../shared beside the project root")
    return p


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


@pytest.fixture(scope="session")
def local_cluster_client():
    """A real 2-worker LocalCluster (processes), shared by the session's tests."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client
