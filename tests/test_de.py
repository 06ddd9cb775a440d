"""sSeq differential expression: kernels, properties, and Cell Ranger's own output on real data."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import anndata
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from .conftest import shared_path
from dask import delayed
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy.special import betainc, betaincinv, gammaln, logsumexp

from dask_annot import de, h5
from dask_annot.errors import InputFormatError, InvalidCountsError, TooFewCellsError

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _meta(n_genes: int) -> sp.csr_matrix:
    return sp.csr_matrix((0, n_genes), dtype=np.int32)


def dask_csr(mat: sp.csr_matrix, bounds: list[int]) -> da.Array:
    """A cells x genes dask array of CSR blocks cut at ``bounds`` (0 .. n, empty chunks allowed)."""
    mat = sp.csr_matrix(mat, dtype=np.int32)
    n_genes = mat.shape[1]
    blocks = [
        da.from_delayed(delayed(mat[lo:hi].copy)(), shape=(hi - lo, n_genes), dtype=np.int32, meta=_meta(n_genes))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    return da.concatenate(blocks, axis=0)


def dask_csr_from_file(info: h5.MatrixInfo, chunk: int) -> da.Array:
    """The matrix read chunk by chunk by the tasks themselves (path in the graph, not data)."""
    n_genes = info.n_features
    blocks = [
        da.from_delayed(
            delayed(h5.read_cells)(info, lo, min(lo + chunk, info.n_cells)),
            shape=(min(lo + chunk, info.n_cells) - lo, n_genes), dtype=np.int32, meta=_meta(n_genes),
        )
        for lo in range(0, info.n_cells, chunk)
    ]
    return da.concatenate(blocks, axis=0)


def assert_close(ours, gold, what: str, *, rtol: float = 1e-6, atol: float = 1e-12) -> float:
    """Relative agreement, exact zeros as zeros, NaN where NaN; returns the max relative error."""
    ours = np.asarray(ours, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    assert ours.shape == gold.shape, what
    nan = np.isnan(gold)
    assert np.array_equal(np.isnan(ours), nan), f"{what}: NaN pattern differs"
    o, g = ours[~nan], gold[~nan]
    assert np.array_equal(o == 0, g == 0), f"{what}: zeros differ at {np.flatnonzero((o == 0) != (g == 0))[:5]}"
    err = np.abs(o - g)
    bad = err > np.maximum(rtol * np.abs(g), atol)
    assert not bad.any(), f"{what}: {bad.sum()} values off, worst {o[bad][:3]} vs {g[bad][:3]}"
    nz = g != 0
    return float((err[nz] / np.abs(g[nz])).max()) if nz.any() else 0.0


def brute_exact(a: float, b: float, x_a: int, n: int, tol: float = 1e-9) -> tuple[float, float]:
    """p of the exact test over all k with lgamma; (strict, loose): L within ``tol`` of L(x_a) out / in."""
    k = np.arange(n + 1, dtype=np.float64)
    L = gammaln(a + k) - gammaln(k + 1) + gammaln(b + n - k) - gammaln(n - k + 1)
    l0 = L[x_a]
    total = logsumexp(L)
    scale = tol
    strict = np.exp(logsumexp(L[L < l0 - scale]) - total) if (L < l0 - scale).any() else 0.0
    loose = np.exp(logsumexp(L[L <= l0 + scale]) - total)
    return float(strict), float(loose)


def assert_exact_ok(p: float, bounds: tuple[float, float], rtol: float) -> None:
    strict, loose = bounds
    assert strict * (1 - rtol) - 1e-300 <= p <= loose * (1 + rtol) + 1e-300, (p, bounds)
    if strict == 0.0 or np.isclose(strict, loose, rtol=rtol, atol=0):
        target = loose
        assert abs(p - target) <= rtol * target + 1e-300, (p, target)


# ---------------------------------------------------------------------------
# golden data
# ---------------------------------------------------------------------------

GOLDEN = {
    "pbmc4k": ("de_pbmc4k", ("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad"), "Annotation"),
    "pbmc_sorted": ("de_pbmc_sorted", ("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"), "trueLabel"),
}


@dataclass(frozen=True)
class Golden:
    info: h5.MatrixInfo
    codes: np.ndarray
    names: list[str]
    features: np.ndarray
    de: pd.DataFrame
    text: str
    pvalues: pd.DataFrame
    sums: pd.DataFrame
    size_factors: pd.DataFrame
    params: pd.DataFrame
    globals: dict


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip", keep_default_na=False)


@functools.cache
def golden(name: str) -> Golden:
    """The golden run's input (grouped as Cell Ranger's run grouped it) and its outputs."""
    folder, data, label = GOLDEN[name]
    path = shared_path(*data)
    info = h5.open_matrix(path)
    adata = anndata.read_h5ad(path, backed="r")
    labels = adata.obs[label].astype(str).to_numpy(dtype=object)
    features = adata.var_names.to_numpy().astype(object)
    adata.file.close()
    # Cells under 100 UMIs would be "Low UMI Barcode"; the golden inputs have none.
    totals = np.concatenate(
        [np.asarray(h5.read_cells(info, lo, lo + 1000).sum(axis=1)).ravel() for lo in range(0, info.n_cells, 1000)]
    )
    labels = np.where(totals < 100, "Low UMI Barcode", labels)
    names = sorted(set(labels.tolist()))
    codes = np.searchsorted(np.asarray(names, dtype=object), labels).astype(np.int32)
    g = shared_path("golden", folder)
    return Golden(
        info=info, codes=codes, names=names, features=features,
        de=_read(g / "differential_expression.csv"),
        text=(g / "differential_expression.csv").read_text(),
        pvalues=_read(g / "pvalues.csv.gz"),
        sums=_read(g / "group_sums.csv.gz"),
        size_factors=_read(g / "size_factors.csv.gz"),
        params=_read(g / "sseq_params.csv.gz"),
        globals=json.loads((g / "sseq_globals.json").read_text()),
    )


def run_golden(name: str, chunk: int | None, scheduler) -> tuple[Golden, de.DEResult, np.ndarray]:
    gd = golden(name)
    X = dask_csr_from_file(gd.info, chunk or gd.info.n_cells)
    totals = de.cell_totals(X)
    result = de.build_de_result(
        X, da.from_array(gd.codes, chunks=(X.chunks[0],)), group_names=gd.names,
        feature_ids=gd.features, feature_names=gd.features, totals=totals,
    )
    res, tot = dask.compute(result, totals, scheduler=scheduler)
    return gd, res, tot


def check_against_golden(gd: Golden, res: de.DEResult, totals: np.ndarray) -> dict[str, float]:
    errs: dict[str, float] = {}
    df = res.to_frame()
    assert list(df.columns) == list(gd.de.columns)
    assert df["Feature ID"].tolist() == gd.de["Feature ID"].tolist()
    assert df["Feature Name"].tolist() == gd.de["Feature Name"].tolist()
    for kind in ("Mean Counts", "Log2 fold change", "Adjusted p value"):
        cols = [c for c in gd.de.columns if c.endswith(kind)]
        errs[kind] = assert_close(df[cols].to_numpy(), gd.de[cols].to_numpy(np.float64), kind)
    pv = res.pvalue_frame()
    pcols = [c for c in gd.pvalues.columns if c.endswith(" p value")]
    tcols = [c for c in gd.pvalues.columns if c.endswith(" test")]
    assert list(pv.columns) == list(gd.pvalues.columns)
    assert (pv[tcols].to_numpy() == gd.pvalues[tcols].to_numpy()).all(), "test choice differs"
    errs["raw p"] = assert_close(pv[pcols].to_numpy(), gd.pvalues[pcols].to_numpy(np.float64), "raw p")
    # integer sums, size factors
    np.testing.assert_array_equal(res.stats.group_sums.T, gd.sums[gd.names].to_numpy(np.int64))
    np.testing.assert_array_equal(totals, gd.size_factors["umi_count"].to_numpy(np.int64))
    assert gd.size_factors["barcode"].tolist() == gd.info.barcodes.tolist()
    assert gd.size_factors["group"].tolist() == [gd.names[c] for c in gd.codes]
    errs["size factor"] = assert_close(
        totals / res.stats.median_total, gd.size_factors["size_factor"].to_numpy(), "size factor", rtol=1e-12
    )
    # sSeq parameters
    gp = gd.params
    np.testing.assert_array_equal(res.params.tested, gp["use"].astype(str).to_numpy() == "True")
    for col in ("mean", "var", "phi_mm"):
        errs[col] = assert_close(getattr(res.params, col), gp[col].to_numpy(np.float64), col, rtol=1e-9)
    errs["phi"] = assert_close(res.params.phi, gp["phi"].astype(np.float64).to_numpy(), "phi", rtol=1e-9)
    gl = gd.globals
    st_, pr = res.stats, res.params
    assert (st_.N, st_.G, pr.n_tested, st_.n_zero_cells) == (gl["N"], gl["G"], gl["n_tested"], gl["n_zero_count_cells"])
    assert st_.median_total == gl["median_total"]
    for ours, key in ((st_.R, "R"), (pr.zeta, "zeta"), (pr.delta, "delta")):
        errs[key] = assert_close([ours], [gl[key]], key, rtol=1e-9)
    for i, grp in enumerate(gl["groups"]):
        assert grp["name"] == gd.names[i]
        assert st_.n_cells[i] == grp["n_cells"]
        assert_close([st_.S[i], st_.S_rest[i]], [grp["S_A"], grp["S_B"]], "S_A/S_B", rtol=1e-12)
        assert np.count_nonzero(res.test[i] == de.EXACT) == grp["n_exact_tests"]
        assert np.count_nonzero(res.test[i] == de.ASYMPTOTIC) == grp["n_asymptotic_tests"]
    # the CSV: header and feature columns byte for byte, numbers round-trip to ours
    ours_lines = de.format_de_csv(df).splitlines()
    gold_lines = gd.text.splitlines()
    assert ours_lines[0] == gold_lines[0]
    assert len(ours_lines) == len(gold_lines)
    assert all(o.split(",")[:2] == g.split(",")[:2] for o, g in zip(ours_lines[1:], gold_lines[1:]))
    return errs


@pytest.mark.parametrize("chunk", [256, 1000, None])
@pytest.mark.parametrize("name", ["pbmc4k", "pbmc_sorted"])
def test_matches_cell_ranger_threads(name: str, chunk: int | None) -> None:
    gd, res, totals = run_golden(name, chunk, "threads")
    errs = check_against_golden(gd, res, totals)
    print(name, chunk, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("name", ["pbmc4k", "pbmc_sorted"])
def test_matches_cell_ranger_local_cluster(name: str, local_cluster_client) -> None:
    gd, res, totals = run_golden(name, 1000, local_cluster_client)
    check_against_golden(gd, res, totals)
    # same chunking -> same bits, whatever the scheduler
    _, ref, _ = run_golden(name, 1000, "threads")
    for field in ("pvalue", "adjusted_pvalue", "log2_fold_change", "mean_counts", "test"):
        np.testing.assert_array_equal(getattr(res, field), getattr(ref, field))
    np.testing.assert_array_equal(res.stats.sum_y2, ref.stats.sum_y2)


def test_mink1_near_tie_is_included() -> None:
    """The golden README's closest `<=` call: MINK1 in B, a term 6.2e-8 below L(x_A) counts."""
    gd, res, _ = run_golden("pbmc4k", None, "sync")
    g = gd.names.index("B")
    i = int(np.flatnonzero(gd.features == "MINK1")[0])
    assert res.test[g, i] == de.EXACT
    x_a = int(res.stats.group_sums[g, i])
    x_b = int(res.stats.group_sums[:, i].sum()) - x_a
    a = res.stats.S[g] / res.params.phi[i]
    b = res.stats.S_rest[g] / res.params.phi[i]
    strict, loose = brute_exact(a, b, x_a, x_a + x_b, tol=1e-9)
    assert strict < loose * 0.95  # the near-tie matters (~13% of p) ...
    assert res.pvalue[g, i] == pytest.approx(loose, rel=1e-9)  # ... and is included
    assert res.pvalue[g, i] == pytest.approx(float(gd.pvalues.loc[i, "B p value"]), rel=1e-9)


