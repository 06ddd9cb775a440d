"""benchmarks/simulate.py: the simulated 10x matrix reads back, carries its truth and resembles its source."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from .conftest import shared_path

from dask_annot import h5

SIMULATE = Path(__file__).resolve().parents[1] / "benchmarks" / "simulate.py"
N_CELLS = 300
SOURCE = ("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad")


def _load_simulate():
    spec = importlib.util.spec_from_file_location("bench_simulate", SIMULATE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sim():
    return _load_simulate()


@pytest.fixture(scope="module")
def source():
    import anndata

    a = anndata.read_h5ad(shared_path(*SOURCE))
    return a.X.tocsr().astype(np.float64), a.obs["trueLabel"].astype(str).to_numpy(), np.asarray(a.var_names, dtype=str)


@pytest.fixture(scope="module")
def simulated(sim, tmp_path_factory):
    # small blocks, so the block-wise seeding and the writer's appends are exercised
    out = tmp_path_factory.mktemp("sim") / "sim.h5"
    sim.main(["--cells", str(N_CELLS), "--output", str(out), "--seed", "7", "--block-cells", "128",
              "--source", str(shared_path(*SOURCE))])
    return out


def test_opens_as_10x_h5_with_labels_aligned(sim, simulated, source):
    info = h5.open_matrix(simulated)
    assert info.layout == "10x-h5-v3"
    assert info.n_cells == N_CELLS
    assert list(info.feature_ids) == list(source[2])  # the source's symbols (it has no Ensembl ids)
    X = h5.read_cells(info, 0, info.n_cells)
    assert X.shape == (N_CELLS, source[0].shape[1])
    assert (np.asarray(X.sum(axis=1)).ravel() > 0).all()
    truth = pd.read_csv(sim.labels_path(simulated), dtype=str)
    assert list(truth.columns) == ["barcode", "label"]
    assert list(truth["barcode"]) == list(info.barcodes) == [f"simcell_{i:09d}-1" for i in range(N_CELLS)]
    assert set(truth["label"]) <= set(source[1])
    meta = json.loads(sim.meta_path(simulated).read_text())
    assert meta["cells"] == N_CELLS and meta["nnz"] == X.nnz
    assert meta["labels"] == truth["label"].value_counts().to_dict()


def test_type_profiles_and_library_sizes_match_source(sim, simulated, source):
    Xs, labels_s, _ = source
    info = h5.open_matrix(simulated)
    X = h5.read_cells(info, 0, info.n_cells).astype(np.float64)
    truth = pd.read_csv(sim.labels_path(simulated), dtype=str)["label"].to_numpy()
    lib = np.asarray(X.sum(axis=1)).ravel()
    lib_s = np.asarray(Xs.sum(axis=1)).ravel()
    for t in np.unique(truth):
        m, ms = truth == t, labels_s == t
        assert m.sum() >= 10, f"{t}: only {m.sum()} cells"
        prof = np.asarray(X[m].sum(axis=0)).ravel() / lib[m].sum()
        prof_s = np.asarray(Xs[ms].sum(axis=0)).ravel() / lib_s[ms].sum()
        r = np.corrcoef(np.log1p(1e4 * prof), np.log1p(1e4 * prof_s))[0, 1]
        assert r > 0.9, f"{t}: profile correlation {r:.3f}"
        # truncated to the source's range before NB noise, which moves a total by a few s.d. of sqrt(L)
        lo, hi = lib_s[ms].min(), lib_s[ms].max()
        assert lib[m].min() >= 0.8 * lo and lib[m].max() <= 1.2 * hi, (t, lib[m].min(), lib[m].max(), lo, hi)
        # and its spread resembles the source's (log-normal fit)
        assert abs(np.log(lib[m]).mean() - np.log(lib_s[ms]).mean()) < 0.2


def test_same_seed_same_file_other_seed_other_counts(sim, simulated, tmp_path):
    args = ["--cells", str(N_CELLS), "--block-cells", "128", "--source", str(shared_path(*SOURCE))]
    again, other = tmp_path / "again.h5", tmp_path / "other.h5"
    sim.main(args + ["--output", str(again), "--seed", "7"])
    sim.main(args + ["--output", str(other), "--seed", "8"])

    def content(p):
        with h5py.File(p, "r") as f:
            return {k: f[f"matrix/{k}"][()] for k in ("data", "indices", "indptr", "barcodes", "shape")}

    a, b, c = content(simulated), content(again), content(other)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert sim.labels_path(simulated).read_text() == sim.labels_path(again).read_text()
    assert not np.array_equal(a["indptr"], c["indptr"])


def test_nb_quantile_matches_scipy(sim, rng):
    """The inverse-CDF sampler returns NB quantiles (checked against scipy on awkward parameters)."""
    from scipy.stats import nbinom

    mu = np.array([1e-4, 0.05, 0.5, 3.0, 29.0, 29.0, 5.0])
    phi = np.array([1e-3, 10.0, 0.3, 1.0, 1e-3, 10.0, 2.0])
    n, p = 1.0 / phi, 1.0 / (1.0 + phi * mu)
    p0 = nbinom.pmf(0, n, p)
    for _ in range(20):
        u = p0 + (1.0 - p0) * rng.random(mu.size)
        got = sim._nb_quantile_positive(u, p0, mu, phi)
        want = nbinom.ppf(u, n, p)
        np.testing.assert_array_equal(got, want)
