"""Fuzzing the readers: malformed 10x HDF5 files end in the package's own errors, never anything else."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_annot import h5, store
from dask_annot.errors import DaskAnnotError

KEYS = ["data", "indices", "indptr", "shape", "barcodes", "features/id", "features/name", "features/feature_type", "features/genome"]


def write_valid(path, rng) -> None:
    n_cells, n_genes = 12, 9
    dense = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.int32)
    import scipy.sparse as sp

    h5.write_10x_h5(path, sp.csr_matrix(dense), barcodes=[f"AAAC{i:04d}-1" for i in range(n_cells)],
                    feature_ids=[f"ENSG{i:011d}" for i in range(n_genes)], feature_names=[f"G{i}" for i in range(n_genes)])


mutation = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("group"), st.sampled_from(KEYS)),
    st.tuples(st.just("strings"), st.sampled_from(KEYS)),
    st.tuples(st.just("floats"), st.sampled_from(KEYS), st.sampled_from([np.nan, -1.5, 0.25, 1e12, np.inf])),
    st.tuples(st.just("truncate"), st.sampled_from(KEYS), st.integers(0, 5)),
    st.tuples(st.just("extend"), st.sampled_from(KEYS), st.integers(1, 5)),
    st.tuples(st.just("scramble"), st.sampled_from(["indices", "indptr", "data", "shape"]), st.integers(0, 2**31 - 1)),
    st.tuples(st.just("twod"), st.sampled_from(KEYS)),
    st.tuples(st.just("scalar"), st.sampled_from(KEYS)),
)


def apply(path, mut) -> None:
    kind, key = mut[0], "matrix/" + mut[1]
    with h5py.File(path, "r+") as f:
        old = f[key][()] if key in f and isinstance(f[key], h5py.Dataset) else np.zeros(3, np.int64)
        if key in f:
            del f[key]
        if kind == "delete":
            return
        if kind == "group":
            f.create_group(key)
        elif kind == "strings":
            f[key] = np.array([b"x%d" % i for i in range(max(1, np.size(old)))])
        elif kind == "floats":
            old = np.asarray(old).ravel()
            v = old.astype(np.float64) if old.dtype.kind in "iuf" else np.zeros(old.size)
            if v.size:
                v[v.size // 2] = mut[2]
            f[key] = v
        elif kind == "truncate":
            f[key] = np.asarray(old).ravel()[: mut[2]]
        elif kind == "extend":
            v = np.asarray(old).ravel()
            f[key] = np.concatenate([v, v[: mut[2]] if v.size else np.zeros(mut[2], dtype=v.dtype)])
        elif kind == "scramble":
            r = np.random.default_rng(mut[2])
            v = np.asarray(old).ravel().copy()
            if v.size and v.dtype.kind in "iuf":
                v[r.integers(0, v.size)] = r.integers(-50, 50)
            f[key] = v
        elif kind == "twod":
            v = np.asarray(old).ravel()
            f[key] = np.stack([v, v]) if v.size else np.zeros((2, 2))
        elif kind == "scalar":
            f[key] = np.int64(7)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(muts=st.lists(mutation, min_size=1, max_size=3))
@pytest.mark.timeout(120)
def test_malformed_10x_files_raise_only_package_errors(tmp_path_factory, muts):
    d = tmp_path_factory.mktemp("fuzz")
    path = d / "m.h5"
    write_valid(path, np.random.default_rng(0))
    for m in muts:
        apply(path, m)
    try:
        info = h5.open_matrix(path)
        block = h5.read_cells(info, 0, info.n_cells)
        assert block.shape == (info.n_cells, info.n_features)
        store.convert(path, d / "s.zarr")
    except DaskAnnotError:
        pass