def test_format_reproduces_golden_csv_bytes() -> None:
    """Cell Ranger's own numbers, written by format_de_csv, give Cell Ranger's file."""
    for name in GOLDEN:
        gd = golden(name)
        assert de.format_de_csv(gd.de) == gd.text


def test_format_floats() -> None:
    df = pd.DataFrame({
        "Feature ID": ["a", "b", "c", "d", "e"],
        "Feature Name": ["A", "B", "C", "D", "E"],
        "x": [1.0, 0.0, 1e-300, np.nan, np.inf],
        "y": [0.1, 123456789012345678.0, -2.5, 3e-5, -np.inf],
    })
    lines = de.format_de_csv(df).splitlines()
    assert lines[0] == "Feature ID,Feature Name,x,y"
    assert lines[1] == "a,A,1,0.1"
    assert lines[2] == "b,B,0,123456789012345680"
    assert lines[3] == "c,C,0." + "0" * 299 + "1,-2.5"
    assert lines[4] == "d,D,NaN,0.00003"
    assert lines[5] == "e,E,inf,-inf"


def test_format_quotes_group_names_with_commas_and_round_trips_through_pandas() -> None:
    """Fine CL labels hold commas; the header must still read back as the right columns (it did not at 0fac772)."""
    import io

    group = "CD4-positive, CD25-positive, alpha-beta regulatory T cell"
    odd = 'gene "x", y'
    df = pd.DataFrame({
        "Feature ID": ["ENSG1", "ENSG2"],
        "Feature Name": ["A", odd],
        f"{group} Mean Counts": [1.5, 0.0],
        f"{group} Log2 fold change": [0.25, -1.0],
        f"{group} Adjusted p value": [0.01, 1.0],
        "B Mean Counts": [2.0, 3.0],
    })
    text = de.format_de_csv(df)
    back = pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert list(back.columns) == list(df.columns)
    assert back.shape == df.shape
    assert back["Feature Name"].tolist() == ["A", odd]
    assert back[f"{group} Log2 fold change"].tolist() == [0.25, -1.0]
    assert text.splitlines()[1] == "ENSG1,A,1.5,0.25,0.01,2"  # fields without commas stay unquoted, as Cell Ranger writes them


