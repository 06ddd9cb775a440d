"""Labelled cells from CELLxGENE: schema-native ``.h5ad`` files and the Census.

Both give the input stage of :mod:`dask_annot.build` what a single labelled matrix gives
(``read``, ``kept_blocks``, ``labels``, ``datasets``, ``keep``, ``gene_ids``,
``gene_names``, ``provenance``), so the reference is built by the same streaming passes:

* **Files** (:func:`open_cellxgene_files`): one or more h5ads in the CELLxGENE schema
  (raw counts in ``raw.X`` when ``X`` is normalized, Ensembl ``var`` index with
  ``feature_name`` symbols, labels from ``cell_type_ontology_term_id``). Files are read
  block by block in turn, never whole; their genes are put on one universe (the union of
  Ensembl ids, in order of first appearance; a gene a file lacks is zero in its cells).
  The dataset id of a cell is ``obs['dataset_id']``, else ``uns['dataset_id']``, else the
  file name without ``.h5ad`` (CELLxGENE Discover names its downloads by dataset id).
* **The Census** (:func:`open_census`): a SOMA experiment read with ``tiledbsoma`` (the
  ``census`` extra), cells chosen by an ``obs`` value filter, counts from ``X['raw']``
  read in slices of cells.

Cell selection is the same for both: ``--obs-filter`` (a pandas/SOMA expression such as
``is_primary_data == True and tissue_general == "lung"``), cells whose label is not a Cell
Ontology id left out, classes with fewer than ``min_cells_per_type`` cells dropped and
reported, and ``max_cells_per_type`` cells kept per class by a seeded sample stratified by
dataset. Labels are CL ids, so the ontology map is the identity: no hand-written map.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from . import h5
from .errors import ConfigError, InputFormatError

LABEL_COLUMN = "cell_type_ontology_term_id"
DATASET_COLUMN = "dataset_id"
MIN_CELLS_PER_TYPE = 10
_CL_ID = re.compile(r"^CL:\d{7}$")
_ENSEMBL_VERSIONED = re.compile(r"^ENS[A-Z]*G\d{6,}\.\d+$")
CENSUS_INSTALL = "pip install 'dask-annot[census]'"


# ----------------------------------------------------------------------------- selection

def select_cells(labels: np.ndarray, datasets: np.ndarray, *, mask: np.ndarray | None = None,
                 max_cells_per_type: int | None = None, min_cells_per_type: int = MIN_CELLS_PER_TYPE,
                 seed: int = 0) -> tuple[np.ndarray, dict]:
    """Which cells go into the reference, and a report of what was left out.

    ``mask``: cells passing the obs filter. Cells whose label is not a CL id are left out;
    then classes with fewer than ``min_cells_per_type`` cells are dropped (and named in the
    report: a reference must hold the classes asked for, or say it does not); then each
    class above ``max_cells_per_type`` is subsampled, its quota split over datasets in
    proportion to their cells (largest remainders; ties by dataset name) and drawn per
    (class, dataset) by a generator seeded with ``seed`` and the pair's names, so a class's
    draw does not depend on the other classes (the cells' order is the input's).
    """
    labels = np.asarray(labels, dtype=object)
    datasets = np.asarray(datasets, dtype=object)
    keep = np.ones(labels.size, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    n_filtered_out = int(labels.size - keep.sum())
    is_cl = np.array([bool(_CL_ID.match(str(x))) for x in labels.tolist()], dtype=bool)
    not_cl = sorted(set(labels[keep & ~is_cl].tolist()))
    n_not_cl = int((keep & ~is_cl).sum())
    keep &= is_cl
    uniq, counts = np.unique(labels[keep].astype(str), return_counts=True)
    dropped = {str(u): int(c) for u, c in zip(uniq, counts) if c < min_cells_per_type}
    if dropped:
        keep &= ~np.isin(labels.astype(str), list(dropped))
    n_subsampled = 0
    if max_cells_per_type:
        for lab in uniq.tolist():
            if lab in dropped:
                continue
            idx = np.flatnonzero(keep & (labels == lab))
            if idx.size <= max_cells_per_type:
                continue
            ds_names, ds_inv = np.unique(datasets[idx].astype(str), return_inverse=True)
            sizes = np.bincount(ds_inv, minlength=ds_names.size)
            exact = sizes * (max_cells_per_type / idx.size)
            quota = np.floor(exact).astype(np.int64)
            rest = max_cells_per_type - int(quota.sum())
            order = np.lexsort((np.arange(ds_names.size), -(exact - quota)))
            quota[order[:rest]] += 1
            chosen = []
            for j, name in enumerate(ds_names.tolist()):
                members = idx[ds_inv == j]
                rng = np.random.default_rng([seed, *_name_key(lab), *_name_key(name)])
                chosen.append(np.sort(rng.choice(members, size=int(quota[j]), replace=False)))
            picked = np.concatenate(chosen)
            keep[idx] = False
            keep[picked] = True
            n_subsampled += int(idx.size - picked.size)
    report = {
        "n_cells_seen": int(labels.size), "n_filtered_out": n_filtered_out, "n_not_cell_ontology": n_not_cl,
        "not_cell_ontology_labels": not_cl[:20], "min_cells_per_type": int(min_cells_per_type),
        "dropped_types": dropped, "max_cells_per_type": max_cells_per_type, "n_subsampled_out": n_subsampled,
        "seed": int(seed), "n_cells_kept": int(keep.sum()),
    }
    return keep, report


def _name_key(text: str) -> list[int]:
    """A stable list of integers from a name, to seed a generator by it."""
    b = str(text).encode()
    return [len(b), *(int.from_bytes(b[i:i + 4].ljust(4, b"\0"), "little") for i in range(0, len(b), 4))]


def obs_filter_mask(obs, expr: str | None, *, where: str) -> np.ndarray:
    """Evaluate an obs filter (pandas expression syntax, as the Census's SOMA value filters
    read) on an obs table; a clear error when it names a missing column or is not valid."""
    if not expr:
        return np.ones(len(obs), dtype=bool)
    try:
        out = obs.eval(expr)
    except Exception as exc:  # pandas raises many types for a bad expression
        raise ConfigError(f"{where}: --obs-filter '{expr}' cannot be evaluated ({str(exc).splitlines()[0][:160]}); "
                          f"columns are {', '.join(map(str, obs.columns))}") from exc
    out = np.asarray(out)
    if out.dtype != bool or out.shape != (len(obs),):
        raise ConfigError(f"{where}: --obs-filter '{expr}' is not a true/false condition per cell; write e.g. "
                          "'is_primary_data == True and tissue_general == \"lung\"'")
    return out


# ----------------------------------------------------------------------------- CELLxGENE h5ad files

def is_cellxgene_h5ad(path: str | os.PathLike) -> bool:
    """True for an h5ad in the CELLxGENE schema: Ensembl ids as the var index with
    ``feature_name`` symbols, and ``cell_type_ontology_term_id`` in obs."""
    import h5py

    p = Path(path)
    if p.suffix != ".h5ad" or not p.is_file():
        return False
    try:
        with h5py.File(p, "r") as f:
            if "obs" not in f or LABEL_COLUMN not in f["obs"]:
                return False
            var = f["raw/var"] if "raw" in f and "var" in f["raw"] else f["var"]
            return "feature_name" in var
    except OSError:
        return False


@dataclass
class _Part:
    """One input file: its matrix, where its cells start in the whole, and its genes' universe columns."""

    info: h5.MatrixInfo
    start: int
    columns: np.ndarray
    dataset: str
    rows_dir: object = field(default=None, repr=False)

    @property
    def stop(self) -> int:
        return self.start + self.info.n_cells


