"""The Python API: the command line's ``annotate`` and ``build-reference`` for notebooks.

::

    import dask_annot
    labels = dask_annot.annotate(adata)            # a DataFrame like cell_types.csv, by barcode
    dask_annot.add_to_anndata(adata, labels)       # .obs columns and .obsm["X_dask_annot_pca"]

    # Visium HD: pass Space Ranger's outs/; the cell-segmented matrix and its geometry are used
    labels = dask_annot.annotate("run/outs")
    adata = sc.read_10x_h5("run/outs/segmented_outputs/filtered_feature_cell_matrix.h5")
    dask_annot.add_to_anndata(adata, labels)       # also .obsm["spatial"], .uns["spatial"] (sc.pl.spatial, squidpy)

:func:`annotate` runs the same pipeline as ``dask-annot annotate`` (an AnnData is
written to a temporary ``.h5ad`` first), on the threaded scheduler or on the
``distributed.Client`` passed in, and returns ``cell_types.csv`` as a DataFrame.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .cli import example_path
from .errors import ConfigError, InputFormatError, InputNotFoundError
from .build import build_reference
from .outputs import DEPTH_NONE

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["annotate", "add_to_anndata", "build_reference", "example_path", "write_loupe_csv"]

OBSM_KEY = "X_{prefix}dask_annot_pca"
_VAR_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id", "gene_symbols", "gene_symbol", "feature_name", "feature_types")


def annotate(
    adata_or_path: Any,
    *,
    model: str = "auto",
    client: Any = None,
    k: int | None = None,
    layout: Literal["cloud", "hierarchical"] | None = None,
    consensus: Literal["auto", "spread", "none"] | None = None,
    reject: Literal["auto", "none"] | None = None,
    output_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    layer: str | None = None,
    chunk_cells: int | None = None,
    force: bool = False,
    quiet: bool = False,
    allow_bins: bool = False,
    cell_geometry: str | os.PathLike | None = None,
    organs: str | list[str] | None = None,
) -> "pd.DataFrame":
    """Label every cell; returns ``cell_types.csv`` as a DataFrame indexed by barcode.

    Parameters
    ----------
    adata_or_path
        An ``AnnData`` with raw counts (in ``X``, or in ``layers[layer]``), or the path of
        a 10x H5, ``.h5ad``, MEX directory or store from ``dask-annot convert``.
    model
        ``auto``, a built-in model name (``dask-annot models``) or a reference directory.
    client
        A ``distributed.Client`` to run on; default: the local threaded scheduler.
    k
        Neighbours per cell (default from the configuration: 10x's 500; capped for small
        references, see ``run.json``).
    layout
        Columns of the result: ``cloud`` (``cell_count_in_model``) or ``hierarchical``
        (default from the configuration: ``cloud``).
    consensus
        As ``--consensus``: label spreading over the query's own neighbours (default from the
        configuration: ``auto``, only for small references).
    reject
        As ``--reject``: ``auto`` (default) writes ``Unassigned`` for cells unlike the reference
        and reports only the levels the calibrated probability supports; ``none`` labels every
        cell at the fine level, as 10x does.

    Options left as None come from ``dask.config`` (key ``annot``, e.g.
    ``dask.config.set({"annot.k": 100})``), as on the command line.
    output_dir
        Keep the outputs (``cell_types.csv``, DE table, ``run.json``, ``web_summary.html``)
        under ``output_dir/run_id/outs/segmented_outs/cell_types/<model>/``; default: a
        temporary directory, removed before returning.
    run_id
        Name of the run directory (default ``dask_annot``).
    layer
        With an AnnData: the layer holding raw counts, when ``X`` holds normalized values.
    chunk_cells, force
        As ``--chunk-cells`` and ``--force`` of the command line.
    quiet
        No progress messages on stderr.
    allow_bins, cell_geometry
        As ``--allow-bins`` and ``--cell-geometry`` (Visium HD; a Space Ranger ``outs/`` may be
        passed as the path).
    organs
        As ``--organ``: with a marker model, only the cell types of these organs are
        candidates (a list, or a comma-separated string); default: every organ.

    Returns
    -------
    pandas.DataFrame
        One row per cell in matrix order, the columns of ``cell_types.csv`` after
        ``barcode`` (the index), plus ``final_level_softmax_prob`` (the calibrated probability
        that the reported level is right; in every layout) and ``rejected`` (True for cells
        unlike the reference, written ``Unassigned``). ``.attrs["dask_annot"]`` holds the run record
        (``run``), the model directory (``model_dir``, ``None`` when not kept) and the
        first two reference PCs of each cell (``embedding2d``), which
        :func:`add_to_anndata` stores in ``.obsm``; for Visium HD with cell geometry, also
        ``spatial`` (centroids in full-resolution pixels, scale factors, low-res image).
    """
    from . import config, pipeline
    from .summary import read_cell_types

    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_id = run_id or "dask_annot"
    settings = config.resolve(k=k, layout=layout, consensus=consensus, reject=reject, chunk_cells=chunk_cells, force=force or None,
                               organs=organs)
    with tempfile.TemporaryDirectory(prefix="dask-annot-") as tmp:
        matrix = _as_matrix_path(adata_or_path, Path(tmp), layer=layer)
        out = Path(output_dir) if output_dir is not None else Path(tmp) / "out"
        res = pipeline.annotate(run_id, matrix, model=model, output_dir=out, settings=settings, log=log, progress=False,
                                client=client, allow_bins=allow_bins, cell_geometry=cell_geometry)
        df = read_cell_types(res.model_dir / "cell_types.csv").set_index("barcode")
        if res.calls is not None:
            if "final_level_softmax_prob" not in df.columns:
                df["final_level_softmax_prob"] = res.calls["prob"].astype(np.float64)
            df["rejected"] = res.calls["depth"] == DEPTH_NONE
        emb = res.embedding2d
    df.attrs["dask_annot"] = {
        "run": res.record,
        "model_dir": str(res.model_dir) if output_dir is not None else None,
        "embedding2d": np.asarray(emb, dtype=np.float32),
    }
    if res.positions is not None:
        df.attrs["dask_annot"]["spatial"] = {"library_id": run_id, "xy": res.positions.xy,
                                             "scalefactors": res.positions.scalefactors, "lowres": res.positions.lowres}
    return df


def add_to_anndata(adata: Any, df: "pd.DataFrame", *, embedding: np.ndarray | None = None, key_prefix: str = "") -> None:
    """Write the labels of :func:`annotate` into ``adata.obs`` (and the embedding into ``.obsm``), in place.

    Label columns become categoricals named ``<key_prefix><column>``; numbers stay
    numbers. Rows are matched by barcode, so ``adata`` may be in any order, but every
    cell of it needs a row. The embedding (``embedding``, else the one ``annotate`` kept in
    ``df.attrs``; rows in ``df``'s order) goes to ``.obsm["X_<key_prefix>dask_annot_pca"]``.

    Visium HD (``annotate`` read cell geometry): each cell's centroid in full-resolution
    tissue-image pixels goes to ``.obsm["spatial"]`` and ``.uns["spatial"][library_id]``
    gets ``images["lowres"]`` and ``scalefactors`` (Space Ranger's, plus
    ``spot_diameter_fullres``: a typical cell's diameter), the layout ``sc.pl.spatial``
    and squidpy read.
    """
    import pandas as pd

    if "barcode" in df.columns:
        df = df.set_index("barcode")
    if not df.index.is_unique:
        raise InputFormatError("the results repeat barcodes; pass the DataFrame returned by dask_annot.annotate")
    pos = df.index.get_indexer(pd.Index(adata.obs_names))
    if (pos < 0).any():
        missing = np.asarray(adata.obs_names)[pos < 0]
        raise InputFormatError(
            f"{missing.size} of the AnnData's {adata.n_obs} cells have no row in the results (e.g. '{missing[0]}'); "
            "annotate this AnnData, or subset it to the annotated cells first"
        )
    for col in df.columns:
        values = df[col].to_numpy()[pos]
        if df[col].dtype.kind in "iufb":
            adata.obs[f"{key_prefix}{col}"] = values
        else:
            values = values.astype(str)
            adata.obs[f"{key_prefix}{col}"] = pd.Categorical(values, categories=sorted(set(values.tolist())))
    if embedding is None:
        embedding = (df.attrs.get("dask_annot") or {}).get("embedding2d")
    if embedding is not None:
        emb = np.asarray(embedding)
        if emb.ndim != 2 or emb.shape[0] != len(df):
            raise InputFormatError(f"embedding has shape {emb.shape}; expected one row per result row ({len(df)}, n)")
        adata.obsm[OBSM_KEY.format(prefix=key_prefix)] = emb[pos]
    spatial = (df.attrs.get("dask_annot") or {}).get("spatial")
    if spatial is not None:
        xy = np.asarray(spatial["xy"], dtype=np.float64)
        if xy.shape != (len(df), 2):
            raise InputFormatError(f"spatial positions have shape {xy.shape}; expected ({len(df)}, 2); pass the DataFrame "
                                   "returned by dask_annot.annotate")
        adata.obsm["spatial"] = xy[pos]
        lib = {"images": {}, "scalefactors": dict(spatial.get("scalefactors") or {}),
               "metadata": {"source": "dask-annot: cell centroids from cell_segmentations.geojson"}}
        if spatial.get("lowres") is not None:
            lib["images"]["lowres"] = np.asarray(spatial["lowres"])
        adata.uns.setdefault("spatial", {})[str(spatial.get("library_id") or "dask_annot")] = lib


def write_loupe_csv(cell_types: Any, output: str | os.PathLike, *, column: str = "coarse_cell_type", group_name: str | None = None) -> Path:
    """Write the two-column ``barcode,<group>`` CSV that Loupe Browser imports as a category.

    ``cell_types`` is the DataFrame from :func:`annotate`, a ``cell_types.csv`` path, or a
    model directory. ``group_name`` (default: ``column``) is the category's name in Loupe.
    """
    from .outputs import atomic_write
    from .summary import read_cell_types

    if isinstance(cell_types, (str, os.PathLike)):
        p = Path(cell_types)
        p = p / "cell_types.csv" if p.is_dir() else p
        if not p.is_file():
            raise InputNotFoundError(f"{p}: no such file; pass cell_types.csv or its model directory")
        cell_types = read_cell_types(p)
    df = cell_types.reset_index() if "barcode" not in cell_types.columns else cell_types
    if column not in df.columns:
        raise ConfigError(f"no column '{column}' in the results; choose one of {', '.join(c for c in df.columns if c != 'barcode')}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["barcode", group_name or column])
    w.writerows(zip(df["barcode"].astype(str), df[column].astype(str)))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, buf.getvalue())
    return out


# ----------------------------------------------------------------------------- helpers


def _as_matrix_path(obj: Any, tmp: Path, *, layer: str | None) -> Path:
    """A path the pipeline reads: the path given, or the AnnData's counts written as .h5ad."""
    if isinstance(obj, (str, os.PathLike)):
        if layer is not None:
            raise ConfigError("layer= applies to an AnnData, not to a file path")
        if str(obj) == "example":
            return example_path()
        return Path(obj)
    if not all(hasattr(obj, a) for a in ("obs_names", "var_names", "X", "layers")):
        raise ConfigError(f"annotate() takes an AnnData or a path, got {type(obj).__name__}")
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if layer is not None and layer not in obj.layers:
        raise ConfigError(f"the AnnData has no layer '{layer}'; layers are: {', '.join(obj.layers.keys()) or 'none'}")
    counts = obj.layers[layer] if layer is not None else obj.X
    if counts is None:
        raise InputFormatError("the AnnData has no X; pass layer= naming the layer with raw counts")
    counts = sp.csr_matrix(counts)
    data = counts.data
    where = f"layers['{layer}']" if layer is not None else "X"
    if data.size and (data.min() < 0 or (data.dtype.kind == "f" and not np.array_equal(data, np.round(data)))):
        raise InputFormatError(
            f"the AnnData's {where} holds negative or non-whole values (normalized data?); dask-annot needs raw UMI "
            "counts: pass layer= naming the layer that holds them (e.g. layer='counts')"
        )
    var = pd.DataFrame(index=pd.Index(np.asarray(obj.var_names, dtype=str)))
    for col in _VAR_COLUMNS:
        if col in obj.var.columns:
            var[col] = np.asarray(obj.var[col], dtype=str)
    obs = pd.DataFrame(index=pd.Index(np.asarray(obj.obs_names, dtype=str)))
    path = tmp / "input.h5ad"
    anndata.AnnData(X=counts, obs=obs, var=var).write_h5ad(path)
    return path


