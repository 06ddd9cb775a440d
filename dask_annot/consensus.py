"""Consensus for small references: spread the vote over the query's own neighbour graph.

Why. With a small reference (a few thousand cells: the built-in models, or any
reference under 50,000 cells, see :func:`dask_annot.knn.neighbourhood`) each cell
is labelled from a few dozen reference neighbours found across a batch effect,
and a cell that sits between two reference classes (CD4 vs CD8 T, NK vs CD8 T) is
labelled by chance. Its neighbours *in the query* share its biology and its
batch, so their votes are evidence too. Label spreading (Zhou et al. 2004,
"Learning with local and global consistency") pools that evidence:

1. the query's own embedding: counts scaled to 10,000 per cell and log1p (as for
   the reference), the :data:`N_HVG` most dispersed genes of the query (the
   ``build-reference`` rule), z-scored with the query's own mean and standard
   deviation (clipped at 10), the top :data:`N_PCS` principal components (above
   :data:`BASIS_CELLS` cells, genes, mean, deviation and components come from an
   evenly spaced sample of about that many cells; every cell is projected);
2. the :data:`GRAPH_K` nearest other query cells of each cell, Euclidean, in that
   embedding: exact up to :data:`EXACT_MAX_CELLS` cells; above, searched within
   inverted lists (a two-level k-means puts the cells in lists of about
   :data:`LIST_CELLS`; a cell's candidates are the cells of the :data:`NEAR_LISTS`
   lists whose centroids are nearest its list's, its own included);
3. ``p0`` = each cell's vote scores (class-balanced neighbour counts) scaled to
   sum to 1; ``p <- (1 - ALPHA) * p0 + ALPHA * mean of p over the cell's
   neighbours``, :data:`ITERATIONS` times; the label is the largest ``p``.

Measured with ``benchmarks/accuracy.py`` (PBMC, shared 5-type level): reference
pbmc_sorted_zheng2017 -> pbmc4k 0.854 -> 0.889 accuracy; pbmc4k -> sorted
0.956 -> 0.964. The constants were chosen on those data and are sensitive: ALPHA
0.6 or 15 PCs lose about 0.01, 500 HVGs lose 0.03 in the second direction.

Every sum runs over fixed blocks of :data:`BLOCK_CELLS` cells in block order and
ties go to the lower index or label, so the result does not depend on
``--chunk-cells``, the number of workers or the scheduler.
"""
from __future__ import annotations

import dask
import numba
import numpy as np
import scipy.sparse as sp
from dask.delayed import Delayed

from . import store
from .build import pca_loadings, select_hvg
from .project import projection_terms, sparse_projection
from .normalize import clipped_zscore, gene_moments, log_normalize_block, mean_var

BLOCK_CELLS = 16_384
N_HVG = 1000
N_PCS = 30
CLIP = 10.0
GRAPH_K = 15
ALPHA = 0.8
ITERATIONS = 10
EXACT_MAX_CELLS = 50_000
LIST_CELLS = 200
NEAR_LISTS = 8
COARSE_LISTS = 64
KMEANS_ITER = 10
_GRAPH_TILE_CELLS = 50_000
BASIS_CELLS = 100_000
_TILE = 256


def parameters() -> dict:
    return {"method": "label spreading on the query's own kNN graph", "hvg": N_HVG, "pcs": N_PCS, "graph_k": GRAPH_K,
            "alpha": ALPHA, "iterations": ITERATIONS, "block_cells": BLOCK_CELLS, "basis_cells": BASIS_CELLS}


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + BLOCK_CELLS, n)) for s in range(0, n, BLOCK_CELLS)]