class CellxgeneCells:
    """Labelled cells of several CELLxGENE-schema files (or the Census), as the build's input stage reads them."""

    def __init__(self, parts: list[_Part], gene_ids: np.ndarray, gene_names: np.ndarray, labels: np.ndarray,
                 datasets: np.ndarray, keep: np.ndarray, provenance: dict):
        self.parts = parts
        self._gene_ids, self._gene_names = gene_ids, gene_names
        self.labels, self.datasets, self.keep, self.provenance = labels, datasets, keep, provenance
        self.ontology_map = {lab: lab for lab in set(labels[keep].tolist())}
        self._starts = np.array([p.start for p in parts], dtype=np.int64)
        self._sel = [sp.csr_matrix((np.ones(p.columns.size, dtype=np.int32), (np.arange(p.columns.size), p.columns)),
                                   shape=(p.columns.size, gene_ids.size)) for p in parts]

    @property
    def gene_ids(self) -> np.ndarray:
        return self._gene_ids

    @property
    def gene_names(self) -> np.ndarray:
        return self._gene_names

    @property
    def n_cells(self) -> int:
        return int(self.labels.size)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of cells ``start:stop`` on the universe's genes (a block may span files, so
        the blocks, and the float sums over them, are the same whatever the files' sizes)."""
        out = []
        for i, part in enumerate(self.parts):
            lo, hi = max(start, part.start), min(stop, part.stop)
            if lo >= hi:
                continue
            if h5.needs_row_copy(part.info):  # a CSC h5ad: copied once into cell order
                import tempfile

                part.rows_dir = tempfile.TemporaryDirectory(prefix="dask-annot-rows-")
                part.info = h5.row_copy(part.info, part.rows_dir.name)
            out.append(sp.csr_matrix(h5.read_cells(part.info, lo - part.start, hi - part.start) @ self._sel[i]))
        return sp.csr_matrix(sp.vstack(out, format="csr")) if len(out) > 1 else out[0]

    def kept_blocks(self, cells_per_block: int):
        """(start, stop, rows kept within the block) for every block holding a kept cell."""
        keep_idx = np.flatnonzero(self.keep)
        for start in range(0, self.n_cells, cells_per_block):
            stop = min(start + cells_per_block, self.n_cells)
            sel = keep_idx[(keep_idx >= start) & (keep_idx < stop)] - start
            if sel.size:
                yield start, stop, sel