# ---------------------------------------------------------------------------
# sufficient statistics: properties
# ---------------------------------------------------------------------------


@st.composite
def grouped_matrices(draw):
    """Small count matrices with the awkward cases: zero cells, zero genes, a one-cell group."""
    n_cells = draw(st.integers(1, 30))
    n_genes = draw(st.integers(1, 7))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    dense = rng.negative_binomial(1, 0.4, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.5)
    if draw(st.booleans()):
        dense[rng.integers(n_cells)] = 0  # an all-zero cell
    if draw(st.booleans()):
        dense[:, rng.integers(n_genes)] = 0  # an all-zero gene
    codes = rng.integers(0, k, size=n_cells)
    if n_cells > k and draw(st.booleans()):
        codes[:] = rng.integers(1, k, size=n_cells) if k > 1 else 0
        codes[rng.integers(n_cells)] = 0  # a group of one cell
    cuts = draw(st.lists(st.integers(0, n_cells), max_size=5))
    bounds = [0, *sorted(cuts), n_cells]  # repeated cuts make empty chunks
    return sp.csr_matrix(dense.astype(np.int32)), codes.astype(np.int32), k, bounds


def _partial_equal(p: de._Partial, q: de._Partial) -> None:
    for f in ("n_cells_total", "n_zero_cells"):
        assert getattr(p, f) == getattr(q, f)
    for f in ("group_umis", "group_cells", "group_sums"):
        np.testing.assert_array_equal(getattr(p, f), getattr(q, f))
    for f in ("sum_xc", "sum_xc2", "inv_c"):
        np.testing.assert_allclose(getattr(p, f), getattr(q, f), rtol=1e-12, atol=0)


