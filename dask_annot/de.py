"""Differential expression: Cell Ranger's sSeq negative-binomial test, one group vs the rest.

The test runs on reduced sufficient statistics, never on the matrix itself. One pass
over the cell chunks gathers the per-cell totals ``c_j`` (for the median ``m``) and,
per chunk, ``Σ x/c`` and ``Σ (x/c)²`` per gene, ``Σ 1/c``, integer counts per
(group, gene) and integer totals and cell counts per group. Because the size factor
is ``s_j = c_j / m``, the median only rescales these sums (``Σy = m·Σ x/c``,
``R = m·Σ 1/c``, ``S = Σc / m``), so it is applied once on the reduced result and no
chunk has to wait for it (a second pass would keep every chunk alive until the
median is known). The per-chunk statistics are merged pairwise in a fixed binary
tree, so a given chunking always gives the same bits.

The dispersion fit (:func:`sseq_params`) and the tests follow SPEC §4 to the letter;
the tests run as independent Dask tasks per (group, block of genes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import dask.array as da
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from dask.delayed import Delayed, delayed
from scipy import special

from .errors import ConfigError, InputFormatError, InvalidCountsError, TooFewCellsError

BIG_COUNT = 900
ZETA_QUANTILE = 0.995
GENE_BLOCK = 4096

TestName = Literal["untested", "exact", "asymptotic"]
TEST_NAMES: tuple[TestName, ...] = ("untested", "exact", "asymptotic")
UNTESTED, EXACT, ASYMPTOTIC = 0, 1, 2

# A tail whose sum is below 2**-54 of the total cannot change a float64 sum.
_TAIL = 2.0**-54
# Recompute the running term from lgamma every so many recurrence steps.
_REANCHOR = 1024


# ---------------------------------------------------------------------------
# Sufficient statistics
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DEStatistics:
    """Everything the sSeq fit and tests need, reduced over all cells.

    Attributes
    ----------
    N, G
        Number of cells and of (Gene Expression) features.
    median_total
        ``np.median`` of the per-cell totals, zero cells included.
    sum_y, sum_y2
        ``Σ_j y_jg`` and ``Σ_j y_jg²`` with ``y = x / s``, float64 ``[G]``.
    R
        ``Σ 1/s_j`` over cells with ``s_j > 0``.
    group_sums
        Integer count sums per (group, gene), int64 ``[K, G]``.
    group_umis
        Integer sums of the cell totals per group, int64 ``[K]``.
    S
        Size-factor sums per group, float64 ``[K]`` (``group_umis / median_total``).
    n_cells
        Cells per group, int64 ``[K]``.
    n_zero_cells
        Cells whose total is 0 (size factor 0; they add nothing to the y sums).
    """

    N: int
    G: int
    median_total: float
    sum_y: np.ndarray
    sum_y2: np.ndarray
    R: float
    group_sums: np.ndarray
    group_umis: np.ndarray
    S: np.ndarray
    n_cells: np.ndarray
    n_zero_cells: int

    @property
    def n_groups(self) -> int:
        return int(self.group_sums.shape[0])

    @property
    def S_rest(self) -> np.ndarray:
        """Size-factor sums of the cells outside each group, float64 ``[K]``."""
        return (self.group_umis.sum() - self.group_umis) / self.median_total


@dataclass(frozen=True, eq=False)
class _Partial:
    """Mergeable per-chunk sums, before the median is known."""

    n_cells_total: int
    n_zero_cells: int
    sum_xc: np.ndarray  # Σ x/c per gene
    sum_xc2: np.ndarray  # Σ (x/c)² per gene
    inv_c: float  # Σ 1/c over c > 0
    group_umis: np.ndarray  # int64 [K]
    group_cells: np.ndarray  # int64 [K]
    group_sums: np.ndarray  # int64 [K, G]


def _as_csr(block: Any) -> sp.csr_matrix:
    """A canonical CSR view of a block (duplicates summed: Σx² needs whole entries)."""
    out = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
    if not out.has_canonical_format:
        out = out.copy()
        out.sum_duplicates()
    return out


def _row_totals(block: Any) -> np.ndarray:
    """Per-cell count totals (int64) of one block of cells."""
    block = _as_csr(block)
    return np.asarray(block.sum(axis=1, dtype=np.int64)).ravel().astype(np.int64, copy=False)


def _chunk_partial(block: Any, codes: np.ndarray, totals: np.ndarray, n_groups: int) -> _Partial:
    """The sufficient statistics of one chunk of cells (pure; picklable)."""
    block = _as_csr(block)
    rows, n_genes = block.shape
    codes = np.asarray(codes).ravel()
    totals = np.asarray(totals).ravel().astype(np.int64, copy=False)
    if codes.size != rows or totals.size != rows:
        raise InputFormatError(
            f"a chunk of {rows} cells came with {codes.size} group codes and {totals.size} totals; "
            "give codes and totals with the same row chunking as the matrix"
        )
    if rows and (codes.min() < 0 or codes.max() >= n_groups):
        raise InputFormatError(
            f"group codes must lie in 0..{n_groups - 1}, found {int(codes.min())}..{int(codes.max())}; "
            "pass one group name per code"
        )
    row_sums = _row_totals(block)
    if not np.array_equal(row_sums, totals):
        bad = int(np.flatnonzero(row_sums != totals)[0])
        raise InvalidCountsError(
            f"the cell totals given do not match the matrix (row {bad} of a chunk sums to "
            f"{int(row_sums[bad])}, total given {int(totals[bad])}); pass totals=cell_totals(X) or none"
        )
    codes = codes.astype(np.int64, copy=False)
    positive = totals > 0
    per_entry = np.repeat(totals, np.diff(block.indptr)).astype(np.float64)
    xc = np.zeros(block.data.size, dtype=np.float64)
    np.divide(block.data.astype(np.float64), per_entry, out=xc, where=per_entry > 0)
    sum_xc = np.bincount(block.indices, weights=xc, minlength=n_genes).astype(np.float64, copy=False)
    sum_xc2 = np.bincount(block.indices, weights=xc * xc, minlength=n_genes).astype(np.float64, copy=False)
    inv = np.zeros(rows, dtype=np.float64)
    np.divide(1.0, totals.astype(np.float64), out=inv, where=positive)
    indicator = sp.csr_matrix(
        (np.ones(rows, dtype=np.int64), (codes, np.arange(rows))), shape=(n_groups, rows)
    )
    group_sums = np.asarray((indicator @ block.astype(np.int64)).toarray(), dtype=np.int64)
    group_umis = np.zeros(n_groups, dtype=np.int64)
    np.add.at(group_umis, codes, totals)
    return _Partial(
        n_cells_total=int(rows),
        n_zero_cells=int(rows - np.count_nonzero(positive)),
        sum_xc=sum_xc,
        sum_xc2=sum_xc2,
        inv_c=float(inv.sum()),
        group_umis=group_umis,
        group_cells=np.bincount(codes, minlength=n_groups).astype(np.int64),
        group_sums=group_sums,
    )


def _merge(left: _Partial, right: _Partial) -> _Partial:
    """Sum two chunks' statistics (integers exactly, floats in float64)."""
    return _Partial(
        n_cells_total=left.n_cells_total + right.n_cells_total,
        n_zero_cells=left.n_zero_cells + right.n_zero_cells,
        sum_xc=left.sum_xc + right.sum_xc,
        sum_xc2=left.sum_xc2 + right.sum_xc2,
        inv_c=left.inv_c + right.inv_c,
        group_umis=left.group_umis + right.group_umis,
        group_cells=left.group_cells + right.group_cells,
        group_sums=left.group_sums + right.group_sums,
    )