def _h5ad_obs(path: Path):
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            obs = read_elem(f["obs"])
            uns_ds = None
            if "uns" in f and DATASET_COLUMN in f["uns"]:
                v = read_elem(f["uns"][DATASET_COLUMN])
                uns_ds = v.decode() if isinstance(v, bytes) else str(np.asarray(v).ravel()[0] if np.ndim(v) else v)
    except (OSError, KeyError) as exc:
        raise InputFormatError(f"{path}: cannot read obs ({exc}); pass an .h5ad written by anndata") from exc
    return obs, uns_ds


def open_cellxgene_files(paths: Sequence[str | os.PathLike], *, obs_filter: str | None = None,
                         max_cells_per_type: int | None = None, min_cells_per_type: int = MIN_CELLS_PER_TYPE,
                         seed: int = 0) -> CellxgeneCells:
    """Open CELLxGENE-schema h5ads as one labelled input (metadata only; counts are streamed later)."""
    paths = [Path(p) for p in paths]
    seen: set[str] = set()
    for p in paths:
        if str(p.resolve()) in seen:
            raise ConfigError(f"{p}: given twice as --input; name each file once")
        seen.add(str(p.resolve()))
        if not is_cellxgene_h5ad(p):
            raise InputFormatError(
                f"{p}: not a CELLxGENE-schema .h5ad (needs obs '{LABEL_COLUMN}' and var 'feature_name' with Ensembl ids); "
                "pass files downloaded from CELLxGENE Discover, or one .h5ad with --label-column"
            )
    parts, labels, datasets, masks, files = [], [], [], [], []
    uni_index: dict[str, int] = {}
    uni_ids: list[str] = []
    uni_names: list[str] = []
    start = 0
    for p in paths:
        info = h5.open_matrix(p)
        obs, uns_ds = _h5ad_obs(p)
        if len(obs) != info.n_cells:
            raise InputFormatError(f"{p}: obs has {len(obs)} rows but the matrix {info.n_cells} cells; the file is inconsistent")
        cols = np.empty(info.n_features, dtype=np.int64)
        for j, (gid, name) in enumerate(zip(np.asarray(info.feature_ids, dtype=str).tolist(), np.asarray(info.feature_names, dtype=str).tolist())):
            key = gid.split(".")[0] if _ENSEMBL_VERSIONED.match(gid) else gid
            if key not in uni_index:
                uni_index[key] = len(uni_ids)
                uni_ids.append(gid)
                uni_names.append(name)
            cols[j] = uni_index[key]
        if np.unique(cols).size != cols.size:
            raise InputFormatError(f"{p}: a gene id occurs twice in var; the file is not valid CELLxGENE schema")
        if DATASET_COLUMN in obs.columns:
            ds = obs[DATASET_COLUMN].astype(str).to_numpy(dtype=object)
            source_of_ds = "obs"
        else:
            ds = np.full(info.n_cells, uns_ds or p.name.removesuffix(".h5ad"), dtype=object)
            source_of_ds = "uns" if uns_ds else "file name"
        labels.append(obs[LABEL_COLUMN].astype(str).to_numpy(dtype=object))
        datasets.append(ds)
        masks.append(obs_filter_mask(obs, obs_filter, where=str(p)))
        parts.append(_Part(info=info, start=start, columns=cols, dataset=str(ds[0]) if ds.size else ""))
        files.append({"file": p.name, "n_cells": info.n_cells, "counts": info.extra.get("counts", "X"),
                      "dataset_id_from": source_of_ds, **_fingerprint(p)})
        start += info.n_cells
    labels_a, datasets_a = np.concatenate(labels), np.concatenate(datasets)
    keep, report = select_cells(labels_a, datasets_a, mask=np.concatenate(masks), max_cells_per_type=max_cells_per_type,
                                min_cells_per_type=min_cells_per_type, seed=seed)
    _check_enough(keep, report, where=", ".join(p.name for p in paths))
    provenance = {"kind": "cellxgene_h5ad", "files": files, "label_column": LABEL_COLUMN, "dataset_column": DATASET_COLUMN,
                  "obs_filter": obs_filter, "selection": report, "datasets": _dataset_counts(datasets_a, keep),
                  "n_cells_input": int(labels_a.size), "n_cells_excluded": int(labels_a.size - keep.sum())}
    return CellxgeneCells(parts, np.array(uni_ids, dtype=str), np.array(uni_names, dtype=str), labels_a, datasets_a, keep, provenance)