@PROPERTY
@given(grouped_matrices(), st.data())
def test_merge_is_order_and_partition_free(case, data) -> None:
    mat, codes, k, bounds = case
    totals = np.asarray(mat.sum(axis=1)).ravel()
    whole = de._chunk_partial(mat, codes, totals, k)
    parts = [de._chunk_partial(mat[lo:hi], codes[lo:hi], totals[lo:hi], k) for lo, hi in zip(bounds[:-1], bounds[1:])]
    # merge in an arbitrary order and tree shape
    parts = data.draw(st.permutations(parts))
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 2))
        left, right = parts[i], parts[i + 1]
        if data.draw(st.booleans()):
            left, right = right, left
        parts[i : i + 2] = [de._merge(left, right)]
    _partial_equal(parts[0], whole)


@PROPERTY
@given(grouped_matrices())
def test_statistics_match_numpy(case) -> None:
    mat, codes, k, bounds = case
    X = dask_csr(mat, bounds)
    dense = mat.toarray().astype(np.float64)
    c = dense.sum(axis=1)
    median = np.median(c)
    stats = de.de_statistics(X, codes, k)
    if median == 0:
        with pytest.raises(TooFewCellsError):
            stats.compute(scheduler="sync")
        return
    s = stats.compute(scheduler="sync")
    sf = c / median
    y = np.zeros_like(dense)
    np.divide(dense, sf[:, None], out=y, where=sf[:, None] > 0)
    onehot = np.eye(k, dtype=np.int64)[codes]
    assert (s.N, s.G, s.median_total, s.n_zero_cells) == (mat.shape[0], mat.shape[1], median, int((c == 0).sum()))
    np.testing.assert_array_equal(s.group_sums, onehot.T @ mat.toarray().astype(np.int64))
    np.testing.assert_array_equal(s.n_cells, onehot.sum(axis=0))
    np.testing.assert_allclose(s.S, onehot.T @ sf, rtol=1e-12)
    np.testing.assert_allclose(s.S_rest, sf.sum() - onehot.T @ sf, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.sum_y, y.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.sum_y2, (y * y).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.R, (1 / sf[sf > 0]).sum(), rtol=1e-12)
    np.testing.assert_array_equal(de.cell_totals(X).compute(scheduler="sync"), c.astype(np.int64))


