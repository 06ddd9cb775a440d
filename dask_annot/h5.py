"""Read count matrices (10x HDF5 v3 and legacy, ``.h5ad``, 10x MEX) and write 10x HDF5.

Every reader exposes the same two steps: :func:`open_matrix` inspects and validates
the layout without reading counts, and :func:`read_cells` returns a block of cells
as a CSR matrix (cells x Gene Expression features, int32) with the counts checked.
Only Gene Expression features are kept: antibody, CRISPR and other feature types
are dropped here, once, so every later stage sees genes only.
"""
from __future__ import annotations

import gzip
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import scipy.sparse as sp

from .errors import (
    CorruptInputError,
    InputFormatError,
    InputNotFoundError,
    InvalidCountsError,
    TooFewCellsError,
)

Layout = Literal["10x-h5-v3", "10x-h5-legacy", "h5ad", "mex"]
GENE_EXPRESSION = "Gene Expression"
MAX_COUNT = np.iinfo(np.int32).max


@dataclass(frozen=True)
class MatrixInfo:
    """What a count matrix holds, read from its metadata only.

    ``ge_index`` gives, for each kept (Gene Expression) feature, its position in
    the input's own feature order; ``group`` is the HDF5 group holding the matrix.
    """

    path: str
    layout: Layout
    n_cells: int
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    genomes: tuple[str, ...]
    ge_index: np.ndarray
    n_features_total: int
    nnz: int
    group: str = ""
    orientation: Literal["cells_rows", "cells_cols", "dense"] = "cells_rows"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def n_features(self) -> int:
        return int(self.ge_index.size)


def _decode(values: np.ndarray) -> np.ndarray:
    """Bytes or str array -> numpy array of Python str (object dtype)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return out


def _read_dataset(path: str, h5: h5py.File, key: str, *, kinds: str | None = None) -> np.ndarray:
    """Read a whole 1-D dataset, turning HDF5 faults and wrong shapes into a clear error naming file and key."""
    if key not in h5:
        raise InputFormatError(
            f"{path}: the HDF5 file has no '{key}' dataset, so it is not a complete 10x matrix; "
            "pass the filtered_feature_bc_matrix.h5 written by Cell Ranger or Space Ranger"
        )
    obj = h5[key]
    if not isinstance(obj, h5py.Dataset):
        raise InputFormatError(f"{path}: '{key}' is a group, not a dataset; the file is not a 10x matrix")
    if obj.ndim != 1:
        raise InputFormatError(f"{path}: '{key}' is {obj.ndim}-dimensional, expected a 1-D array; the file is not a valid 10x matrix")
    if kinds and obj.dtype.kind not in kinds:
        raise InputFormatError(f"{path}: '{key}' holds {obj.dtype} values, which a 10x matrix never does; regenerate the file")
    try:
        return obj[()]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CorruptInputError(
            f"{path}: reading '{key}' failed ({_short(exc)}); the file is damaged or truncated, "
            "copy it again from its source"
        ) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _open_h5(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head != b"\x89HDF\r\n\x1a\n":
            raise InputFormatError(
                f"{path}: not an HDF5 file; pass a 10x filtered_feature_bc_matrix.h5, "
                "an .h5ad with raw counts, or a MEX directory"
            ) from exc
        raise CorruptInputError(
            f"{path}: the HDF5 file cannot be opened ({_short(exc)}); it is truncated or damaged, "
            "copy it again from its source"
        ) from exc


def open_matrix(path: str | os.PathLike) -> MatrixInfo:
    """Inspect a count matrix and return its :class:`MatrixInfo`.

    Raises a :class:`~dask_annot.errors.DaskAnnotError` subclass with a one-line
    message for anything that is not a readable, single-genome matrix with at
    least one cell and one Gene Expression feature.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or directory; check the --matrix path")
    if p.is_dir():
        info = _open_mex(p)
    elif p.suffix == ".h5ad":
        info = _open_h5ad(p)
    else:
        info = _open_10x_h5(p)
    if info.n_cells == 0:
        raise TooFewCellsError(f"{p}: the matrix has no cells (barcodes); pass a filtered matrix with cells")
    if info.n_features == 0:
        raise InputFormatError(
            f"{p}: no 'Gene Expression' features among {info.n_features_total}; "
            "dask-annot annotates gene expression, pass a matrix that has it"
        )
    _check_unique_barcodes(info)
    return info


