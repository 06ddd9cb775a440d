"""Nearest reference cells of each query cell, in the reference PCA space.

Distances are between embeddings scaled to unit length (cosine, or angular,
distance): a cell's depth and quality shift its embedding along a common
direction, which the angle ignores (measured on the PBMC data: +2 to +6 points
of accuracy over Euclidean). Two searches, chosen per reference size: exact (a
float32 BLAS screen, then float64 re-scoring of the few per cent of candidates)
and approximate (pynndescent, for references above 400,000 cells). Each block kernel is pure and
row-wise, so a cell's neighbours do not depend on which chunk it is in.
Results are a record array per cell: ``idx`` (int32, -1 where no neighbour was
found) and ``dist`` (float32, ``inf`` there), sorted by (distance, index).
"""
from __future__ import annotations

from typing import Literal

import dask.array as da
import numba
import numpy as np

from .normalize import check_cell_chunked

Method = Literal["exact", "ann"]
EXACT_MAX_REFERENCE_CELLS = 400_000
ANN_BATCH_CELLS = 2048
# exact search: query cells per BLAS tile, reference cells per tile, and the screen
_Q_TILE = 256
_R_TILE = 8192
_SCREEN_SAMPLE = 2048  # reference cells (evenly spaced) that set each query's screening threshold
_SCREEN_MARGIN = 1e-4  # screen below the threshold by this much (float32 dot error is < 2e-6)
_F32_DOT_ERROR = 1e-5  # a bound on |float32 BLAS dot - float64 dot| for unit vectors of <= 100 dims


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def neighbor_dtype(k: int) -> np.dtype:
    return np.dtype([("idx", np.int32, (k,)), ("dist", np.float32, (k,))])


def choose_method(n_reference_cells: int, requested: str = "auto") -> Method:
    """The search for a reference size: ``exact`` up to :data:`EXACT_MAX_REFERENCE_CELLS`
    reference cells, ``ann`` (pynndescent) above.

    Measured against a 100,000-cell reference at k=500, one thread per chunk
    (benchmarks/bench_scale.py): exact 2.9 s per 10k query cells; faiss' flat index
    (float32) took 8.8 s, pynndescent 12.2 s. The exact search releases the GIL, so
    it scales with Dask threads; pynndescent's search does not.
    """
    if requested in ("exact", "ann"):
        return requested  # type: ignore[return-value]
    if requested not in ("auto", None):
        raise ValueError(f"unknown kNN method {requested!r}: auto, exact or ann")
    return "exact" if n_reference_cells <= EXACT_MAX_REFERENCE_CELLS else "ann"


