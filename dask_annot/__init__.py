"""dask-annot: cell type annotation of 10x matrices on Dask.

The notebook API (``annotate``, ``add_to_anndata``, ``build_reference``,
``write_loupe_csv``, ``example_path``) lives in :mod:`dask_annot.api`; it is
imported on first use, so ``import dask_annot`` stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = ("annotate", "add_to_anndata", "build_reference", "example_path", "write_loupe_csv")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dask_annot' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