def _fingerprint(p: Path) -> dict:
    from .store import file_fingerprint

    return file_fingerprint(p)


def _dataset_counts(datasets: np.ndarray, keep: np.ndarray) -> dict[str, int]:
    u, c = np.unique(datasets[keep].astype(str), return_counts=True)
    return {str(a): int(b) for a, b in zip(u, c)}


def _check_enough(keep: np.ndarray, report: dict, *, where: str) -> None:
    if keep.sum() < 10:
        raise InputFormatError(
            f"{where}: only {int(keep.sum())} cells are left for the reference ({report['n_filtered_out']} filtered out, "
            f"{report['n_not_cell_ontology']} without a Cell Ontology label, {len(report['dropped_types'])} types under "
            f"{report['min_cells_per_type']} cells); loosen --obs-filter or --min-cells-per-type"
        )


# ----------------------------------------------------------------------------- the Census

def _soma():
    try:
        import tiledbsoma
    except ImportError as exc:
        raise ConfigError(f"--census needs tiledbsoma, which is not installed; {CENSUS_INSTALL}") from exc
    return tiledbsoma


def open_census_experiment(*, organism: str, census_uri: str | None = None, census_version: str | None = None):
    """The SOMA experiment of ``organism`` and what to record about where it came from.

    ``census_uri``: a local or cloud SOMA store, either a Census (a collection holding
    ``census_data/<organism>``) or one experiment. Otherwise the public Census release
    ``census_version`` (default: the latest stable) through ``cellxgene_census``.
    """
    exp, record, _ = _open_census(organism=organism, census_uri=census_uri, census_version=census_version)
    return exp, record