def screen_arrays(embedding_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact search's float32 screen: the unit embedding transposed (PCs x cells),
    and the same for about :data:`_SCREEN_SAMPLE` evenly spaced reference cells."""
    t = np.ascontiguousarray(np.asarray(embedding_unit).T, dtype=np.float32)
    step = max(1, t.shape[1] // _SCREEN_SAMPLE)
    return t, np.ascontiguousarray(t[:, ::step])


@numba.njit(nogil=True, cache=True)
def _screen_tile(dots, floor, offset, q64, ref64, cand, cval, count):  # pragma: no cover - compiled
    """Keep, for each query, the reference cells of this tile whose float32 dot is >= its
    floor, re-scored in float64 in a fixed order (while the tile is in cache)."""
    n, m = dots.shape
    d = q64.shape[1]
    cap = cand.shape[1]
    for i in range(n):
        f = floor[i]
        c = count[i]
        for j in range(m):
            if dots[i, j] >= f:
                if c < cap:
                    r = offset + j
                    s = 0.0
                    for t in range(d):
                        s += q64[i, t] * ref64[r, t]
                    cand[i, c] = r
                    cval[i, c] = s
                c += 1
        count[i] = c


@numba.njit(nogil=True, cache=True)
def _full_dots(q64, ref64):  # pragma: no cover - compiled
    """Float64 dots in the same fixed order as :func:`_screen_tile` (the rare full search)."""
    n, d = q64.shape
    out = np.empty((n, ref64.shape[0]), np.float64)
    for i in range(n):
        for r in range(ref64.shape[0]):
            s = 0.0
            for t in range(d):
                s += q64[i, t] * ref64[r, t]
            out[i, r] = s
    return out


def _top_k_rows(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest ``vals`` ordered by (value descending, index ascending).

    ``idx`` must increase along each row, so that among values tied with the k-th
    the first columns are the lowest indices: the selection then does not depend
    on the row's width or on how a partition orders ties.
    """
    if vals.shape[1] > k:
        kth = -np.partition(-vals, k - 1, axis=1)[:, k - 1 : k]
        above = vals > kth
        tied = vals == kth
        need = k - above.sum(axis=1, keepdims=True)
        take = above | (tied & (np.cumsum(tied, axis=1) <= need))
        rows, cols = np.nonzero(take)  # row-major: exactly k per row, columns ascending
        cols = cols.reshape(vals.shape[0], k)
        vals = np.take_along_axis(vals, cols, axis=1)
        idx = np.take_along_axis(idx, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # columns ascend in index: ties stay by index
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _exact_block(q: np.ndarray, model, k: int) -> np.ndarray:
    """Exact k nearest reference cells (cosine), in float64, ties by reference index.

    A float32 BLAS pass over the whole reference screens candidates: each query's
    threshold is its ``m``-th best dot among :data:`_SCREEN_SAMPLE` evenly spaced
    reference cells, with ``m`` set so about 2k reference cells pass; every cell
    above threshold minus a margin is kept (a few per cent of the reference).
    Candidates are then re-scored in float64 in a fixed order (numba), and the
    screen is checked to have kept the true top k (else that query is searched in
    full). The float32 values vary with BLAS tiling and thread count, the result
    does not: it is the float64 top k whatever the chunking, scheduler or BLAS.
    """
    ref64 = np.ascontiguousarray(model.embedding_unit)  # a no-op on the Model's (C-ordered) array
    n_ref = ref64.shape[0]
    k_out, k = k, min(k, n_ref)
    q64 = np.ascontiguousarray(unit_rows(np.asarray(q, dtype=np.float64)))
    ref_t32, sample_t32 = model.screen_arrays
    n = q64.shape[0]
    n_sample = sample_t32.shape[1]
    stride = n_ref / n_sample
    m = int(np.ceil(2 * k / stride)) + 2
    cap = int(min(n_ref, max(4096, 8 * k)))
    out_idx = np.empty((n, k), np.int32)
    out_dist = np.empty((n, k), np.float64)
    for lo in range(0, n, _Q_TILE):
        qs64 = q64[lo : lo + _Q_TILE]
        qs = qs64.astype(np.float32)
        nq = qs.shape[0]
        if m >= n_sample:
            floor = np.full(nq, -np.inf, dtype=np.float32)
            sure = np.full(nq, -np.inf)
        else:
            sd = qs @ sample_t32
            thr = -np.partition(-sd, m - 1, axis=1)[:, m - 1].astype(np.float64)
            floor = (thr - _SCREEN_MARGIN).astype(np.float32)
            sure = floor.astype(np.float64) + _F32_DOT_ERROR
        cand = np.empty((nq, cap), np.int32)
        cval = np.empty((nq, cap), np.float64)
        count = np.zeros(nq, np.int64)
        for r0 in range(0, n_ref, _R_TILE):
            _screen_tile(qs @ ref_t32[:, r0 : r0 + _R_TILE], floor, r0, qs64, ref64, cand, cval, count)
        width = int(min(cap, max(k, count.max())))
        pos = np.arange(width)
        keep = pos[None, :] < count[:, None]
        vals = np.where(keep, cval[:, :width], -np.inf)
        ids = np.where(keep, cand[:, :width], np.iinfo(np.int32).max)
        vals, ids = _top_k_rows(vals, ids, k)
        # the screen kept the true top k if the k-th best is above the floor + the float32 error
        redo = np.flatnonzero((count > cap) | (count < k) | (vals[:, k - 1] < sure))
        if redo.size:
            full = _full_dots(qs64[redo], ref64)
            vals[redo], ids[redo] = _top_k_rows(full, np.broadcast_to(np.arange(n_ref, dtype=np.int32), full.shape), k)
        out_idx[lo : lo + nq] = ids
        out_dist[lo : lo + nq] = np.sqrt(np.maximum(2.0 - 2.0 * vals, 0.0))
    out = np.empty(n, dtype=neighbor_dtype(k_out))
    out["idx"][:, :k] = out_idx
    out["dist"][:, :k] = out_dist
    out["idx"][:, k:] = -1
    out["dist"][:, k:] = np.inf
    return out


def _sorted_records(idx, dist, k: int) -> np.ndarray:
    """Neighbour records sorted by (distance, index); missing neighbours (index < 0 or a
    non-finite distance) last, as index -1 and distance inf."""
    idx = np.asarray(idx, dtype=np.int64).copy()
    dist = np.asarray(dist, dtype=np.float64).copy()
    bad = ~np.isfinite(dist) | (idx < 0)
    dist[bad] = np.inf
    idx[bad] = np.iinfo(np.int32).max
    order = np.lexsort((idx, dist), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    idx[~np.isfinite(dist)] = -1
    out = np.empty(idx.shape[0], dtype=neighbor_dtype(k))
    out["idx"] = idx
    out["dist"] = dist.astype(np.float32)
    return out


def _ann_block(q: np.ndarray, model, k: int, epsilon: float) -> np.ndarray:
    idx, dist = model.ann_index().query(unit_rows(q).astype(np.float32), k=k, epsilon=epsilon)
    return _sorted_records(idx, dist, k)


def _neighbors_block(q: np.ndarray, model, k: int, method: str, epsilon: float) -> np.ndarray:
    if q.shape[0] == 0:
        return np.empty(0, dtype=neighbor_dtype(k))
    if method == "exact":
        return _exact_block(q, model, k)
    return _ann_block(q, model, k, epsilon)


def neighbors(emb: da.Array, model, *, k: int, method: Method, epsilon: float = 0.2) -> da.Array:
    """Lazy per-cell record array of the ``k`` nearest reference cells.

    pynndescent's serial search carries one random state through a batch, so a
    cell's approximate neighbours depend on its place in the batch. The ANN
    search therefore runs on fixed batches of :data:`ANN_BATCH_CELLS` cells at
    fixed positions of the matrix, whatever ``--chunk-cells`` or the number of
    workers. The exact search's result does not depend on the batch (see
    :func:`_exact_block`) and keeps the given chunks.
    """
    check_cell_chunked(emb, "neighbors")
    if method == "ann":
        from .store import cell_chunks

        emb = emb.rechunk({0: cell_chunks(emb.shape[0], ANN_BATCH_CELLS), 1: -1})
    return da.map_blocks(
        _neighbors_block, emb, model, k, method, epsilon,
        dtype=neighbor_dtype(k), chunks=(emb.chunks[0],), drop_axis=1,
        meta=np.empty(0, dtype=neighbor_dtype(k)),
    )


def neighbourhood(k: int, n_reference_cells: int) -> tuple[int, str]:
    """The neighbourhood actually used for a requested ``k``, and the rule that set it.

    10x votes among 500 neighbours in references of tens of millions of cells.
    In a small reference, 500 cells are a large share of it and the biggest
    classes win every vote (measured on the PBMC data: 0.52 accuracy at k=500
    against 0.95 at k=30 with a 2,150-cell reference). So a neighbourhood never
    exceeds 1% of the reference (and never falls below 15 cells): from 50,000
    reference cells up, k=500 is used as requested.
    """
    cap = max(15, n_reference_cells // 100)
    if k <= cap:
        return k, "as requested"
    return min(k, cap, n_reference_cells), f"small reference: k capped at max(15, 1% of {n_reference_cells} reference cells)"


def build_ann_index(embedding: np.ndarray, *, seed: int, n_neighbors: int = 30):
    """A pynndescent index over the reference embedding, deterministic for a seed."""
    from pynndescent import NNDescent

    index = NNDescent(
        unit_rows(embedding).astype(np.float32), metric="euclidean", n_neighbors=n_neighbors,
        random_state=seed, n_jobs=1, low_memory=True, compressed=False, parallel_batch_queries=False,
    )
    index.prepare()
    return index
