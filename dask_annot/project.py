"""Projection: normalized query cells onto the reference's PCA loadings.

The z-score is affine, so the projection of ``z = min((L - mean) / std, clip)``
needs no dense z-matrix: ``z @ P = (L / std) @ P - (mean / std) @ P``, corrected
for the entries the clip changes. Only stored (non-zero) entries can exceed the
clip (a zero count has ``z = -mean / std <= 0``), so everything stays sparse.
"""
from __future__ import annotations

import dask.array as da
import numpy as np
import scipy.sparse as sp

from .normalize import check_cell_chunked


MIN_MEASURED_MASS = 1e-3


def projection_matrix(loadings: np.ndarray, measured: np.ndarray, *, what: str = "the matrix") -> np.ndarray:
    """Genes x PCs matrix mapping z-scores to reference coordinates.

    Genes the query did not measure (absent from its feature list) are unknown,
    not zero: the coordinates are the least-squares fit of the measured genes,
    ``(W_m^T W_m)^-1 W_m^T z_m`` (unbiased: a cell lying in the PCA space is recovered
    exactly). With every gene measured this is exactly the loadings (they are
    orthonormal). ``W_m^T W_m``'s eigenvalues are the share of each principal
    direction's loading mass that was measured (at most 1), so its condition number is
    at most ``1 / MIN_MEASURED_MASS`` once the check passes: when a direction keeps less
    than :data:`MIN_MEASURED_MASS` of its mass, it cannot be recovered from the query
    (the fit would amplify noise without bound, or the system is singular) and the fit
    is refused with a clear error. A ridge term was tried instead and dropped: it biases
    every coordinate of every partly measured query to buy stability the check already gives.
    """
    from .errors import GeneOverlapError

    w = np.asarray(loadings, dtype=np.float64)
    measured = np.asarray(measured, dtype=bool)
    out = np.zeros_like(w)
    if measured.all():
        return w
    wm = w[measured]
    gram = wm.T @ wm
    mass = np.linalg.eigvalsh(gram)
    if mass.size and mass[0] < MIN_MEASURED_MASS:
        raise GeneOverlapError(
            f"{what}: the genes it measures carry {mass[0]:.2%} of one of the model's principal directions "
            f"(at least {MIN_MEASURED_MASS:.1%} is needed): too many of the model's genes are missing to place "
            "the cells; use a matrix with all genes (the filtered feature-barcode matrix) or another --cell-annotation-model"
        )
    out[measured] = np.linalg.solve(gram, wm.T).T
    return out


def _project_block(z: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """(cells x genes) z-scores -> (cells x PCs) float32, computed in float64."""
    return (z.astype(np.float64) @ proj).astype(np.float32)


def projection_terms(proj: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P / std`` (genes x PCs) and the constant row ``(mean / std) @ P``."""
    proj = np.asarray(proj, dtype=np.float64)
    return proj / std[:, None], (mean / std) @ proj


def sparse_projection(logn: sp.csr_matrix, terms: tuple[np.ndarray, np.ndarray], mean: np.ndarray, std: np.ndarray,
                      clip: float) -> np.ndarray:
    """``min((logn - mean) / std, clip) @ P`` (float64) of sparse log-normalized cells, from
    ``terms`` = :func:`projection_terms` of ``P``: no dense z-matrix is formed."""
    scaled, offset = terms
    emb = np.asarray(logn @ scaled) - offset
    z = (logn.data - mean[logn.indices]) / std[logn.indices]
    over = np.flatnonzero(z > clip)
    if over.size:
        rows = np.repeat(np.arange(logn.shape[0]), np.diff(logn.indptr))[over]
        excess = (z[over] - clip)[:, None] * (scaled[logn.indices[over]] * std[logn.indices[over], None])
        np.subtract.at(emb, rows, excess)
    return emb


def _project_counts_block(logn: sp.csr_matrix, terms: tuple[np.ndarray, np.ndarray], model) -> np.ndarray:
    """(cells x genes) sparse log-normalized values -> (cells x PCs) float32, in float64."""
    return sparse_projection(logn, terms, model.mean, model.std, model.clip).astype(np.float32)


def project_counts(logn: da.Array, terms, model, *, n_pcs: int) -> da.Array:
    """Lazy embedding of log-normalized sparse blocks (the sparse form of z-score + :func:`project`).

    ``terms`` is :func:`projection_terms` (or a ``Delayed`` of it); ``model`` supplies mean, std, clip.
    """
    check_cell_chunked(logn, "project_counts")
    return da.map_blocks(
        _project_counts_block, logn, terms, model, dtype=np.float32,
        chunks=(logn.chunks[0], (n_pcs,)), meta=np.empty((0, 0), np.float32),
    )
