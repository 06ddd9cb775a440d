"""Vote: a cell's label is the most common label among its nearest reference cells.

``fine`` is the plurality label, ``count`` how many neighbours carry it
(10x's ``cell_count_in_model``), ``prob`` a distance-weighted share of the
neighbours that carry it (``final_level_softmax_prob``): each neighbour weighs
``exp(-d^2 / (2 sigma^2))`` with ``sigma`` the cell's median neighbour distance,
so near neighbours count more and the weights need no global scale.
With ``balanced`` (small references) the plurality is over counts divided by
each label's reference class size. Ties in count go to the larger weighted share, then to the label that sorts
first, so the result never depends on neighbour order or chunking.
"""
from __future__ import annotations

import dask.array as da
import numpy as np

VOTE_DTYPE = np.dtype([("fine", np.int32), ("count", np.int32), ("prob", np.float32), ("n_neighbors", np.int32)])


def _weights(dist: np.ndarray, valid: np.ndarray) -> np.ndarray:
    d = np.where(valid, dist.astype(np.float64), np.nan)
    with np.errstate(all="ignore"):
        sigma = np.nanmedian(d, axis=1)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, 1.0)
    w = np.exp(-0.5 * (np.nan_to_num(d, nan=0.0) / sigma[:, None]) ** 2)
    return np.where(valid, w, 0.0)


def label_counts(nbrs: np.ndarray, label_codes: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell and label: neighbour count (int64) and weight sum (float64)."""
    idx = nbrs["idx"]
    valid = idx >= 0
    n = idx.shape[0]
    labels = np.where(valid, label_codes[np.where(valid, idx, 0)], 0)
    flat = (np.arange(n)[:, None] * n_labels + labels)[valid]
    counts = np.bincount(flat, minlength=n * n_labels).reshape(n, n_labels)
    w = _weights(nbrs["dist"], valid)
    wsum = np.bincount(flat, weights=w[valid], minlength=n * n_labels).reshape(n, n_labels)
    return counts, wsum.astype(np.float64)  # bincount of nothing is int64


def _vote_block(nbrs: np.ndarray, model, balanced: bool) -> np.ndarray:
    n_labels = len(model.labels)
    counts, wsum = label_counts(nbrs, model.label_codes, n_labels)
    if balanced:
        # each class votes in proportion to its share of the reference, so the
        # reference's composition does not decide the label (small references)
        inv = 1.0 / np.maximum(model.class_sizes, 1)
        score = counts * inv
        wsum = wsum * inv
    else:
        score = counts.astype(np.float64)
    total_w = wsum.sum(axis=1)
    share = np.divide(wsum, total_w[:, None], out=np.zeros_like(wsum), where=total_w[:, None] > 0)
    # plurality by (balanced) count, then weighted share, then the first label (lexsort: last key is primary)
    order = np.lexsort((np.broadcast_to(np.arange(n_labels), counts.shape), -share, -score), axis=1)
    fine = order[:, 0]
    rows = np.arange(counts.shape[0])
    out = np.empty(counts.shape[0], dtype=VOTE_DTYPE)
    out["fine"] = fine
    out["count"] = counts[rows, fine]
    out["prob"] = share[rows, fine]
    out["n_neighbors"] = counts.sum(axis=1)
    return out


def vote(nbrs: da.Array, model, *, balanced: bool) -> da.Array:
    """Lazy per-cell vote records (``VOTE_DTYPE``) from neighbour records.

    ``balanced`` divides each label's votes by its reference class size (the
    small-reference rule, see :func:`dask_annot.knn.neighbourhood`).
    """
    return da.map_blocks(_vote_block, nbrs, model, balanced, dtype=VOTE_DTYPE, meta=np.empty(0, dtype=VOTE_DTYPE))