def test_statistics_do_not_depend_on_chunking(rng) -> None:
    dense = rng.negative_binomial(2, 0.3, size=(500, 40)) * (rng.random((500, 40)) < 0.3)
    dense[:7] = 0
    mat = sp.csr_matrix(dense.astype(np.int32))
    codes = rng.integers(0, 3, size=500).astype(np.int32)
    ref = de.de_statistics(dask_csr(mat, [0, 500]), codes, 3).compute(scheduler="sync")
    for bounds in ([0, 1, 1, 250, 499, 500], list(range(0, 501, 37)) + [500]):
        got = de.de_statistics(dask_csr(mat, bounds), codes, 3).compute(scheduler="threads")
        np.testing.assert_array_equal(got.group_sums, ref.group_sums)
        np.testing.assert_array_equal(got.group_umis, ref.group_umis)
        for f in ("sum_y", "sum_y2", "S", "R"):
            np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=1e-12)
    # the same chunking gives the same bits (fixed merge tree)
    once = de.de_statistics(dask_csr(mat, bounds), codes, 3).compute(scheduler="threads")
    np.testing.assert_array_equal(once.sum_y2, got.sum_y2)
    np.testing.assert_array_equal(once.sum_y, got.sum_y)


def test_duplicate_csr_entries_count_once() -> None:
    """Non-canonical CSR (duplicate entries) gives the sums of the canonical matrix."""
    dup = sp.csr_matrix(
        (np.array([1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1]), np.array([0, 2, 4])), shape=(2, 2)
    )
    canon = dup.copy()
    canon.sum_duplicates()
    totals = np.array([3, 7])
    codes = np.array([0, 1])
    _partial_equal(de._chunk_partial(dup, codes, totals, 2), de._chunk_partial(canon, codes, totals, 2))