def _check_unique_barcodes(info: MatrixInfo) -> None:
    uniq, counts = np.unique(info.barcodes.astype(str), return_counts=True)
    if uniq.size != info.barcodes.size:
        dup = uniq[counts > 1]
        raise InputFormatError(
            f"{info.path}: {dup.size} barcode(s) occur more than once (e.g. '{dup[0]}'); "
            "barcodes must be unique, fix or regenerate the matrix"
        )


def _open_10x_h5(p: Path) -> MatrixInfo:
    path = str(p)
    with _open_h5(path) as h5:
        if "matrix" in h5 and isinstance(h5["matrix"], h5py.Group):
            return _open_v3(path, h5)
        groups = [k for k in h5.keys() if isinstance(h5[k], h5py.Group)]
        if "X" in h5 and "obs" in h5 and "var" in h5:
            return _open_h5ad(p)
        legacy = [g for g in groups if "genes" in h5[g] or "gene_names" in h5[g]]
        if len(legacy) > 1:
            raise InputFormatError(
                f"{path}: a legacy multi-genome matrix ({', '.join(sorted(legacy))}); "
                "dask-annot annotates one genome, re-run Cell Ranger with a single-genome reference "
                "or split the matrix per genome"
            )
        if len(legacy) == 1:
            return _open_legacy(path, h5, legacy[0])
        raise InputFormatError(
            f"{path}: HDF5 but not a 10x matrix (no '/matrix' group and no legacy genome group); "
            "pass the filtered_feature_bc_matrix.h5 from Cell Ranger or Space Ranger"
        )


def _check_csc_shape(path: str, shape, n_features: int, n_cells: int, indptr: np.ndarray, nnz_d: int, nnz_i: int) -> int:
    shape = np.asarray(shape).ravel()
    if shape.size != 2:
        raise InputFormatError(f"{path}: 'shape' holds {shape.size} numbers, expected 2 (features, barcodes)")
    if int(shape[0]) != n_features or int(shape[1]) != n_cells:
        raise InputFormatError(
            f"{path}: 'shape' says {int(shape[0])} features x {int(shape[1])} barcodes but the file lists "
            f"{n_features} features and {n_cells} barcodes; the matrix is inconsistent, regenerate it"
        )
    if indptr.ndim != 1 or indptr.size != n_cells + 1:
        raise InputFormatError(
            f"{path}: 'indptr' has {indptr.size} entries, expected {n_cells + 1} (barcodes + 1); the matrix is inconsistent"
        )
    if indptr.dtype.kind not in "iu":
        raise InputFormatError(f"{path}: 'indptr' is of type {indptr.dtype}, expected integers")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise InputFormatError(f"{path}: 'indptr' does not start at 0 and increase; the matrix is inconsistent")
    if nnz_d != nnz_i or int(indptr[-1]) != nnz_d:
        raise InputFormatError(
            f"{path}: 'data' ({nnz_d}) and 'indices' ({nnz_i}) lengths disagree with indptr[-1] ({int(indptr[-1])}); "
            "the matrix is inconsistent or truncated"
        )
    return int(nnz_d)


def _dataset_len(path: str, h5: h5py.File, key: str) -> int:
    if key not in h5 or not isinstance(h5[key], h5py.Dataset):
        raise InputFormatError(f"{path}: the HDF5 file has no '{key}' dataset, so it is not a complete 10x matrix")
    ds = h5[key]
    if ds.ndim != 1:
        raise InputFormatError(f"{path}: '{key}' is {ds.ndim}-dimensional, expected a 1-D array")
    if ds.dtype.kind not in "iuf":
        raise InputFormatError(f"{path}: '{key}' holds {ds.dtype} values, expected numbers")
    return int(ds.shape[0])


