"""dask-annot: cell type annotation of 10x matrices on Dask."""
from __future__ import annotations

__version__ = "0.1.0"