def test_each_chunk_is_read_once() -> None:
    """One pass: totals, median and sums all come from a single read of each chunk."""
    mat = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, size=(100, 10)).astype(np.int32))
    reads: list[int] = []

    def read(lo: int) -> sp.csr_matrix:
        reads.append(lo)
        return mat[lo : lo + 25].copy()

    X = da.concatenate([
        da.from_delayed(delayed(read)(lo), shape=(25, 10), dtype=np.int32, meta=_meta(10)) for lo in range(0, 100, 25)
    ])
    ids = np.asarray([f"g{i}" for i in range(10)], dtype=object)
    de.build_de(X, np.arange(100) % 2, group_names=["a", "b"], feature_ids=ids, feature_names=ids).compute(
        scheduler="threads"
    )
    assert sorted(reads) == [0, 25, 50, 75]


# ---------------------------------------------------------------------------
# the whole method on small matrices against a dense, literal reading of SPEC §4
# ---------------------------------------------------------------------------


def reference_de(dense: np.ndarray, codes: np.ndarray, k: int, big_count: int, zq: float = 0.995):
    N, G = dense.shape
    x = dense.astype(np.float64)
    c = x.sum(axis=1)
    s = c / np.median(c)
    y = np.zeros_like(x)
    np.divide(x, s[:, None], out=y, where=s[:, None] > 0)
    mean = y.sum(0) / N
    var = (y * y).sum(0) / N - mean**2
    R = (1 / s[s > 0]).sum()
    tested = var > 0
    phi_mm = np.zeros(G)
    phi_mm[tested] = np.maximum(0, (N * var[tested] - mean[tested] * R) / (mean[tested] ** 2 * R))
    zeta = np.quantile(phi_mm[tested], zq)
    pt = phi_mm[tested]
    delta = (np.sum((pt - pt.mean()) ** 2) / (G - 1)) / (np.sum((pt - zeta) ** 2) / (G - 2))
    phi = np.full(G, np.nan)
    phi[tested] = (1 - delta) * pt + delta * zeta
    bounds = np.ones((k, G, 2))
    kinds = np.zeros((k, G), dtype=np.int8)
    for g in range(k):
        inA = codes == g
        x_a = dense[inA].sum(0).astype(np.int64)
        x_b = dense[~inA].sum(0).astype(np.int64)
        S_a, S_b = s[inA].sum(), s[~inA].sum()
        for j in np.flatnonzero(tested):
            n = x_a[j] + x_b[j]
            if x_a[j] > big_count and x_b[j] > big_count:
                kinds[g, j] = de.ASYMPTOTIC
                if phi[j] > 0:
                    al = S_a * mean[j] / (1 + phi[j] * mean[j])
                    be = S_b * mean[j] / (1 + phi[j] * mean[j])
                    if (x_a[j] + 0.5) / n < betaincinv(al, be, 0.5):
                        p = 2 * betainc(al, be, (x_a[j] + 0.5) / n)
                    else:
                        p = 2 * betainc(be, al, (x_b[j] + 0.5) / n)
                    bounds[g, j] = p
            else:
                kinds[g, j] = de.EXACT
                if phi[j] > 0 and S_a > 0 and S_b > 0 and n > 0:
                    bounds[g, j] = brute_exact(S_a / phi[j], S_b / phi[j], int(x_a[j]), int(n))
    return tested, phi, kinds, bounds


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_small_matrix_matches_dense_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    N, G, k = 80, 25, 3
    means = rng.gamma(0.7, 6, size=G)
    dense = rng.negative_binomial(0.8, 1 / (1 + means[None, :] / 0.8), size=(N, G))
    dense[:, 0] = 0  # untested gene
    dense[3] = 0  # zero cell
    codes = rng.integers(0, k, size=N).astype(np.int32)
    codes[codes == 2] = 1
    codes[5] = 2  # one-cell group
    names = ["a", "b", "c"]
    X = dask_csr(sp.csr_matrix(dense.astype(np.int32)), [0, 30, 30, 64, N])
    ids = np.asarray([f"g{i}" for i in range(G)], dtype=object)
    res = de.build_de_result(
        X, codes, group_names=names, feature_ids=ids, feature_names=ids, big_count=20, gene_block=7
    ).compute(scheduler="threads")
    tested, phi, kinds, bounds = reference_de(dense, codes, k, 20)
    np.testing.assert_array_equal(res.params.tested, tested)
    np.testing.assert_allclose(res.params.phi, phi, rtol=1e-10)
    np.testing.assert_array_equal(res.test, kinds)
    assert (kinds == de.ASYMPTOTIC).any() and (kinds == de.EXACT).any()
    for g in range(k):
        for j in range(G):
            assert_exact_ok(res.pvalue[g, j], tuple(bounds[g, j]), 1e-8)
        adj = np.ones(G)
        adj[tested] = de.benjamini_hochberg(res.pvalue[g, tested])
        np.testing.assert_array_equal(res.adjusted_pvalue[g], adj)
    df = de.build_de(
        X, codes, group_names=names, feature_ids=ids, feature_names=ids, big_count=20
    ).compute(scheduler="sync")
    assert list(df.columns[:5]) == [
        "Feature ID", "Feature Name", "a Mean Counts", "a Log2 fold change", "a Adjusted p value"
    ]
    np.testing.assert_array_equal(df["c Mean Counts"].to_numpy(), res.mean_counts[2])