def _open_v3(path: str, h5: h5py.File) -> MatrixInfo:
    g = "matrix"
    barcodes = _decode(_read_dataset(path, h5, f"{g}/barcodes", kinds="SOU"))
    ids = _decode(_read_dataset(path, h5, f"{g}/features/id", kinds="SOU"))
    names = _decode(_read_dataset(path, h5, f"{g}/features/name", kinds="SOU"))
    types = _decode(_read_dataset(path, h5, f"{g}/features/feature_type", kinds="SOU"))
    genome_key = f"{g}/features/genome"
    genome = _decode(_read_dataset(path, h5, genome_key, kinds="SOU")) if genome_key in h5 else np.array([""] * ids.size, dtype=object)
    if not (ids.size == names.size == types.size == genome.size):
        raise InputFormatError(
            f"{path}: the features datasets (id {ids.size}, name {names.size}, feature_type {types.size}) differ in length"
        )
    indptr = _read_dataset(path, h5, f"{g}/indptr", kinds="iu")
    shape = _read_dataset(path, h5, f"{g}/shape", kinds="iu")
    nnz = _check_csc_shape(
        path, shape, ids.size, barcodes.size, indptr,
        _dataset_len(path, h5, f"{g}/data"), _dataset_len(path, h5, f"{g}/indices"),
    )
    ge = np.flatnonzero(types == GENE_EXPRESSION).astype(np.int64)
    genomes = tuple(sorted({str(x) for x in genome[ge] if str(x)}))
    if len(genomes) > 1:
        raise InputFormatError(
            f"{path}: a multi-genome matrix ({', '.join(genomes)}); dask-annot annotates one genome, "
            "re-run Cell Ranger with a single-genome reference or split the matrix per genome"
        )
    return MatrixInfo(
        path=path, layout="10x-h5-v3", n_cells=int(barcodes.size), barcodes=barcodes,
        feature_ids=ids[ge], feature_names=names[ge], genomes=genomes, ge_index=ge,
        n_features_total=int(ids.size), nnz=nnz, group=g,
        extra={"feature_types": sorted(set(types.tolist())), "indptr": indptr.astype(np.int64)},
    )


def _open_legacy(path: str, h5: h5py.File, g: str) -> MatrixInfo:
    barcodes = _decode(_read_dataset(path, h5, f"{g}/barcodes", kinds="SOU"))
    ids = _decode(_read_dataset(path, h5, f"{g}/genes", kinds="SOU"))
    names = _decode(_read_dataset(path, h5, f"{g}/gene_names", kinds="SOU")) if f"{g}/gene_names" in h5 else ids.copy()
    if ids.size != names.size:
        raise InputFormatError(f"{path}: '{g}/genes' and '{g}/gene_names' differ in length")
    indptr = _read_dataset(path, h5, f"{g}/indptr", kinds="iu")
    shape = _read_dataset(path, h5, f"{g}/shape", kinds="iu")
    nnz = _check_csc_shape(
        path, shape, ids.size, barcodes.size, indptr,
        _dataset_len(path, h5, f"{g}/data"), _dataset_len(path, h5, f"{g}/indices"),
    )
    return MatrixInfo(
        path=path, layout="10x-h5-legacy", n_cells=int(barcodes.size), barcodes=barcodes,
        feature_ids=ids, feature_names=names, genomes=(g,), ge_index=np.arange(ids.size, dtype=np.int64),
        n_features_total=int(ids.size), nnz=nnz, group=g,
        extra={"feature_types": [GENE_EXPRESSION], "indptr": indptr.astype(np.int64)},
    )


def _h5ad_strings(path: str, h5: h5py.File, key: str) -> np.ndarray:
    """A 1-D string array or categorical from an h5ad dataframe column."""
    from anndata.io import read_elem

    try:
        values = read_elem(h5[key])
    except Exception as exc:  # anndata raises many types for malformed elements
        raise CorruptInputError(f"{path}: cannot read '{key}' ({_short(exc)}); the .h5ad is damaged") from exc
    return np.asarray(values, dtype=object).astype(str).astype(object)


_ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id")
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name")


def _h5ad_features(path: str, h5: h5py.File, var: str) -> tuple[np.ndarray, np.ndarray]:
    """Feature ids and symbols of an h5ad ``var`` group.

    An Ensembl ``var`` index (the CELLxGENE schema) is the id, with symbols from
    ``feature_name`` / ``gene_symbols``; otherwise the index is the symbol, with ids from
    ``gene_ids`` / ``feature_id`` / ``ensembl_id`` when present.
    """
    from .align import looks_like_ensembl

    index = _h5ad_strings(path, h5, f"{var}/{h5[var].attrs.get('_index', '_index')}")
    id_col = next((c for c in _ID_COLUMNS if c in h5[var]), None)
    sym_col = next((c for c in _SYMBOL_COLUMNS if c in h5[var]), None)
    if looks_like_ensembl(index) and sym_col:
        return index, _h5ad_strings(path, h5, f"{var}/{sym_col}")
    if id_col:
        return _h5ad_strings(path, h5, f"{var}/{id_col}"), index
    return index.copy(), index