def _sample_rows(start: int, stop: int, step: int) -> np.ndarray:
    """Rows (relative to ``start``) of the cells ``start:stop`` whose index is a multiple of ``step``."""
    return np.arange(-(-start // step) * step, stop, step) - start


def _sample(path: str, start: int, stop: int, n_features: int, step: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts and UMI totals of every ``step``-th cell (by index) of the cells ``start:stop``."""
    block, umi = store.read_block(path, start, stop, n_features), store.read_umi(path, start, stop)
    if step > 1:
        rows = _sample_rows(start, stop, step)
        block, umi = block[rows], np.asarray(umi)[rows]
    return block, umi


def _stats_block(path, start, stop, n_features, step=1):
    """Gene moments of the block's sampled cells, and those cells (for the Gram pass: the
    store is read once for both)."""
    block, umi = _sample(path, start, stop, n_features, step)
    return gene_moments(log_normalize_block(block, umi, 1e4)), (block, umi)


def _genes(stats: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The query's variable genes with their mean and std, from per-block moments summed in
    block order (so the sums never depend on who computed what); None with fewer than 2."""
    s1 = sum(a for (a, _, _), _ in stats)
    s2 = sum(b for (_, b, _), _ in stats)
    nexpr = sum(c for (_, _, c), _ in stats)
    mean_all, var_all = mean_var(s1, s2, n)
    hvg = select_hvg(mean_all, var_all, nexpr, N_HVG)
    if hvg.size < 2:
        return None
    std = np.sqrt(var_all[hvg])
    std[std == 0] = 1.0
    return hvg, mean_all[hvg], std


def _z(block: sp.csr_matrix, umi: np.ndarray, genes) -> np.ndarray:
    hvg, mean, std = genes
    return clipped_zscore(log_normalize_block(block[:, hvg], umi, 1e4).toarray(), mean, std, CLIP)


def _gram_block(stats_block, genes):
    if genes is None:
        return None
    z = _z(*stats_block[1], genes)
    return z.T @ z, z.sum(axis=0)


def _basis(grams: list, n: int):
    """Centre and PCA loadings of the z-scores from per-block Gram matrices (block order)."""
    if grams[0] is None:
        return None
    gram = sum(g for g, _ in grams)
    centre = sum(c for _, c in grams) / n
    cov = gram - n * np.outer(centre, centre)
    return centre, pca_loadings(cov, min(N_PCS, gram.shape[0] - 1)).astype(np.float64)


def _project_block(path, start, stop, n_features, genes, basis):
    if basis is None:
        return None
    hvg, mean, std = genes
    centre, loadings = basis
    block, umi = _sample(path, start, stop, n_features, 1)
    logn = log_normalize_block(block[:, hvg], umi, 1e4)  # sparse: no dense z-matrix of every cell
    return sparse_projection(logn, projection_terms(loadings, mean, std), mean, std, CLIP) - centre @ loadings


def _concat(parts: list) -> np.ndarray | None:
    return None if parts[0] is None else np.concatenate(parts, axis=0)


def basis_step(n: int) -> int:
    """Every how many cells the variable genes and the PCA basis are computed from: all cells
    up to :data:`BASIS_CELLS`, an evenly spaced sample of about that many above (the
    projection always covers every cell)."""
    return max(1, -(-n // BASIS_CELLS))


def query_embedding(st: store.StoreInfo) -> Delayed:
    """Lazy: the query's own PCA coordinates (cells x PCs, float64), or None when it has
    no variable genes. Two passes over the store in :data:`BLOCK_CELLS`-cell tasks: gene
    moments of every :func:`basis_step`-th cell, which are kept in memory for the Gram
    matrix of their z-scored variable genes (about :data:`BASIS_CELLS` cells' counts),
    then the projection of every cell."""
    n, G, path = st.n_cells, st.n_features, st.path
    blocks = _blocks(n)
    step = basis_step(n)
    n_basis = len(range(0, n, step))
    stats = [dask.delayed(_stats_block, pure=True)(path, a, b, G, step) for a, b in blocks]
    genes = dask.delayed(_genes, pure=True)(stats, n_basis)
    grams = [dask.delayed(_gram_block, pure=True)(st_, genes) for st_ in stats]
    basis = dask.delayed(_basis, pure=True)(grams, n_basis)
    parts = [dask.delayed(_project_block, pure=True)(path, a, b, G, genes, basis) for a, b in blocks]
    return dask.delayed(_concat, pure=True)(parts)


@numba.njit(cache=True, nogil=True)
def _select_ids(d2, row_ids, col_ids, k, out_idx):  # pragma: no cover - compiled
    """Per row of ``d2``, the ids of its ``k`` smallest columns other than its own id; ties to
    the earlier column (``col_ids`` ascending: to the lower id)."""
    t, n = d2.shape
    bd = np.empty(k, dtype=np.float64)
    bi = np.empty(k, dtype=np.int64)
    for r in range(t):
        i = row_ids[r]
        for q in range(k):
            bd[q] = np.inf
            bi[q] = -1
        worst = np.inf
        filled = 0
        for j in range(n):
            if col_ids[j] == i:
                continue
            d = d2[r, j]
            if filled < k or d < worst:
                p = filled if filled < k else k - 1
                while p > 0 and bd[p - 1] > d:
                    bd[p] = bd[p - 1]
                    bi[p] = bi[p - 1]
                    p -= 1
                bd[p] = d
                bi[p] = col_ids[j]
                if filled < k:
                    filled += 1
                worst = bd[k - 1]
        for q in range(k):
            out_idx[r, q] = bi[q]


def _exact_tile(y: np.ndarray | None, start: int, stop: int, k: int) -> np.ndarray | None:
    if y is None:
        return None
    sq = np.einsum("ij,ij->i", y, y)
    d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (y[start:stop] @ y.T)
    out = np.full((stop - start, k), -1, dtype=np.int64)
    _select_ids(d2, np.arange(start, stop), np.arange(y.shape[0]), k, out)
    return out


def _kmeans(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Centroids of a Euclidean k-means (Lloyd, :data:`KMEANS_ITER` rounds, seeded start;
    an empty cluster keeps its centroid)."""
    n_clusters = max(1, min(n_clusters, x.shape[0]))
    cent = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], n_clusters, replace=False))].copy()
    for _ in range(KMEANS_ITER):
        lab = _nearest(x, cent)
        sums = np.zeros_like(cent)
        np.add.at(sums, lab, x)
        size = np.bincount(lab, minlength=n_clusters)
        cent = np.where(size[:, None] > 0, sums / np.maximum(size, 1)[:, None], cent)
    return cent


def _nearest(x: np.ndarray, cent: np.ndarray, block: int = 65_536) -> np.ndarray:
    """Each row's nearest centroid (Euclidean; ties to the lowest index)."""
    out = np.empty(x.shape[0], np.int64)
    norms = np.einsum("ij,ij->i", cent, cent)
    for lo in range(0, x.shape[0], block):
        out[lo : lo + block] = np.argmin(norms[None, :] - 2.0 * (x[lo : lo + block] @ cent.T), axis=1)
    return out


def _partition(y: np.ndarray | None) -> tuple | None:
    """The query's cells in lists of about :data:`LIST_CELLS` (two-level k-means:
    :data:`COARSE_LISTS` clusters, each split into lists), as (cells in list order, list
    offsets, each list's :data:`NEAR_LISTS` nearest lists by centroid, itself first)."""
    if y is None:
        return None
    from threadpoolctl import threadpool_limits

    n = y.shape[0]
    with threadpool_limits(limits=1, user_api="blas"):  # the same sums whatever the machine's thread count
        coarse = _nearest(y, _kmeans(y[:: max(1, n // 50_000)], COARSE_LISTS, seed=0))
        lists = np.empty(n, np.int64)
        n_lists = 0
        for c in range(COARSE_LISTS):
            rows = np.flatnonzero(coarse == c)
            if rows.size == 0:
                continue
            fine = max(1, int(round(rows.size / LIST_CELLS)))
            lists[rows] = n_lists + _nearest(y[rows], _kmeans(y[rows[:: max(1, rows.size // 20_000)]], fine, seed=c + 1))
            n_lists += fine
        order = np.argsort(lists, kind="stable")
        size = np.bincount(lists, minlength=n_lists)
        offsets = np.concatenate([[0], np.cumsum(size)])
        cent = np.zeros((n_lists, y.shape[1]))
        np.add.at(cent, lists, y)
        cent /= np.maximum(size, 1)[:, None]
        norms = np.einsum("ij,ij->i", cent, cent)
        near = min(NEAR_LISTS, n_lists)
        adj = np.empty((n_lists, near), np.int64)
        for lo in range(0, n_lists, 1024):
            hi = min(lo + 1024, n_lists)
            d = norms[lo:hi, None] + norms[None, :] - 2.0 * (cent[lo:hi] @ cent.T)
            d[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # each list searches itself
            d[:, size == 0] = np.inf
            pick = np.argpartition(d, near - 1, axis=1)[:, :near]
            adj[lo:hi] = np.take_along_axis(pick, np.argsort(np.take_along_axis(d, pick, axis=1), axis=1, kind="stable"), axis=1)
    return order, offsets, adj


def _list_tile(y: np.ndarray | None, part: tuple | None, tile: int, n_tiles: int, k: int) -> tuple | None:
    """Each cell of the ``tile``-th of ``n_tiles`` equal runs of lists: its ``k`` nearest other
    cells among the cells of its list's nearest lists (float64, ties to the lower index), as
    (cells, neighbours). Each list is searched alone, so the tiling changes nothing."""
    if y is None:
        return None
    from threadpoolctl import threadpool_limits

    order, offsets, adj = part
    n_lists = adj.shape[0]
    rows_out, nbr_out = [], []
    with threadpool_limits(limits=1, user_api="blas"):
        for lst in range(tile * n_lists // n_tiles, (tile + 1) * n_lists // n_tiles):
            q = order[offsets[lst] : offsets[lst + 1]]
            if q.size == 0:
                continue
            cand = np.sort(np.concatenate([order[offsets[m] : offsets[m + 1]] for m in adj[lst]]))
            yq, yc = y[q], y[cand]
            sq = np.einsum("ij,ij->i", yc, yc)
            d2 = np.einsum("ij,ij->i", yq, yq)[:, None] + sq[None, :] - 2.0 * (yq @ yc.T)
            out = np.full((q.size, k), -1, dtype=np.int64)
            _select_ids(d2, q, cand, k, out)
            rows_out.append(q)
            nbr_out.append(out)
    if not rows_out:
        return np.empty(0, np.int64), np.empty((0, k), np.int64)
    return np.concatenate(rows_out), np.concatenate(nbr_out)


def _list_graph(y: np.ndarray | None, tiles: list, k: int) -> np.ndarray | None:
    if y is None:
        return None
    out = np.full((y.shape[0], k), -1, dtype=np.int64)
    for rows, nbr in tiles:
        out[rows] = nbr
    return out


def _graph_result(y: np.ndarray | None, parts: list, how: str) -> dict:
    if y is None:
        return {"nbr": None, "how": "none: the query has fewer than 2 variable genes", "pcs": 0}
    nbr = parts[0] if len(parts) == 1 and parts[0].shape[0] == y.shape[0] else np.concatenate(parts, axis=0)
    return {"nbr": nbr, "how": how, "pcs": int(y.shape[1])}


def graph_of(y, n: int, k: int = GRAPH_K) -> Delayed:
    """Lazy: each of ``n`` cells' ``k`` nearest other cells in the embedding ``y`` (an array,
    or a Delayed of one or of None), as ``{"nbr": int64 n x k (-1 where fewer), "how": text,
    "pcs": int}``; ``nbr`` is None when ``y`` is. Euclidean, ties to the lower index; exact up
    to :data:`EXACT_MAX_CELLS` cells, within inverted lists above (:func:`_partition`).

    Why lists and not pynndescent (used until stop 19): at 1.2M cells pynndescent cost 25 s
    of compilation in every new process and 74 CPU s of search, one task; the lists cost
    about 30 CPU s in parallel tasks (benchmarks/bench_query_graph.py)."""
    k_eff = min(k, n - 1)
    if k_eff < 1:
        return dask.delayed({"nbr": np.full((n, max(k, 1)), -1, dtype=np.int64), "how": "none (one cell)", "pcs": 0})
    y = y if isinstance(y, Delayed) else dask.delayed(y, pure=True, traverse=False)
    if n <= EXACT_MAX_CELLS:
        tiles = [dask.delayed(_exact_tile, pure=True)(y, s, min(s + _TILE, n), k_eff) for s in range(0, n, _TILE)]
        return dask.delayed(_graph_result, pure=True)(y, tiles, "exact")
    part = dask.delayed(_partition, pure=True)(y)
    n_tiles = max(1, n // _GRAPH_TILE_CELLS)
    tiles = [dask.delayed(_list_tile, pure=True)(y, part, t, n_tiles, k_eff) for t in range(n_tiles)]
    g = dask.delayed(_list_graph, pure=True)(y, tiles, k_eff)
    return dask.delayed(_graph_result, pure=True)(y, [g], f"inverted lists (about {LIST_CELLS} cells each, {NEAR_LISTS} nearest lists searched)")


def query_graph(st: store.StoreInfo, k: int = GRAPH_K) -> Delayed:
    """Lazy: the query's own kNN graph (:func:`graph_of` on :func:`query_embedding`), built
    once per run and shared by everything that pools evidence over the query's neighbours."""
    return graph_of(query_embedding(st), st.n_cells, k)


@numba.njit(cache=True)
def _spread(p0, nbr, keep, alpha, iterations):  # pragma: no cover - compiled
    n, L = p0.shape
    k = nbr.shape[1]
    p = p0.copy()
    new = np.empty_like(p0)
    acc = np.empty(L, dtype=np.float64)
    for _ in range(iterations):
        for i in range(n):
            if not keep[i]:
                new[i] = 0.0
                continue
            acc[:] = 0.0
            m = 0
            for j in range(k):
                r = nbr[i, j]
                if r >= 0 and keep[r]:
                    acc += p[r]
                    m += 1
            if m == 0:
                new[i] = p[i]
            else:
                new[i] = (1.0 - alpha) * p0[i] + alpha * acc / m
        p, new = new, p
    return p


def spread(p0: np.ndarray, nbr: np.ndarray, *, alpha: float = ALPHA, iterations: int = ITERATIONS,
           keep: np.ndarray | None = None) -> np.ndarray:
    """Label spreading of per-cell label distributions ``p0`` (cells x labels) over the graph ``nbr``.

    ``keep`` (bool per cell, default all): cells outside it (rejected as unlike the
    reference) neither send nor receive evidence; their rows of the result are zero.
    """
    p0 = np.ascontiguousarray(p0, dtype=np.float64)
    if p0.shape[0] == 0:
        return p0
    keep = np.ones(p0.shape[0], dtype=np.bool_) if keep is None else np.ascontiguousarray(keep, dtype=np.bool_)
    p0 = np.where(keep[:, None], p0, 0.0)
    return _spread(p0, np.ascontiguousarray(nbr, dtype=np.int64), keep, float(alpha), int(iterations))


def apply(votes: np.ndarray, counts: np.ndarray, p0: np.ndarray, graph: dict, *, log=print,
          keep: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Votes relabelled by label spreading over the query graph (:func:`query_graph`'s
    result), and what was done (for run.json). See :func:`apply_with_scores`."""
    out, rec, _ = apply_with_scores(votes, counts, p0, graph, log=log, keep=keep)
    return out, rec


def apply_with_scores(votes: np.ndarray, counts: np.ndarray, p0: np.ndarray, graph: dict, *, log=print,
                      keep: np.ndarray | None = None) -> tuple[np.ndarray, dict, np.ndarray]:
    """Votes relabelled by label spreading, what was done (for run.json), and the per-label
    shares behind the labels (cells x labels; ``p0`` where nothing was spread).

    ``fine`` becomes the largest spread share (ties to the first label); ``count``
    the neighbours in the reference carrying it (``cell_count_in_model``, as 10x);
    ``prob`` its spread share. A cell with no evidence at all keeps its vote, and so
    does a cell outside ``keep`` (rejected: it is written ``Unassigned``), which also
    lends no evidence to its neighbours.
    """
    rec = parameters()
    if graph["nbr"] is None:
        rec.update(applied=False, reason=f"no query graph ({graph['how']})")
        log(f"consensus skipped: {graph['how']}")
        return votes, rec, np.asarray(p0, dtype=np.float64)
    keep_mask = np.ones(len(votes), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    p = spread(p0, graph["nbr"], keep=keep_mask)
    total = p.sum(axis=1)
    fine = np.argmax(p, axis=1).astype(np.int32)
    has = (total > 0) & keep_mask
    out = votes.copy()
    out["fine"] = np.where(has, fine, votes["fine"])
    rows = np.arange(len(out))
    out["count"] = counts[rows, out["fine"]]
    share = np.divide(p[rows, out["fine"]], total, out=np.zeros(len(out)), where=has)
    out["prob"] = np.where(has, share, votes["prob"]).astype(np.float32)
    p = np.where(has[:, None], np.divide(p, total[:, None], out=np.zeros_like(p), where=total[:, None] > 0), p0)
    changed = int(np.count_nonzero(out["fine"] != votes["fine"]))
    rec.update(applied=True, graph_search=graph["how"], pcs_used=graph["pcs"], cells_relabelled=changed,
               cells_held_out=int((~keep_mask).sum()))
    log(f"consensus: label spreading over the query's {graph['how']} {GRAPH_K}-NN graph relabelled {changed} of {len(out)} cells")
    return out, rec, p