def test_benjamini_hochberg_matches_definition(rng) -> None:
    p = np.concatenate([rng.random(50) ** 3, [0.2, 0.2, 0.2, 0.0, 1.0]])
    m = p.size
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    expect = np.empty(m)
    expect[order] = [min(1.0, ranked[i:].min()) for i in range(m)]
    np.testing.assert_allclose(de.benjamini_hochberg(p), expect, rtol=1e-15)
    q = de.benjamini_hochberg(p)
    assert len(set(q[p == 0.2])) == 1
    assert de.benjamini_hochberg(np.empty(0)).size == 0


# ---------------------------------------------------------------------------
# the exact test kernel
# ---------------------------------------------------------------------------


@PROPERTY
@given(
    st.floats(0.01, 300.0), st.floats(0.01, 300.0), st.integers(1, 400), st.floats(0.0, 1.0)
)
@example(a=5.093179621563976, b=5.093179621563976, n=128, frac=0.0)  # mirrored tie at the ends (was off by a factor 2)
def test_exact_matches_bruteforce(a: float, b: float, n: int, frac: float) -> None:
    x_a = int(round(frac * n))
    p = de.exact_test(x_a, n - x_a, size_a=a, size_b=b, phi=1.0)[()]
    assert_exact_ok(p, brute_exact(a, b, x_a, n), 1e-9)


@pytest.mark.parametrize(
    "a,b,n",
    [
        (0.3, 0.4, 50), (0.5, 1.5, 40), (1.0, 1.0, 30), (1.5, 0.5, 40),
        (0.05, 500.0, 300), (500.0, 0.05, 300), (2.0, 2.0, 1),
    ],
)
def test_exact_shapes_and_ends(a: float, b: float, n: int) -> None:
    """U shapes (a+b < 2), flat and monotone laws (a+b = 2), every observed value."""
    x_a = np.arange(n + 1)
    p = de.exact_test(x_a, n - x_a, size_a=a, size_b=b, phi=1.0)
    for i in range(n + 1):
        assert_exact_ok(p[i], brute_exact(a, b, i, n), 1e-9)


