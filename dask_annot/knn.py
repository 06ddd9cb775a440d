"""Nearest reference cells of each query cell, in the reference PCA space.

Distances are between embeddings scaled to unit length (cosine, or angular,
distance): a cell's depth and quality shift its embedding along a common
direction, which the angle ignores (measured on the PBMC data: +2 to +6 points
of accuracy over Euclidean). Two searches, chosen per reference: exact (brute force in float64, cheaper than
an index below a few tens of thousands of reference cells, and exact) and
approximate (pynndescent, for large references). Each block kernel is pure and
row-wise, so a cell's neighbours do not depend on which chunk it is in.
Results are a record array per cell: ``idx`` (int32, -1 where no neighbour was
found) and ``dist`` (float32, ``inf`` there), sorted by (distance, index).
"""
from __future__ import annotations

from typing import Literal

import dask.array as da
import numpy as np

from .normalize import check_cell_chunked

Method = Literal["exact", "flat", "ann"]
EXACT_MAX_REFERENCE_CELLS = 50_000
FLAT_MAX_REFERENCE_CELLS = 400_000
ANN_BATCH_CELLS = 2048
_EXACT_ROWS = 256


def neighbor_dtype(k: int) -> np.dtype:
    return np.dtype([("idx", np.int32, (k,)), ("dist", np.float32, (k,))])


def choose_method(n_reference_cells: int, requested: str = "auto") -> Method:
    """The search for a reference size.

    ``exact`` (NumPy, float64) up to :data:`EXACT_MAX_REFERENCE_CELLS` reference
    cells; ``flat`` (faiss' brute-force index: exact in float32, blocked BLAS and a
    k-heap per query, releases the GIL) up to :data:`FLAT_MAX_REFERENCE_CELLS`;
    ``ann`` (pynndescent) above. Measured on a quiet machine against a 100,000-cell reference at k=500
    (benchmarks/bench_scale.py): 10.2 s per 10k cells per thread with faiss,
    12.2 s with pynndescent; faiss releases the GIL, pynndescent's search does
    not, so only faiss scales with threads.
    """
    if requested in ("exact", "flat", "ann"):
        return requested  # type: ignore[return-value]
    if n_reference_cells <= EXACT_MAX_REFERENCE_CELLS:
        return "exact"
    return "flat" if n_reference_cells <= FLAT_MAX_REFERENCE_CELLS else "ann"


def _exact_block(q: np.ndarray, model, k: int) -> np.ndarray:
    from .reference import unit_rows

    ref = model.embedding_unit
    ref_sq = model.embedding_sq
    n = q.shape[0]
    out = np.empty(n, dtype=neighbor_dtype(k))
    q64 = unit_rows(q)
    for lo in range(0, n, _EXACT_ROWS):
        qs = q64[lo : lo + _EXACT_ROWS]
        d2 = (qs * qs).sum(axis=1)[:, None] + ref_sq[None, :] - 2.0 * (qs @ ref.T)
        np.maximum(d2, 0.0, out=d2)
        if k < d2.shape[1]:
            part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(d2.shape[1]), d2.shape).copy()
        pd = np.take_along_axis(d2, part, axis=1)
        order = np.lexsort((part, pd), axis=1)
        out["idx"][lo : lo + qs.shape[0]] = np.take_along_axis(part, order, axis=1)
        out["dist"][lo : lo + qs.shape[0]] = np.sqrt(np.take_along_axis(pd, order, axis=1))
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
    from .reference import unit_rows

    idx, dist = model.ann_index().query(unit_rows(q).astype(np.float32), k=k, epsilon=epsilon)
    return _sorted_records(idx, dist, k)


def _flat_block(q: np.ndarray, model, k: int) -> np.ndarray:
    from .reference import unit_rows

    dist2, idx = model.flat_index().search(np.ascontiguousarray(unit_rows(q), dtype=np.float32), k)
    return _sorted_records(idx, np.sqrt(np.maximum(dist2.astype(np.float64), 0.0)), k)


def _neighbors_block(q: np.ndarray, model, k: int, method: str, epsilon: float) -> np.ndarray:
    if q.shape[0] == 0:
        return np.empty(0, dtype=neighbor_dtype(k))
    if method == "exact":
        return _exact_block(q, model, k)
    if method == "flat":
        return _flat_block(q, model, k)
    return _ann_block(q, model, k, epsilon)


def neighbors(emb: da.Array, model, *, k: int, method: Method, epsilon: float = 0.2) -> da.Array:
    """Lazy per-cell record array of the ``k`` nearest reference cells.

    pynndescent's serial search carries one random state through a batch, so a
    cell's approximate neighbours depend on its place in the batch. The ANN
    search therefore runs on fixed batches of :data:`ANN_BATCH_CELLS` cells at
    fixed positions of the matrix, whatever ``--chunk-cells`` or the number of
    workers; faiss' flat search too (it takes a BLAS or a SIMD path by batch
    size). NumPy exact search is row-wise and keeps the given chunks.
    """
    check_cell_chunked(emb, "neighbors")
    if method in ("ann", "flat"):  # faiss' float32 kernels differ by batch size too (BLAS vs SIMD path)
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