def _open_census(*, organism: str, census_uri: str | None, census_version: str | None):
    """(experiment, record, the object opened: close it when done)."""
    soma = _soma()
    if census_uri:
        try:
            obj = soma.open(census_uri)
        except Exception as exc:  # tiledbsoma raises its own types for a missing or foreign store
            raise ConfigError(f"{census_uri}: not a SOMA store ({str(exc).splitlines()[0][:160]}); pass a Census or experiment URI") from exc
        record = {"census_uri": str(census_uri)}
    else:
        try:
            import cellxgene_census
        except ImportError as exc:
            raise ConfigError(f"--census without --census-uri needs cellxgene-census, which is not installed; {CENSUS_INSTALL}") from exc
        obj = cellxgene_census.open_soma(census_version=census_version or "stable")
        record = {"census_version": census_version or "stable"}
    if obj.soma_type == "SOMAExperiment":
        return obj, record, obj
    try:
        if "census_info" in obj and "summary" in obj["census_info"]:
            summ = obj["census_info"]["summary"].read().concat().to_pandas()
            info = dict(zip(summ["label"], summ["value"]))
            record.update({k: info[k] for k in ("census_build_date", "census_schema_version") if k in info})
        exp = obj["census_data"][organism]
    except KeyError as exc:
        have = list(obj["census_data"].keys()) if "census_data" in obj else list(obj.keys())
        raise ConfigError(f"{census_uri or 'the Census'}: has no experiment for --organism {organism}; it has {', '.join(have)}") from exc
    return exp, record, obj


def _read_census_rows(exp, ids: np.ndarray, var_joinids: np.ndarray, *, where: str) -> sp.csr_matrix:
    """Raw counts of the cells ``ids`` (sorted soma_joinids) from X['raw'], genes in ``var_joinids`` order."""
    tbl = exp.ms["RNA"].X["raw"].read(coords=(ids,)).tables().concat()
    rows = np.searchsorted(ids, tbl.column("soma_dim_0").to_numpy())
    cols = np.searchsorted(var_joinids, tbl.column("soma_dim_1").to_numpy())
    vals = tbl.column("soma_data").to_numpy()
    h5.check_counts(vals, where=where)
    m = sp.csr_matrix((vals.astype(np.int32), (rows, cols)), shape=(ids.size, var_joinids.size))
    m.sum_duplicates()
    return m


def _census_slice_task(source: tuple, ids: np.ndarray, var_joinids: np.ndarray, kernel, *args):
    """One Dask task: open the experiment here (tiledbsoma objects do not pickle), read the
    cells ``ids`` and return ``kernel(counts, *args)``."""
    census_uri, census_version, organism = source
    exp, _, opened = _open_census(organism=organism, census_uri=census_uri, census_version=census_version)
    try:
        counts = _read_census_rows(exp, ids, var_joinids, where=f"{census_uri or 'the Census'} X['raw'] "
                                                             f"(soma_joinids {ids[0]}-{ids[-1]})")
    finally:
        opened.close()
    return kernel(counts, *args)


