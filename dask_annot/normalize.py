"""Normalization: counts -> log1p(counts scaled to 10,000) -> the reference's z-score.

The query is normalized exactly as the reference was: each cell is scaled by its
total over the reference's gene universe (every gene of the reference's input; the
reference's own cells were scaled by their totals over the same genes), log1p-
transformed, then centred and scaled per gene with the reference's mean and standard
deviation, clipped at ``clip``. ``umi_count`` in the outputs stays the total over
all of the query's Gene Expression features, as 10x reports it.
"""
from __future__ import annotations

import dask.array as da
import numpy as np
import scipy.sparse as sp

from .errors import ConfigError


def check_cell_chunked(x: da.Array, stage: str) -> None:
    """Stages work on blocks of whole cells: one chunk along the gene axis."""
    if x.ndim == 2 and len(x.chunks[1]) != 1:
        raise ConfigError(
            f"{stage}: the array must be chunked along cells only, got {len(x.chunks[1])} chunks along genes; "
            f"rechunk with x.rechunk({{0: {x.chunks[0][0]}, 1: -1}})"
        )


def log_normalize_block(block: sp.csr_matrix, umi: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """log1p(x / umi * target_sum) per cell; cells with umi 0 stay all zero."""
    umi = np.asarray(umi, dtype=np.float64).ravel()
    scale = np.divide(target_sum, umi, out=np.zeros_like(umi), where=umi > 0)
    out = sp.csr_matrix(block, dtype=np.float64, copy=True)
    out.data *= np.repeat(scale, np.diff(out.indptr))
    np.log1p(out.data, out=out.data)
    return out


def gene_moments(logn: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene of one log-normalized block: sum, sum of squares, cells expressing it.
    Summed over blocks, :func:`mean_var` turns them into the moments HVG selection uses."""
    s1 = np.asarray(logn.sum(axis=0)).ravel()
    s2 = np.asarray(logn.multiply(logn).sum(axis=0)).ravel()
    return s1, s2, np.bincount(logn.indices, minlength=logn.shape[1])


def mean_var(s1: np.ndarray, s2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and variance per gene from summed :func:`gene_moments`."""
    mean = s1 / n
    return mean, np.maximum(s2 / n - mean**2, 0.0)


def clipped_zscore(dense: np.ndarray, mean: np.ndarray, std: np.ndarray, clip: float) -> np.ndarray:
    """``(x - mean) / std`` capped at ``clip`` (above only, as scanpy's ``max_value``), float64."""
    z = (dense - mean) / std
    np.minimum(z, clip, out=z)
    return z


def _zscore_block(block: sp.csr_matrix, umi: np.ndarray, model) -> np.ndarray:
    """Dense float32 z-scores (cells x reference genes) of one aligned block.

    The annotation graph never builds these (see :func:`dask_annot.project.project_counts`);
    they define what the projection computes, and tests and the reference build use them.
    """
    logn = log_normalize_block(block, umi, model.target_sum).toarray()
    return clipped_zscore(logn, model.mean, model.std, model.clip).astype(np.float32)


def _log_normalize_columns_block(block: sp.csr_matrix, columns: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """Each cell scaled by its total over ALL columns of ``block``; only ``columns`` kept."""
    block = sp.csr_matrix(block)
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    return log_normalize_block(block[:, columns], totals, target_sum)


def log_normalize_columns(x: da.Array, columns: np.ndarray, *, target_sum: float = 1e4) -> da.Array:
    """Lazy log-normalized CSR blocks of ``columns`` of ``x``, each cell scaled by its total
    over every column of ``x`` (``x``: counts aligned to a reference's gene universe)."""
    check_cell_chunked(x, "log_normalize_columns")
    columns = np.asarray(columns, dtype=np.int64)
    return da.map_blocks(
        _log_normalize_columns_block, x, columns, target_sum,
        dtype=np.float64, chunks=(x.chunks[0], (columns.size,)), meta=sp.csr_matrix((0, 0), dtype=np.float64),
    )


def log_normalize(x: da.Array, umi: da.Array, *, target_sum: float = 1e4) -> da.Array:
    """Lazy log-normalized CSR blocks (scaled to ``target_sum``, log1p)."""
    check_cell_chunked(x, "log_normalize")
    return da.map_blocks(
        log_normalize_block, x, umi[:, None], target_sum,
        dtype=np.float64, chunks=x.chunks, meta=sp.csr_matrix((0, 0), dtype=np.float64),
    )