def _looks_normalized(path: str, h5: h5py.File, key: str) -> bool:
    """True when the first stored values of matrix ``key`` include non-integers (a normalized or
    log-transformed X); reads at most 100,000 values."""
    obj = h5[key]
    ds = obj if isinstance(obj, h5py.Dataset) else obj.get("data")
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f" or ds.size == 0:
        return False
    try:
        sample = np.asarray(ds[: max(1, 100_000 // ds.shape[1])] if ds.ndim == 2 else ds[:100_000], dtype=np.float64)
    except (OSError, RuntimeError) as exc:
        raise CorruptInputError(f"{path}: reading '{key}' failed ({_short(exc)}); the .h5ad is damaged") from exc
    return bool(np.any(sample != np.floor(sample)))


def _counts_key(path: str, h5: h5py.File) -> tuple[str, str]:
    """Where the raw counts are: (matrix key, var group). ``X`` unless it holds normalized
    values; then ``layers/counts`` or ``raw/X`` (the CELLxGENE schema's place for them)."""
    if not _looks_normalized(path, h5, "X"):
        return "X", "var"
    if "layers" in h5 and "counts" in h5["layers"]:
        return "layers/counts", "var"
    if "raw" in h5 and "X" in h5["raw"] and "var" in h5["raw"]:
        return "raw/X", "raw/var"
    raise InvalidCountsError(
        f"{path}: X holds normalized (non-integer) values and the file has no raw.X or layers['counts']; "
        "pass an .h5ad with raw UMI counts"
    )


def _open_h5ad(p: Path) -> MatrixInfo:
    path = str(p)
    with _open_h5(path) as h5:
        for key in ("X", "obs", "var"):
            if key not in h5:
                raise InputFormatError(f"{path}: the .h5ad has no '{key}'; write it with anndata")
        obs_index = h5["obs"].attrs.get("_index", "_index")
        barcodes = _h5ad_strings(path, h5, f"obs/{obs_index}")
        key, var = _counts_key(path, h5)
        ids, names = _h5ad_features(path, h5, var)
        types = np.array([GENE_EXPRESSION] * names.size, dtype=object)
        if "feature_types" in h5[var]:
            types = _h5ad_strings(path, h5, f"{var}/feature_types")
        X = h5[key]
        if isinstance(X, h5py.Dataset):
            if X.ndim != 2 or X.shape != (barcodes.size, names.size):
                raise InputFormatError(f"{path}: {key} has shape {X.shape}, expected ({barcodes.size}, {names.size})")
            orientation, nnz, indptr = "dense", int(X.shape[0] * X.shape[1]), None
        else:
            enc = X.attrs.get("encoding-type", "")
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            shape = tuple(int(x) for x in X.attrs.get("shape", (-1, -1)))
            if shape != (barcodes.size, names.size):
                raise InputFormatError(f"{path}: {key} has shape {shape}, expected ({barcodes.size}, {names.size})")
            if enc not in ("csr_matrix", "csc_matrix"):
                raise InputFormatError(f"{path}: {key} is encoded as '{enc}', expected a csr_matrix, csc_matrix or dense array")
            indptr = _read_dataset(path, h5, f"{key}/indptr").astype(np.int64)
            n_major = shape[0] if enc == "csr_matrix" else shape[1]
            n_minor = shape[1] if enc == "csr_matrix" else shape[0]
            fake_shape = np.array([n_minor, n_major])
            nnz = _check_csc_shape(
                path, fake_shape, n_minor, n_major, indptr,
                _dataset_len(path, h5, f"{key}/data"), _dataset_len(path, h5, f"{key}/indices"),
            )
            orientation = "cells_rows" if enc == "csr_matrix" else "cells_cols"
        ge = np.flatnonzero(types == GENE_EXPRESSION).astype(np.int64)
        return MatrixInfo(
            path=path, layout="h5ad", n_cells=int(barcodes.size), barcodes=barcodes,
            feature_ids=ids[ge], feature_names=names[ge], genomes=(), ge_index=ge,
            n_features_total=int(names.size), nnz=nnz, group=key, orientation=orientation,
            extra={"feature_types": sorted(set(types.tolist())), "indptr": indptr, "counts": key},
        )


def _mex_file(d: Path, *names: str) -> Path:
    for n in names:
        for cand in (d / n, d / (n + ".gz")):
            if cand.exists():
                return cand
    raise InputFormatError(
        f"{d}: a MEX directory needs {' or '.join(n + '[.gz]' for n in names)}; "
        "pass the filtered_feature_bc_matrix/ directory from Cell Ranger"
    )


def _read_tsv(p: Path) -> list[list[str]]:
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt") as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CorruptInputError(f"{p}: cannot be read ({_short(exc)}); the file is damaged, copy it again") from exc


def _open_mex(d: Path) -> MatrixInfo:
    mtx = _mex_file(d, "matrix.mtx")
    feats = _read_tsv(_mex_file(d, "features.tsv", "genes.tsv"))
    bcs = _read_tsv(_mex_file(d, "barcodes.tsv"))
    barcodes = np.array([r[0] for r in bcs], dtype=object)
    ids = np.array([r[0] for r in feats], dtype=object)
    names = np.array([r[1] if len(r) > 1 else r[0] for r in feats], dtype=object)
    types = np.array([r[2] if len(r) > 2 else GENE_EXPRESSION for r in feats], dtype=object)
    ge = np.flatnonzero(types == GENE_EXPRESSION).astype(np.int64)
    return MatrixInfo(
        path=str(d), layout="mex", n_cells=int(barcodes.size), barcodes=barcodes,
        feature_ids=ids[ge], feature_names=names[ge], genomes=(), ge_index=ge,
        n_features_total=int(ids.size), nnz=-1, group=str(mtx), orientation="cells_cols",
        extra={"feature_types": sorted(set(types.tolist()))},
    )


def needs_row_copy(info: MatrixInfo) -> bool:
    """True for layouts that store genes, not cells, contiguously (MEX, CSC h5ad): reading a
    block of cells from them means reading the whole file, so they are copied once into
    cell order (:func:`row_copy`) before being read block by block."""
    return "rows" not in info.extra and (info.layout == "mex" or (info.layout == "h5ad" and info.orientation == "cells_cols"))


def _mex_header(path: Path) -> tuple[int, int, int, int, bool]:
    """(header lines, rows, cols, entries, integer) of a Matrix Market coordinate file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            first = fh.readline()
            if not first.startswith("%%MatrixMarket"):
                raise InputFormatError(f"{path}: not a Matrix Market file (no %%MatrixMarket banner); pass Cell Ranger's matrix.mtx.gz")
            banner = first.lower().split()
            if "coordinate" not in banner or "pattern" in banner or "complex" in banner:
                raise InputFormatError(f"{path}: a Matrix Market '{' '.join(banner[1:])}' file; counts must be a coordinate integer or real matrix")
            n = 1
            line = fh.readline()
            while line.startswith("%"):
                n += 1
                line = fh.readline()
            size = line.split()
            if len(size) != 3:
                raise InputFormatError(f"{path}: the size line '{line.strip()}' does not hold rows, columns and entries")
            return n + 1, int(size[0]), int(size[1]), int(size[2]), "integer" in banner
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, InputFormatError):
            raise
        raise CorruptInputError(f"{path}: cannot be read as Matrix Market ({_short(exc)}); the file is damaged, copy it again") from exc


def _mex_entries(path: Path, skip: int, integer: bool, chunk: int):
    """(feature, cell, value) arrays of a Matrix Market file, ``chunk`` entries at a time (0-based)."""
    import pandas as pd

    try:
        reader = pd.read_csv(path, sep=" ", header=None, skiprows=skip, chunksize=chunk, usecols=[0, 1, 2],
                             dtype={0: np.int64, 1: np.int64, 2: np.int64 if integer else np.float64}, engine="c")
        for df in reader:
            yield df[0].to_numpy() - 1, df[1].to_numpy() - 1, df[2].to_numpy()
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
        raise CorruptInputError(f"{path}: cannot be read as Matrix Market ({_short(exc)}); the file is damaged, copy it again") from exc


def _gene_major_entries(info: MatrixInfo, chunk: int):
    """(feature, cell, value) arrays of a CSC h5ad's counts, about ``chunk`` entries at a time."""
    indptr = info.extra["indptr"]
    with _open_h5(info.path) as h5:
        g = info.group
        start = 0
        while start < indptr.size - 1:
            stop = int(np.searchsorted(indptr, indptr[start] + chunk, side="right")) - 1
            stop = max(stop, start + 1)
            lo, hi = int(indptr[start]), int(indptr[stop])
            try:
                cells, values = h5[f"{g}/indices"][lo:hi], h5[f"{g}/data"][lo:hi]
            except (OSError, RuntimeError, KeyError) as exc:
                raise CorruptInputError(f"{info.path}: reading '{g}' failed ({_short(exc)}); the file is damaged or truncated") from exc
            genes = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(indptr[start : stop + 1]))
            yield genes, cells.astype(np.int64), values
            start = stop


def _parsed_entries(d: Path, value_dtype: np.dtype, n: int, chunk: int):
    """(feature, cell, value) chunks back from the binary files the first pass wrote."""
    with open(d / "parsed.f", "rb") as ff, open(d / "parsed.c", "rb") as fc, open(d / "parsed.v", "rb") as fv:
        for _ in range(0, n, chunk):
            yield (np.fromfile(ff, dtype=np.int32, count=chunk).astype(np.int64), np.fromfile(fc, dtype=np.int32, count=chunk).astype(np.int64),
                   np.fromfile(fv, dtype=value_dtype, count=chunk))


def row_copy(info: MatrixInfo, directory: str | os.PathLike, *, chunk: int = 1_000_000) -> MatrixInfo:
    """Copy a gene-major matrix (MEX, CSC h5ad) once into cell order under ``directory``.

    Two streaming passes (count the entries of each cell; place each entry at its cell's
    next free slot in memory-mapped arrays), so memory holds one chunk of entries plus two
    integers per cell, whatever the matrix size. Returns a :class:`MatrixInfo` whose
    :func:`read_cells` reads from the copy; the caller owns ``directory``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n_cells, n_feat = info.n_cells, info.n_features_total
    if info.layout == "mex":
        mtx = Path(info.group)
        skip, rows, cols, n_entries, integer = _mex_header(mtx)
        if (rows, cols) != (n_feat, n_cells):
            raise InputFormatError(
                f"{mtx}: the matrix is {rows} x {cols} but the directory lists {n_feat} features and {n_cells} barcodes"
            )
        entries = lambda: _mex_entries(mtx, skip, integer, chunk)  # noqa: E731
        value_dtype = np.int64 if integer else np.float64
    else:
        entries = lambda: _gene_major_entries(info, chunk)  # noqa: E731
        with _open_h5(info.path) as h5:
            value_dtype = h5[f"{info.group}/data"].dtype
        n_entries = int(info.extra["indptr"][-1])
    # a MEX is text: parse it once, keeping the entries in binary files for the second pass
    keep_parsed = info.layout == "mex"
    parsed = [open(d / f"parsed.{k}", "wb") for k in ("f", "c", "v")] if keep_parsed else []
    per_cell = np.zeros(n_cells, dtype=np.int64)
    seen = 0
    for feat, cell, val in entries():
        bad = (feat < 0) | (feat >= n_feat) | (cell < 0) | (cell >= n_cells)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputFormatError(
                f"{info.path}: entry {seen + i + 1} is at feature {feat[i] + 1}, barcode {cell[i] + 1}, outside the "
                f"{n_feat} x {n_cells} matrix; it is inconsistent, regenerate it"
            )
        per_cell += np.bincount(cell, minlength=n_cells)
        seen += feat.size
        if keep_parsed:
            for fh, arr in zip(parsed, (feat.astype(np.int32), cell.astype(np.int32), val.astype(value_dtype))):
                arr.tofile(fh)
    for fh in parsed:
        fh.close()
    if keep_parsed:
        entries = lambda vt=np.dtype(value_dtype), n=seen: _parsed_entries(d, vt, n, chunk)  # noqa: E731
    if seen != n_entries:
        raise InputFormatError(f"{info.path}: holds {seen} entries but its header says {n_entries}; the file is truncated, copy it again")
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(per_cell, out=indptr[1:])
    del per_cell
    if np.dtype(value_dtype).kind in "iu":
        value_dtype = np.int32  # counts beyond int32 are refused when read (_validated)
    data = _Spill(d / "data.bin", value_dtype, seen)
    indices = _Spill(d / "indices.bin", np.int32, seen)
    nxt = indptr[:-1].copy()
    for feat, cell, val in entries():
        order = np.argsort(cell, kind="stable")
        c = cell[order]
        starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        sizes = np.diff(np.r_[starts, c.size])
        pos = nxt[c] + (np.arange(c.size) - np.repeat(starts, sizes))
        v = val[order]
        if value_dtype == np.int32 and v.size and (v.max() > MAX_COUNT or v.min() < np.iinfo(np.int32).min):
            raise InvalidCountsError(f"{info.path}: a count of {v.max() if v.max() > MAX_COUNT else v.min()} is outside the supported range")
        data.put(pos, v)
        indices.put(pos, feat[order])
        nxt[c[starts]] += sizes
    data.close()
    indices.close()
    for k in ("f", "c", "v"):
        (d / f"parsed.{k}").unlink(missing_ok=True)
    np.save(d / "indptr.npy", indptr)
    return replace(info, orientation="cells_rows", nnz=seen,
                   extra={**info.extra, "indptr": indptr, "rows": str(d), "rows_dtype": np.dtype(value_dtype).str})


class _Spill:
    """A file of ``n`` values written at scattered positions through a shared memory map whose
    pages are handed back to the OS after every chunk, so resident memory stays one chunk's."""

    def __init__(self, path: Path, dtype, n: int):
        import mmap

        self._mmap_mod = mmap
        self.dtype = np.dtype(dtype)
        self._fh = open(path, "w+b")
        size = max(1, n) * self.dtype.itemsize
        self._fh.truncate(size)
        self._mm = mmap.mmap(self._fh.fileno(), size)
        self._arr = np.frombuffer(self._mm, dtype=self.dtype)

    def put(self, pos: np.ndarray, values: np.ndarray) -> None:
        self._arr[pos] = values
        self._mm.flush()
        if hasattr(self._mm, "madvise"):
            self._mm.madvise(self._mmap_mod.MADV_DONTNEED)

    def close(self) -> None:
        del self._arr
        self._mm.close()
        self._fh.close()


def check_counts(values: np.ndarray, *, where: str) -> None:
    """Refuse values that are not raw UMI counts (NaN, fractions, negatives, beyond int32), naming ``where``."""
    v = np.asarray(values)
    if v.dtype.kind == "f":
        if not np.all(np.isfinite(v)):
            raise InvalidCountsError(f"{where}: counts include NaN or infinite values; pass raw UMI counts")
        if np.any(v != np.floor(v)):
            raise InvalidCountsError(f"{where}: counts include non-integer values (e.g. {v[v != np.floor(v)][0]:g}); "
                                     "dask-annot needs raw UMI counts, not normalized or log values")
    if v.size and v.min() < 0:
        raise InvalidCountsError(f"{where}: counts include negative values (e.g. {v.min()}); pass raw UMI counts")
    if v.size and v.max() > MAX_COUNT:
        raise InvalidCountsError(f"{where}: a count of {v.max()} exceeds the supported {MAX_COUNT}")


def _validated(info: MatrixInfo, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int, first_cell: int) -> sp.csr_matrix:
    """Build a cells x features CSR block, checking values and indices; keep Gene Expression columns."""
    if data.dtype.kind not in "iuf" or data.ndim != 1:
        raise InvalidCountsError(f"{info.path}: counts are of type {data.dtype} ({data.ndim}-D), expected a 1-D array of numbers")
    if indices.dtype.kind not in "iu" or indices.ndim != 1:
        raise InputFormatError(f"{info.path}: feature indices are of type {indices.dtype} ({indices.ndim}-D), expected 1-D integers; regenerate the matrix")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise InputFormatError(
            f"{info.path}: a feature index is outside 0..{n_cols - 1} (cells from {first_cell}); "
            "the matrix is inconsistent, regenerate it"
        )
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InvalidCountsError(f"{info.path}: counts include NaN or infinite values (cells from {first_cell}); pass raw UMI counts")
        if np.any(data != np.floor(data)):
            bad = data[data != np.floor(data)][0]
            raise InvalidCountsError(
                f"{info.path}: counts include non-integer values (e.g. {bad:g}); "
                "dask-annot needs raw UMI counts, not normalized or log values"
            )
    if data.size and data.min() < 0:
        raise InvalidCountsError(f"{info.path}: counts include negative values (e.g. {data.min()}); pass raw UMI counts")
    if data.size and data.max() > MAX_COUNT:
        raise InvalidCountsError(f"{info.path}: a count of {data.max()} exceeds the supported {MAX_COUNT}")
    block = sp.csr_matrix(
        (data.astype(np.int32), indices.astype(np.int32), (indptr - indptr[0]).astype(np.int64)),
        shape=(indptr.size - 1, n_cols),
    )
    if not block.has_canonical_format:
        block.sum_duplicates()
    if info.ge_index.size != n_cols:
        block = block[:, info.ge_index]
    block.indptr = block.indptr.astype(np.int64)
    return block


def _read_spill(path: Path, dtype: np.dtype, lo: int, hi: int) -> np.ndarray:
    with open(path, "rb") as fh:
        fh.seek(lo * dtype.itemsize)
        return np.fromfile(fh, dtype=dtype, count=hi - lo)


def read_cells(info: MatrixInfo, start: int, stop: int) -> sp.csr_matrix:
    """Cells ``start:stop`` as CSR (cells x Gene Expression features, int32), validated.

    Opens the file itself, so it can run in any worker process.
    """
    start, stop = int(start), int(min(stop, info.n_cells))
    n_cols = info.n_features_total
    if "rows" in info.extra:
        indptr = info.extra["indptr"][start : stop + 1]
        lo, hi = int(indptr[0]), int(indptr[-1])
        d = Path(info.extra["rows"])
        data = _read_spill(d / "data.bin", np.dtype(info.extra["rows_dtype"]), lo, hi)
        indices = _read_spill(d / "indices.bin", np.dtype(np.int32), lo, hi)
        return _validated(info, data, indices, indptr, n_cols, start)
    if needs_row_copy(info):
        with tempfile.TemporaryDirectory(prefix="dask-annot-rows-") as tmp:
            return read_cells(row_copy(info, tmp), start, stop)
    with _open_h5(info.path) as h5:
        g = info.group
        try:
            if info.orientation == "dense":
                dense = np.asarray(h5[g][start:stop])
                block = sp.csr_matrix(dense)
                return _validated(info, block.data, block.indices, block.indptr.astype(np.int64), n_cols, start)
            indptr = info.extra["indptr"][start : stop + 1]
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = h5[f"{g}/data"][lo:hi]
            indices = h5[f"{g}/indices"][lo:hi]
        except (OSError, RuntimeError, KeyError) as exc:
            raise CorruptInputError(
                f"{info.path}: reading counts of cells {start}-{stop - 1} failed ({_short(exc)}); "
                "the file is damaged or truncated, copy it again from its source"
            ) from exc
    return _validated(info, data, indices, indptr, n_cols, start)


class TenxH5Writer:
    """Stream cells into a Cell Ranger v3 HDF5 matrix (CSC, one column per barcode).

    Blocks of cells are appended in order with :meth:`append`; :meth:`close` writes
    the barcodes and shape. Memory use is one block at a time.
    """

    def __init__(self, path: str | os.PathLike, *, feature_ids, feature_names, feature_types=None, genome: str = "", chunk: int = 1 << 16):
        self.path = str(path)
        n = len(feature_ids)
        types = feature_types if feature_types is not None else [GENE_EXPRESSION] * n
        self._h5 = h5py.File(self.path, "w")
        self._h5.attrs["filetype"] = "matrix"
        self._h5.attrs["version"] = np.int64(2)
        self._h5.attrs["software_version"] = "dask-annot"
        g = self._h5.create_group("matrix")
        f = g.create_group("features")
        enc = lambda xs: np.array([str(x).encode() for x in xs], dtype="S")  # noqa: E731
        f.create_dataset("id", data=enc(feature_ids))
        f.create_dataset("name", data=enc(feature_names))
        f.create_dataset("feature_type", data=enc(types))
        f.create_dataset("genome", data=enc([genome] * n))
        f.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        kw = dict(maxshape=(None,), chunks=(chunk,), compression="gzip", compression_opts=4, shuffle=True)
        g.create_dataset("data", shape=(0,), dtype=np.int32, **kw)
        g.create_dataset("indices", shape=(0,), dtype=np.int64, **kw)
        self._n_features = n
        self._indptr = [np.zeros(1, dtype=np.int64)]
        self._nnz = 0
        self._barcodes: list[str] = []

    def append(self, block: sp.spmatrix, barcodes) -> None:
        """Append cells (rows of ``block``, cells x features) with their barcodes."""
        csr = sp.csr_matrix(block)
        csr.sort_indices()
        if csr.shape[1] != self._n_features:
            raise ValueError(f"block has {csr.shape[1]} features, the file {self._n_features}")
        g = self._h5["matrix"]
        k = csr.nnz
        for key, values in (("data", csr.data.astype(np.int32)), ("indices", csr.indices.astype(np.int64))):
            g[key].resize((self._nnz + k,))
            g[key][self._nnz :] = values
        self._indptr.append(csr.indptr[1:].astype(np.int64) + self._nnz)
        self._nnz += k
        self._barcodes.extend(str(b) for b in barcodes)

    def close(self) -> None:
        g = self._h5["matrix"]
        gz = dict(compression="gzip", compression_opts=4)
        g.create_dataset("indptr", data=np.concatenate(self._indptr), **gz)
        g.create_dataset("barcodes", data=np.array([b.encode() for b in self._barcodes], dtype="S"), **gz)
        g.create_dataset("shape", data=np.array([self._n_features, len(self._barcodes)], dtype=np.int32))
        self._h5.close()

    def __enter__(self) -> "TenxH5Writer":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._h5.close()


def write_10x_h5(path: str | os.PathLike, X: sp.spmatrix, *, barcodes, feature_ids, feature_names, feature_types=None, genome: str = "") -> None:
    """Write a cells x features count matrix as a Cell Ranger v3 HDF5 file."""
    with TenxH5Writer(path, feature_ids=feature_ids, feature_names=feature_names, feature_types=feature_types, genome=genome) as w:
        w.append(X, barcodes)