class CensusCells(CellxgeneCells):
    """Labelled cells of a SOMA experiment, read from ``X['raw']`` in slices of cells.

    The build's passes read it with :meth:`map_kept_blocks`: one Dask task per fixed slice
    of soma_joinids, each opening the experiment itself, results in slice order."""

    def __init__(self, exp, joinids: np.ndarray, var_joinids: np.ndarray, *, source: tuple | None = None, **kw):
        part = _Part(info=None, start=0, columns=np.arange(kw["gene_ids"].size), dataset="")  # type: ignore[arg-type]
        super().__init__([part], **kw)
        self._exp = exp
        self._joinids = joinids          # sorted: cells in soma_joinid order
        self._var_joinids = var_joinids  # sorted: genes in soma_joinid order
        self._source = source            # (census_uri, census_version, organism): how a task opens it

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of the selected cells ``start:stop`` (one slice of X['raw'])."""
        return _read_census_rows(self._exp, self._joinids[start:stop], self._var_joinids,
                                 where=f"{self.provenance.get('census_uri', 'the Census')} X['raw'] (cells {start}-{stop - 1})")

    def map_kept_blocks(self, cells_per_block: int, kernel, *args, window: int | None = None):
        """``kernel(raw counts of a block's kept cells, *args)`` per block, as Dask tasks on the
        current scheduler (threads, or the default ``distributed`` client), results in block
        order (see :func:`dask_annot.pipeline.results_in_order`). Without a way to reopen the
        store (an experiment object given directly), the blocks are read here in turn."""
        if self._source is None:
            return (kernel(self.read(a, b)[sel], *args) for a, b, sel in self.kept_blocks(cells_per_block))
        import dask

        from .pipeline import results_in_order

        shared = [dask.delayed(x, pure=True) if isinstance(x, np.ndarray) else x for x in (self._var_joinids, *args)]
        task = dask.delayed(_census_slice_task, pure=True)
        tasks = (task(self._source, self._joinids[a:b][sel], *shared[:1], kernel, *shared[1:])
                 for a, b, sel in self.kept_blocks(cells_per_block))
        return results_in_order(tasks, window=window)


def open_census(value_filter: str, *, organism: str = "homo_sapiens", census_uri: str | None = None,
                census_version: str | None = None, max_cells_per_type: int | None = None,
                min_cells_per_type: int = MIN_CELLS_PER_TYPE, seed: int = 0) -> CensusCells:
    """Cells of the Census (or a local SOMA store) matching ``value_filter``, as one labelled input.

    Only ``obs`` columns are read here; counts are streamed later by the build's passes.
    """
    exp, record = open_census_experiment(organism=organism, census_uri=census_uri, census_version=census_version)
    cols = ["soma_joinid", LABEL_COLUMN, DATASET_COLUMN]
    try:
        obs = exp.obs.read(value_filter=value_filter or None, column_names=cols).concat().to_pandas()
    except Exception as exc:  # tiledbsoma's query parser raises several types
        raise ConfigError(f"--census '{value_filter}' cannot be evaluated on obs ({str(exc).splitlines()[0][:160]}); "
                          "write e.g. 'is_primary_data == True and tissue_general == \"lung\"'") from exc
    obs = obs.sort_values("soma_joinid", kind="stable")
    var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
    var = var.sort_values("soma_joinid", kind="stable")
    labels = obs[LABEL_COLUMN].astype(str).to_numpy(dtype=object)
    datasets = obs[DATASET_COLUMN].astype(str).to_numpy(dtype=object)
    keep, report = select_cells(labels, datasets, max_cells_per_type=max_cells_per_type,
                                min_cells_per_type=min_cells_per_type, seed=seed)
    _check_enough(keep, report, where=census_uri or "the Census")
    report["n_filtered_out"] = None  # the filter ran inside SOMA: only matching cells were read
    dataset_counts = _dataset_counts(datasets, keep)
    provenance = {"kind": "census", "organism": organism, "census_filter": value_filter, **record,
                  "label_column": LABEL_COLUMN, "dataset_column": DATASET_COLUMN, "selection": report,
                  "datasets": dataset_counts, "n_cells_input": int(labels.size), "n_cells_excluded": int(labels.size - keep.sum())}
    return CensusCells(exp, obs["soma_joinid"].to_numpy(dtype=np.int64), var["soma_joinid"].to_numpy(dtype=np.int64),
                       source=(census_uri, census_version, organism),
                       gene_ids=var["feature_id"].to_numpy(dtype=str),
                       gene_names=var["feature_name"].to_numpy(dtype=str),
                       labels=labels, datasets=datasets, keep=keep, provenance=provenance)


# ----------------------------------------------------------------------------- the command line

def open_reference_input(a, *, log=print) -> CellxgeneCells | None:
    """The input of ``build-reference`` when it comes from CELLxGENE (files or the Census), else
    ``None`` (one h5ad / 10x H5 with ``--label-column``: read as before).

    CELLxGENE files are recognised by their schema; several ``--input`` files, ``--obs-filter``
    and ``--max-cells-per-type`` need them.
    """
    inputs = list(a.input or [])
    cxg_opts = [f for f, v in (("--obs-filter", a.obs_filter), ("--max-cells-per-type", a.max_cells_per_type),
                               ("--min-cells-per-type", a.min_cells_per_type)) if v is not None]
    if a.census is not None and inputs:
        raise ConfigError("--census and --input both given; build from one source (or build two references)")
    if a.census is None and not inputs:
        raise ConfigError("build-reference needs --input FILE [FILE ...] or --census FILTER")
    if (a.census_uri or a.census_version) and a.census is None:
        raise ConfigError("--census-uri / --census-version need --census FILTER (use --census '' for every cell)")
    if a.label_column and a.label_column != LABEL_COLUMN and (a.census is not None or len(inputs) > 1):
        raise ConfigError(f"CELLxGENE inputs are labelled by {LABEL_COLUMN} (Cell Ontology ids); drop --label-column {a.label_column}")
    for flag, val in (("--max-cells-per-type", a.max_cells_per_type), ("--min-cells-per-type", a.min_cells_per_type)):
        if val is not None and val < 1:
            raise ConfigError(f"{flag} {val}: must be at least 1")
    kw = dict(max_cells_per_type=a.max_cells_per_type, seed=a.seed,
              min_cells_per_type=MIN_CELLS_PER_TYPE if a.min_cells_per_type is None else a.min_cells_per_type)
    if a.census is not None:
        cells = open_census(a.census, organism=a.organism, census_uri=a.census_uri, census_version=a.census_version, **kw)
    else:
        cxg = [is_cellxgene_h5ad(p) for p in inputs]
        if len(inputs) == 1 and not cxg[0] or (a.label_column and a.label_column != LABEL_COLUMN):
            if cxg_opts or len(inputs) > 1:
                raise ConfigError(f"{', '.join(cxg_opts) or 'several --input files'} need CELLxGENE-schema .h5ad input "
                                  f"(obs '{LABEL_COLUMN}', var 'feature_name'); {inputs[0]} is not")
            return None
        cells = open_cellxgene_files(inputs, obs_filter=a.obs_filter, **kw)
    if a.ontology_map:
        raise ConfigError("--ontology-map is not used with CELLxGENE inputs: their labels are Cell Ontology ids already")
    sel = cells.provenance["selection"]
    log(f"{cells.provenance['kind']}: {sel['n_cells_kept']} of {sel['n_cells_seen']} cells kept, "
        f"{len(cells.provenance['datasets'])} datasets, {len(set(cells.labels[cells.keep].tolist()))} cell types"
        + (f"; dropped (fewer than {sel['min_cells_per_type']} cells): "
           + ", ".join(f"{k} ({v})" for k, v in sorted(sel['dropped_types'].items())) if sel["dropped_types"] else ""))
    return cells