def _median_total(*blocks: np.ndarray) -> float:
    """``np.median`` of all per-cell totals (N int64: small enough to gather)."""
    return float(np.median(np.concatenate([np.asarray(b, dtype=np.int64).ravel() for b in blocks])))


def _finish_statistics(part: _Partial, median_total: float) -> DEStatistics:
    """Apply the median to the reduced sums: ``y = x·m/c``, ``s = c/m``."""
    if part.n_cells_total == 0:
        raise TooFewCellsError("differential expression needs at least one cell, the matrix has none")
    if not median_total > 0:
        raise TooFewCellsError(
            f"the median cell total is {median_total:g}: at least half of the {part.n_cells_total} cells "
            "have no counts, so the size factors are undefined; use the filtered (cell-called) matrix"
        )
    m = float(median_total)
    return DEStatistics(
        N=part.n_cells_total,
        G=int(part.sum_xc.size),
        median_total=m,
        sum_y=part.sum_xc * m,
        sum_y2=part.sum_xc2 * (m * m),
        R=part.inv_c * m,
        group_sums=part.group_sums,
        group_umis=part.group_umis,
        S=part.group_umis / m,
        n_cells=part.group_cells,
        n_zero_cells=part.n_zero_cells,
    )


def _tree_merge(parts: list[Delayed]) -> Delayed:
    """Merge pairwise in a fixed binary tree (same chunking -> same float bits)."""
    while len(parts) > 1:
        merged = [delayed(_merge, pure=True)(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0]


def _check_matrix(X: Any, stage: str) -> None:
    if not isinstance(X, da.Array) or X.ndim != 2:
        raise InputFormatError(f"{stage}: expected a 2-d dask array of cells x genes, got {type(X).__name__}")
    if any(math.isnan(c) for c in X.shape):
        raise InputFormatError(f"{stage}: the matrix has unknown chunk sizes; call X.compute_chunk_sizes() first")
    if len(X.chunks[1]) != 1:
        raise ConfigError(
            f"{stage}: the matrix must be chunked along cells only, got {len(X.chunks[1])} chunks along genes; "
            f"rechunk with X.rechunk({{0: {X.chunks[0][0]}, 1: -1}})"
        )
    if X.shape[0] == 0:
        raise TooFewCellsError(f"{stage}: differential expression needs at least one cell, the matrix has none")


def _row_chunked(v: Any, X: da.Array, what: str) -> da.Array:
    """A per-cell vector as a dask array with X's row chunks."""
    if isinstance(v, da.Array):
        if v.ndim != 1 or v.shape[0] != X.shape[0]:
            raise InputFormatError(f"{what}: expected {X.shape[0]} values (one per cell), got shape {v.shape}")
        return v if v.chunks[0] == X.chunks[0] else v.rechunk((X.chunks[0],))
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.shape[0] != X.shape[0]:
        raise InputFormatError(f"{what}: expected {X.shape[0]} values (one per cell), got shape {arr.shape}")
    return da.from_array(arr, chunks=(X.chunks[0],))


def cell_totals(X: da.Array) -> da.Array:
    """Per-cell count totals (int64), lazily, one task per chunk of cells.

    Parameters
    ----------
    X
        Cells x genes dask array of CSR int32 blocks, chunked along cells only.
    """
    _check_matrix(X, "cell_totals")
    return X.map_blocks(
        _row_totals, drop_axis=1, chunks=(X.chunks[0],), dtype=np.int64, meta=np.empty((0,), dtype=np.int64)
    )


def de_statistics(X: da.Array, codes: Any, n_groups: int, *, totals: Any = None) -> Delayed:
    """Lazy :class:`DEStatistics` of a count matrix grouped by ``codes``.

    Parameters
    ----------
    X
        Cells x genes dask array of CSR integer blocks, chunked along cells only.
    codes
        Group code (0..n_groups-1) per cell, dask or NumPy; rechunked to X's rows.
    n_groups
        Number of groups K.
    totals
        Per-cell totals if already built (e.g. ``cell_totals(X)`` shared with other
        outputs); checked against the matrix chunk by chunk.

    Returns
    -------
    Delayed
        A delayed :class:`DEStatistics`; nothing is computed here. Each chunk of X
        is read once; computed in one ``dask.compute`` call with other collections
        over X, pass ``optimize_graph=False`` so array fusion does not re-read it.
    """
    _check_matrix(X, "de_statistics")
    n_groups = int(n_groups)
    if n_groups < 1:
        raise InputFormatError(f"de_statistics: n_groups must be at least 1, got {n_groups}")
    codes_da = _row_chunked(codes, X, "codes")
    if codes_da.dtype.kind not in "iu":
        raise InputFormatError(f"codes: expected integer group codes, got dtype {codes_da.dtype}")
    totals_da = cell_totals(X) if totals is None else _row_chunked(totals, X, "totals")
    # Unoptimized, so the totals and the statistics share X's block keys: with graph
    # fusion each side would read every chunk again.
    x_blocks = X.to_delayed(optimize_graph=False).ravel().tolist()
    c_blocks = codes_da.to_delayed(optimize_graph=False).ravel().tolist()
    t_blocks = totals_da.to_delayed(optimize_graph=False).ravel().tolist()
    parts = [
        delayed(_chunk_partial, pure=True)(xb, cb, tb, n_groups)
        for xb, cb, tb in zip(x_blocks, c_blocks, t_blocks)
    ]
    median = delayed(_median_total, pure=True)(*t_blocks)
    return delayed(_finish_statistics, pure=True)(_tree_merge(parts), median)


# ---------------------------------------------------------------------------
# Dispersion fit
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SSeqParams:
    """sSeq per-gene moments and shrunk dispersions (SPEC §4).

    ``phi_mm`` is 0 and ``phi`` NaN for untested genes (``var == 0``).
    """

    mean: np.ndarray
    var: np.ndarray
    tested: np.ndarray
    phi_mm: np.ndarray
    phi: np.ndarray
    zeta: float
    delta: float

    @property
    def n_tested(self) -> int:
        return int(np.count_nonzero(self.tested))


def sseq_params(stats: DEStatistics, *, zeta_quantile: float = ZETA_QUANTILE) -> SSeqParams:
    """Method-of-moments dispersions shrunk towards their ``zeta_quantile`` quantile.

    The δ denominators use G = all features, not the tested count, as Cell Ranger
    does. With fewer than 3 features, or when every tested φmm equals ζ, δ is 0
    (no shrinkage; δ's formula is undefined there).
    """
    if not 0.0 <= zeta_quantile <= 1.0:
        raise ConfigError(f"zeta_quantile must lie in [0, 1], got {zeta_quantile}")
    N, G, R = stats.N, stats.G, stats.R
    mean = stats.sum_y / N
    var = stats.sum_y2 / N - mean * mean
    tested = var > 0
    phi_mm = np.zeros(G, dtype=np.float64)
    mt = mean[tested]
    phi_mm[tested] = np.maximum(0.0, (N * var[tested] - mt * R) / (mt * mt * R))
    pt = phi_mm[tested]
    phi = np.full(G, np.nan)
    if pt.size == 0:
        return SSeqParams(mean, var, tested, phi_mm, phi, zeta=0.0, delta=0.0)
    zeta = float(np.quantile(pt, zeta_quantile))
    delta = 0.0
    if G >= 3:
        num = float(np.sum((pt - pt.mean()) ** 2)) / (G - 1)
        den = float(np.sum((pt - zeta) ** 2)) / (G - 2)
        if den > 0:
            delta = num / den
    phi[tested] = (1.0 - delta) * pt + delta * zeta
    return SSeqParams(mean, var, tested, phi_mm, phi, zeta=zeta, delta=delta)


# ---------------------------------------------------------------------------
# The exact conditional test (numba)
# ---------------------------------------------------------------------------


# Stirling's series for lnΓ(z) − [(z−½)ln z − z + ½ln 2π]; truncation < 1e-19 for z >= 16.
_STIRLING = (1.0 / 12.0, -1.0 / 360.0, 1.0 / 1260.0, -1.0 / 1680.0, 1.0 / 1188.0, -691.0 / 360360.0, 1.0 / 156.0)


@numba.njit(cache=True, nogil=True)
def _stirling_tail(z: float) -> float:
    w = 1.0 / (z * z)
    acc = 0.0
    for i in range(len(_STIRLING) - 1, -1, -1):
        acc = acc * w + _STIRLING[i]
    return acc / z


@numba.njit(cache=True, nogil=True)
def _lgamma_rise(x: float, y: float) -> float:
    """lnΓ(y) − lnΓ(x) for 0 < x <= y, accurate relative to the difference itself.

    Two lgamma calls lose eps·lnΓ(y) in absolute terms (1e-10 at y ~ 1e5), which
    would cap the p-values' relative accuracy; Stirling's form with log1p keeps the
    error at eps·(y−x)·ln y.
    """
    if x == y:
        return 0.0
    if x < 16.0:
        return math.lgamma(y) - math.lgamma(x)
    d = y - x
    return (y - 0.5) * math.log1p(d / x) + d * (math.log(x) - 1.0) + (_stirling_tail(y) - _stirling_tail(x))


@numba.njit(cache=True, nogil=True)
def _lgamma_diff(x: float, y: float) -> float:
    """lnΓ(y) − lnΓ(x), exactly antisymmetric in (x, y)."""
    if x <= y:
        return _lgamma_rise(x, y)
    return -_lgamma_rise(y, x)


@numba.njit(cache=True, nogil=True)
def _log_ratio(a: float, b: float, n: float, k: float, j: float) -> float:
    """L(k) − L(j) with L(k) = lnΓ(a+k) − lnΓ(k+1) + lnΓ(b+n−k) − lnΓ(n−k+1).

    Exactly 0 when k == j, and exactly 0 for mirrored ties (a == b, k == n − j).
    """
    # b + (n − k), not (b + n) − k: n − k is an exact integer, so a mirrored argument
    # equals a + j bit for bit and mirrored ties cancel to exactly 0
    return (_lgamma_diff(a + j, a + k) - _lgamma_diff(j + 1.0, k + 1.0)) + (
        _lgamma_diff(b + (n - j), b + (n - k)) - _lgamma_diff((n - j) + 1.0, (n - k) + 1.0)
    )


@numba.njit(cache=True, nogil=True)
def _walk_sum(a: float, b: float, n: int, start: int, stop: int, kref: int) -> float:
    """Σ exp(L(k) − L(kref)) for k from start to stop, given terms non-increasing that way.

    Terms come from the ratio recurrence, re-anchored on :func:`_log_ratio` every
    ``_REANCHOR`` steps. The walk stops once (terms left) × (current term) is below
    2**-54 of the sum, which the caller guarantees is at least 1 in the end (the
    kref term itself is 1): such a tail cannot change the float64 result.
    """
    step = 1 if stop >= start else -1
    count = abs(stop - start) + 1
    nf = float(n)
    k = start
    t = math.exp(_log_ratio(a, b, nf, float(k), float(kref)))
    s = 0.0
    comp = 0.0
    for i in range(count):
        u = s + t
        if s >= t:
            comp += (s - u) + t
        else:
            comp += (t - u) + s
        s = u
        left = count - 1 - i
        if left == 0:
            break
        if t * left < _TAIL * max(s, 1.0):
            break
        prev = float(k)
        k += step
        if (i + 1) % _REANCHOR == 0:
            t = math.exp(_log_ratio(a, b, nf, float(k), float(kref)))
        elif step == 1:
            t *= ((a + prev) * (nf - prev)) / ((prev + 1.0) * (b + nf - prev - 1.0))
        else:
            t *= (prev * (b + nf - prev)) / ((a + prev - 1.0) * (nf - prev + 1.0))
    return s + comp


@numba.njit(cache=True, nogil=True)
def _first_at_or_below(a: float, b: float, n: int, start: int, stop: int, k0: int) -> int:
    """First k from start towards stop with L(k) <= L(k0) (L non-increasing that way), or -1."""
    step = 1 if stop >= start else -1
    count = abs(stop - start) + 1
    nf = float(n)
    lo = 0
    hi = count
    while lo < hi:
        mid = (lo + hi) // 2
        if _log_ratio(a, b, nf, float(start + step * mid), float(k0)) <= 0.0:
            hi = mid
        else:
            lo = mid + 1
    if lo == count:
        return -1
    return start + step * lo


@numba.njit(cache=True, nogil=True)
def _exact_one(a: float, b: float, k0: int, n: int) -> float:
    """P(L(k) <= L(k0)) under the conditional law of x_A given n (r·S_A = a, r·S_B = b).

    T(k+1)/T(k) − 1 has the sign of g(k) = (a−1)n − (b−1) − k(a+b−2), linear in k:
    the terms rise then fall (a+b > 2; one mode) or fall then rise (a+b < 2; peaks at
    both ends). Each monotone run is summed outward from its peak, the total in units
    of the largest term and the tail in units of the observed one.
    """
    if not (a > 0.0 and b > 0.0 and n > 0 and math.isfinite(a) and math.isfinite(b)):
        return 1.0
    nf = float(n)
    g0 = (a - 1.0) * nf - (b - 1.0)
    c = a + b - 2.0
    starts = np.empty(2, dtype=np.int64)
    stops = np.empty(2, dtype=np.int64)
    if c >= 0.0:
        if c == 0.0:
            m = n if g0 > 0.0 else 0
        else:
            kstar = g0 / c
            if kstar <= 0.0:
                m = 0
            elif kstar >= nf:
                m = n
            else:
                m = int(math.ceil(kstar))
            while m < n and g0 - m * c > 0.0:
                m += 1
            while m > 0 and g0 - (m - 1) * c <= 0.0:
                m -= 1
        kmax = m
        starts[0] = m
        stops[0] = n
        n_walks = 1
        if m >= 1:
            starts[1] = m - 1
            stops[1] = 0
            n_walks = 2
    else:
        kstar = g0 / c
        if kstar <= 0.0:
            v = 0
        elif kstar >= nf:
            v = n
        else:
            v = int(math.ceil(kstar))
        while v < n and g0 - v * c < 0.0:
            v += 1
        while v > 0 and g0 - (v - 1) * c >= 0.0:
            v -= 1
        kmax = n if _log_ratio(a, b, nf, nf, 0.0) > 0.0 else 0
        starts[0] = 0
        stops[0] = v
        n_walks = 1
        if v + 1 <= n:
            starts[1] = n
            stops[1] = v + 1
            n_walks = 2
    den = 0.0
    num = 0.0
    for w in range(n_walks):
        den += _walk_sum(a, b, n, starts[w], stops[w], kmax)
        kc = _first_at_or_below(a, b, n, starts[w], stops[w], k0)
        if kc >= 0:
            num += _walk_sum(a, b, n, kc, stops[w], k0)
    if num <= 0.0:
        return 0.0
    p = math.exp(math.log(num) - math.log(den) + _log_ratio(a, b, nf, float(k0), float(kmax)))
    return min(p, 1.0)


@numba.njit(cache=True, nogil=True)
def _exact_pvalues(a: np.ndarray, b: np.ndarray, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
    out = np.empty(x_a.size, dtype=np.float64)
    for i in range(x_a.size):
        out[i] = _exact_one(a[i], b[i], x_a[i], x_a[i] + x_b[i])
    return out


def exact_test(x_a: Any, x_b: Any, *, size_a: Any, size_b: Any, phi: Any) -> np.ndarray:
    """sSeq exact conditional test p-values, vectorised over genes.

    Parameters
    ----------
    x_a, x_b
        Integer count sums in the group and in the rest.
    size_a, size_b
        Size-factor sums S_A, S_B (scalars or per gene).
    phi
        Dispersions φ.

    Returns
    -------
    numpy.ndarray
        ``p = Σ_{L(k) <= L(x_A)} e^{L(k)} / Σ_k e^{L(k)}``; 1 where n = 0, φ <= 0 or
        NaN, S_A = 0 or S_B = 0.
    """
    x_a, x_b, size_a, size_b, phi = np.broadcast_arrays(
        np.asarray(x_a, dtype=np.int64), np.asarray(x_b, dtype=np.int64),
        np.asarray(size_a, dtype=np.float64), np.asarray(size_b, dtype=np.float64),
        np.asarray(phi, dtype=np.float64),
    )
    shape = x_a.shape
    if np.any(x_a < 0) or np.any(x_b < 0):
        raise InvalidCountsError("exact_test: count sums must be non-negative")
    ok = (phi > 0) & (size_a > 0) & (size_b > 0)
    r = np.divide(1.0, phi, out=np.zeros(shape), where=ok)
    a = np.where(ok, r * size_a, 0.0)
    b = np.where(ok, r * size_b, 0.0)
    p = _exact_pvalues(
        np.ascontiguousarray(a).ravel(), np.ascontiguousarray(b).ravel(),
        np.ascontiguousarray(x_a).ravel(), np.ascontiguousarray(x_b).ravel(),
    )
    return p.reshape(shape)


def asymptotic_test(x_a: Any, x_b: Any, *, size_a: Any, size_b: Any, mean: Any, phi: Any) -> np.ndarray:
    """edgeR's beta approximation to the sSeq test, two-sided about the Beta median.

    ``α = S_A·μ/(1+φμ)``, ``β = S_B·μ/(1+φμ)``; p is twice the lower tail of
    Beta(α, β) at ``(x_A+0.5)/n`` when that lies below the median, else twice the
    lower tail of Beta(β, α) at ``(x_B+0.5)/n``. Not capped at 1 (Cell Ranger
    does not; BH caps).
    """
    x_a, x_b, size_a, size_b, mean, phi = np.broadcast_arrays(
        np.asarray(x_a, dtype=np.float64), np.asarray(x_b, dtype=np.float64),
        np.asarray(size_a, dtype=np.float64), np.asarray(size_b, dtype=np.float64),
        np.asarray(mean, dtype=np.float64), np.asarray(phi, dtype=np.float64),
    )
    n = x_a + x_b
    ok = (n > 0) & (size_a > 0) & (size_b > 0) & (mean > 0) & (phi > 0)
    scale = np.divide(mean, 1.0 + phi * mean, out=np.zeros(n.shape), where=ok)
    alpha = np.where(ok, size_a * scale, 1.0)
    beta = np.where(ok, size_b * scale, 1.0)
    nn = np.where(ok, n, 1.0)
    median = special.betaincinv(alpha, beta, 0.5)
    q_a = (x_a + 0.5) / nn
    q_b = (x_b + 0.5) / nn
    p = np.where(q_a < median, 2.0 * special.betainc(alpha, beta, q_a), 2.0 * special.betainc(beta, alpha, q_b))
    return np.where(ok, p, 1.0)


def _sseq_block(
    stats: DEStatistics, params: SSeqParams, group: int, lo: int, hi: int, big_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Raw p-values and test choice for one group against the rest, genes lo:hi."""
    sums = stats.group_sums[:, lo:hi]
    x_a = sums[group]
    x_b = sums.sum(axis=0) - x_a
    size_a = float(stats.S[group])
    size_b = float(stats.S_rest[group])
    mean = params.mean[lo:hi]
    phi = params.phi[lo:hi]
    tested = params.tested[lo:hi]
    asym = tested & (x_a > big_count) & (x_b > big_count)
    exact = tested & ~asym
    test = np.zeros(x_a.size, dtype=np.int8)
    test[exact] = EXACT
    test[asym] = ASYMPTOTIC
    p = np.ones(x_a.size, dtype=np.float64)
    runnable = tested & (phi > 0) & (x_a + x_b > 0) & (size_a > 0) & (size_b > 0)
    e = exact & runnable
    if e.any():
        p[e] = exact_test(x_a[e], x_b[e], size_a=size_a, size_b=size_b, phi=phi[e])
    s = asym & runnable
    if s.any():
        p[s] = asymptotic_test(x_a[s], x_b[s], size_a=size_a, size_b=size_b, mean=mean[s], phi=phi[s])
    return p, test


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values, capped at 1 (ties get equal values)."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m, dtype=np.float64)
    out[order] = np.minimum(q, 1.0)
    return out


# ---------------------------------------------------------------------------
# Results and the builder
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DEResult:
    """Per (group, gene) results, arrays of shape ``[K, G]``.

    ``test`` holds indices into :data:`TEST_NAMES` (untested / exact / asymptotic).
    """

    group_names: tuple[str, ...]
    feature_ids: np.ndarray
    feature_names: np.ndarray
    stats: DEStatistics
    params: SSeqParams
    pvalue: np.ndarray
    test: np.ndarray
    adjusted_pvalue: np.ndarray
    log2_fold_change: np.ndarray
    mean_counts: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """The Cell Ranger / Loupe layout: Feature ID, Feature Name, then a triplet per group."""
        columns: dict[str, np.ndarray] = {
            "Feature ID": np.asarray(self.feature_ids, dtype=object),
            "Feature Name": np.asarray(self.feature_names, dtype=object),
        }
        for i, g in enumerate(self.group_names):
            columns[f"{g} Mean Counts"] = self.mean_counts[i]
            columns[f"{g} Log2 fold change"] = self.log2_fold_change[i]
            columns[f"{g} Adjusted p value"] = self.adjusted_pvalue[i]
        return pd.DataFrame(columns)

    def pvalue_frame(self) -> pd.DataFrame:
        """Raw p-values and test choice per group: ``feature, <g> p value, <g> test, ...``."""
        names = np.asarray(TEST_NAMES, dtype=object)
        columns: dict[str, np.ndarray] = {"feature": np.asarray(self.feature_ids, dtype=object)}
        for i, g in enumerate(self.group_names):
            columns[f"{g} p value"] = self.pvalue[i]
            columns[f"{g} test"] = names[self.test[i]]
        return pd.DataFrame(columns)


def _assemble(
    stats: DEStatistics,
    params: SSeqParams,
    group_names: tuple[str, ...],
    feature_ids: np.ndarray,
    feature_names: np.ndarray,
    *blocks: tuple[np.ndarray, np.ndarray],
) -> DEResult:
    """Join the test blocks, then BH per group, fold changes and mean counts."""
    K, G = stats.group_sums.shape
    n_blocks = len(blocks) // K
    pvalue = np.empty((K, G), dtype=np.float64)
    test = np.empty((K, G), dtype=np.int8)
    for i in range(K):
        mine = blocks[i * n_blocks : (i + 1) * n_blocks]
        pvalue[i] = np.concatenate([b[0] for b in mine]) if mine else np.empty(0)
        test[i] = np.concatenate([b[1] for b in mine]) if mine else np.empty(0, dtype=np.int8)
    tested = params.tested
    adjusted = np.ones((K, G), dtype=np.float64)
    for i in range(K):
        adjusted[i, tested] = benjamini_hochberg(pvalue[i, tested])
    x_a = stats.group_sums.astype(np.float64)
    x_b = stats.group_sums.sum(axis=0)[None, :] - stats.group_sums
    S = stats.S[:, None]
    S_rest = stats.S_rest[:, None]
    log2fc = np.log2((x_a + 1.0) / (S + 1.0)) - np.log2((x_b + 1.0) / (S_rest + 1.0))
    mean_counts = np.zeros((K, G), dtype=np.float64)
    np.divide(x_a, S, out=mean_counts, where=S > 0)
    return DEResult(
        group_names=tuple(group_names),
        feature_ids=np.asarray(feature_ids),
        feature_names=np.asarray(feature_names),
        stats=stats,
        params=params,
        pvalue=pvalue,
        test=test,
        adjusted_pvalue=adjusted,
        log2_fold_change=log2fc,
        mean_counts=mean_counts,
    )


def build_de_result(
    X: da.Array,
    codes: Any,
    *,
    group_names: Sequence[str],
    feature_ids: Any,
    feature_names: Any,
    big_count: int = BIG_COUNT,
    zeta_quantile: float = ZETA_QUANTILE,
    totals: Any = None,
    gene_block: int = GENE_BLOCK,
) -> Delayed:
    """Lazy :class:`DEResult`: every group against the rest (see :func:`build_de`)."""
    _check_matrix(X, "differential expression")
    names = [str(g) for g in group_names]
    if len(names) < 2:
        raise InputFormatError(
            f"differential expression needs at least 2 groups, got {len(names)} ({', '.join(names) or 'none'}); "
            "skip it for this sample"
        )
    if names != sorted(names) or len(set(names)) != len(names):
        raise InputFormatError("group_names must be unique and in Python sorted() order; pass sorted(set(labels))")
    n_genes = X.shape[1]
    feature_ids = np.asarray(feature_ids)
    feature_names = np.asarray(feature_names)
    if feature_ids.shape != (n_genes,) or feature_names.shape != (n_genes,):
        raise InputFormatError(
            f"the matrix has {n_genes} genes but {feature_ids.shape} feature ids and "
            f"{feature_names.shape} feature names were given; pass the Gene Expression features in matrix order"
        )
    if int(big_count) < 0:
        raise ConfigError(f"big_count must be non-negative, got {big_count}")
    if int(gene_block) < 1:
        raise ConfigError(f"gene_block must be at least 1, got {gene_block}")
    stats = de_statistics(X, codes, len(names), totals=totals)
    params = delayed(sseq_params, pure=True)(stats, zeta_quantile=zeta_quantile)
    bounds = [(lo, min(lo + int(gene_block), n_genes)) for lo in range(0, n_genes, int(gene_block))]
    blocks = [
        delayed(_sseq_block, pure=True)(stats, params, k, lo, hi, int(big_count))
        for k in range(len(names))
        for lo, hi in bounds
    ]
    return delayed(_assemble, pure=True)(stats, params, tuple(names), feature_ids, feature_names, *blocks)


def _to_frame(result: DEResult) -> pd.DataFrame:
    return result.to_frame()


def build_de(
    X: da.Array,
    codes: Any,
    *,
    group_names: Sequence[str],
    feature_ids: Any,
    feature_names: Any,
    big_count: int = BIG_COUNT,
    zeta_quantile: float = ZETA_QUANTILE,
    totals: Any = None,
    gene_block: int = GENE_BLOCK,
) -> Delayed:
    """Lazy DE table in Cell Ranger's layout, one group against the rest.

    Parameters
    ----------
    X
        Cells x Gene Expression features, dask array of CSR integer blocks chunked
        along cells only.
    codes
        Group code per cell, indexing ``group_names``.
    group_names
        At least 2 names, unique and in ``sorted()`` order (the column order).
    feature_ids, feature_names
        One per gene, in matrix order.
    big_count
        Both sums must exceed it for the asymptotic test.
    zeta_quantile
        Quantile of φmm that dispersions shrink towards.
    totals
        Per-cell totals if already built (``cell_totals(X)``).
    gene_block
        Genes per test task.

    Returns
    -------
    Delayed
        A delayed ``pandas.DataFrame``; use :func:`build_de_result` for raw p-values,
        test choice and the fitted parameters.
    """
    result = build_de_result(
        X, codes, group_names=group_names, feature_ids=feature_ids, feature_names=feature_names,
        big_count=big_count, zeta_quantile=zeta_quantile, totals=totals, gene_block=gene_block,
    )
    return delayed(_to_frame, pure=True)(result)


# ---------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------


def _format_float(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    return np.format_float_positional(v, unique=True, trim="-")


def _format_column(values: np.ndarray) -> np.ndarray:
    """Shortest round-trip positional strings, formatting each distinct bit pattern once."""
    v = np.ascontiguousarray(values, dtype=np.float64)
    bits, first, inverse = np.unique(v.view(np.int64), return_index=True, return_inverse=True)
    texts = np.array([_format_float(float(x)) for x in v[first]], dtype=object)
    return texts[inverse.ravel()]


def format_de_csv(df: pd.DataFrame) -> str:
    """The DE table as CSV text (RFC 4180: a field holding a comma, quote or line break is
    quoted, others are not), floats shortest round-trip and positional.

    Floats go through ``numpy.format_float_positional(v, unique=True, trim='-')``
    (``1``, ``0``, never an exponent); NaN is written ``NaN``, infinities ``inf``/``-inf``.
    Group names such as ``CD4-positive, CD25-positive, alpha-beta regulatory T cell``
    appear in the header quoted, so every CSV reader sees the right columns.
    """
    import csv
    import io

    cols = []
    for name in df.columns:
        values = df[name].to_numpy()
        if values.dtype.kind == "f":
            cols.append(_format_column(values))
        else:
            cols.append(np.asarray([str(x) for x in values], dtype=object))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow([str(c) for c in df.columns])
    w.writerows(zip(*cols))
    return buf.getvalue()


__all__ = [
    "BIG_COUNT",
    "ZETA_QUANTILE",
    "TEST_NAMES",
    "DEStatistics",
    "SSeqParams",
    "DEResult",
    "cell_totals",
    "de_statistics",
    "sseq_params",
    "exact_test",
    "asymptotic_test",
    "benjamini_hochberg",
    "build_de_result",
    "build_de",
    "format_de_csv",
]