def test_exact_degenerate_cases_give_one() -> None:
    p = de.exact_test(
        [0, 3, 3, 3, 3], [0, 4, 4, 4, 4], size_a=[1.0, 0.0, 1.0, 1.0, 1.0], size_b=[1.0, 1.0, 0.0, 1.0, 1.0],
        phi=[1.0, 1.0, 1.0, 0.0, np.nan],
    )
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize(
    "x_a,x_b,size_a,size_b,phi",
    [
        (2_000_000, 3_000_000, 399_000.0, 600_000.0, 0.3),  # realistic: one mode, p ~ 0.1
        (2_000_000, 3_000_000, 399_000.0, 600_000.0, 0.002),
        (2_000_000, 3_000_000, 4.0, 8.0, 20.0),  # U-shaped, every term counts
    ],
)
def test_exact_large_n_is_right(x_a: int, x_b: int, size_a: float, size_b: float, phi: float) -> None:
    """Millions of counts (a 1.2M-cell sample): agrees with a brute-force sum over every k.

    How fast it is is measured in benchmarks/bench_de.py, not asserted here.
    """
    p = de.exact_test(x_a, x_b, size_a=size_a, size_b=size_b, phi=phi)[()]
    strict, loose = brute_exact(size_a / phi, size_b / phi, x_a, x_a + x_b, tol=0.0)
    assert 1e-6 < loose < 1
    assert p == pytest.approx(loose, rel=1e-6)


def test_asymptotic_is_two_sided_about_the_median() -> None:
    x_a = np.array([1000, 1500, 2000, 2500, 4000])
    x_b = 5000 - x_a
    p = de.asymptotic_test(x_a, x_b, size_a=100.0, size_b=150.0, mean=20.0, phi=0.1)
    al, be = 100 * 20 / 3, 150 * 20 / 3
    q = (x_a + 0.5) / 5000
    expect = np.where(q < betaincinv(al, be, 0.5), 2 * betainc(al, be, q), 2 * betainc(be, al, (x_b + 0.5) / 5000))
    np.testing.assert_allclose(p, expect, rtol=1e-12)
    assert p[0] < 1e-10 and p[-1] < 1e-10 and p[2] > 0.9


# ---------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------


def _tiny():
    mat = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 1], [4, 4, 0], [1, 1, 1]], dtype=np.int32))
    return dask_csr(mat, [0, 2, 4]), np.array([0, 1, 0, 1], dtype=np.int32), np.array(["x", "y", "z"], dtype=object)


def test_rejects_gene_chunking() -> None:
    X, codes, ids = _tiny()
    with pytest.raises(ValueError, match=r"rechunk"):
        de.build_de(X.rechunk((2, 2)), codes, group_names=["a", "b"], feature_ids=ids, feature_names=ids)
    with pytest.raises(ValueError, match=r"chunked along cells only"):
        de.cell_totals(X.rechunk((2, 1)))


def test_rejects_bad_groups_and_features() -> None:
    X, codes, ids = _tiny()
    with pytest.raises(ValueError, match="at least 2 groups"):
        de.build_de(X, np.zeros(4, np.int32), group_names=["a"], feature_ids=ids, feature_names=ids)
    with pytest.raises(InputFormatError, match="sorted"):
        de.build_de(X, codes, group_names=["b", "a"], feature_ids=ids, feature_names=ids)
    with pytest.raises(InputFormatError, match="3 genes"):
        de.build_de(X, codes, group_names=["a", "b"], feature_ids=ids[:2], feature_names=ids[:2])
    with pytest.raises(InputFormatError, match="one per cell"):
        de.de_statistics(X, codes[:3], 2)
    bad = de.de_statistics(X, np.array([0, 1, 2, 0], dtype=np.int32), 2)
    with pytest.raises(InputFormatError, match="0..1"):
        bad.compute(scheduler="sync")


def test_rejects_totals_that_do_not_match() -> None:
    X, codes, ids = _tiny()
    stats = de.de_statistics(X, codes, 2, totals=np.array([3, 4, 8, 2]))
    with pytest.raises(InvalidCountsError, match="do not match"):
        stats.compute(scheduler="sync")
