"""Projection: z-scored query cells onto the reference's PCA loadings."""
from __future__ import annotations

import dask.array as da
import numpy as np

from .normalize import check_cell_chunked


def projection_matrix(loadings: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Genes x PCs matrix mapping z-scores to reference coordinates.

    Genes the query did not measure (absent from its feature list) are unknown,
    not zero: the coordinates are the least-squares fit of the measured genes,
    ``(W_m^T W_m)^-1 W_m^T z_m``. With every gene measured this is exactly the
    loadings, since they are orthonormal.
    """
    w = np.asarray(loadings, dtype=np.float64)
    measured = np.asarray(measured, dtype=bool)
    out = np.zeros_like(w)
    if measured.all():
        return w
    wm = w[measured]
    out[measured] = np.linalg.solve(wm.T @ wm, wm.T).T
    return out


def _project_block(z: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """(cells x genes) z-scores -> (cells x PCs) float32, computed in float64."""
    return (z.astype(np.float64) @ proj).astype(np.float32)


def project(z: da.Array, proj, *, n_pcs: int) -> da.Array:
    """Lazy embedding of each cell in the reference PCA space.

    ``proj`` is :func:`projection_matrix` (or a ``Delayed`` of it, shipped once).
    """
    check_cell_chunked(z, "project")
    return da.map_blocks(
        _project_block, z, proj, dtype=np.float32,
        chunks=(z.chunks[0], (n_pcs,)), meta=np.empty((0, 0), np.float32),
    )
