"""The converted matrix: a versioned, cell-chunked, compressed zarr store.

Layout (zarr v3 group; CSR with one row per cell, Gene Expression features only)::

    STORE.zarr/
      zarr.json            attrs: format, format_version, source (path, size, sha256), counts
      X/data   int32 (nnz)         X/indices int32 (nnz)       X/indptr int64 (n_cells + 1)
      obs/barcode  str             obs/umi_count int64 (Gene Expression total per cell)
      var/feature_id str           var/feature_name str

The CSR arrays are flat, so the store can be read back at any cell chunking: the
cell chunk size is a property of the Dask graph, not of the file. Conversion
streams a bounded number of cells at a time and writes into a temporary
directory that is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec

from . import h5
from .errors import OutputError, StoreError, check_format

FORMAT = "dask-annot-store"
FORMAT_VERSION = 1
_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
_NNZ_CHUNK = 1 << 21
_CELL_CHUNK = 1 << 16


@dataclass(frozen=True)
class StoreInfo:
    """Metadata of an opened store; arrays stay on disk."""

    path: str
    n_cells: int
    n_features: int
    nnz: int
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    umi_count: np.ndarray
    source: dict

    @property
    def genomes(self) -> tuple[str, ...]:
        return tuple(self.source.get("genomes", ()))


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size and SHA-256 of a file, or of every file below a directory (sorted)."""
    p = Path(path)
    digest = hashlib.sha256()
    size = 0
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            digest.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def is_store(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "zarr.json").exists() and (p / "X").exists()


def convert(matrix: str | os.PathLike, output: str | os.PathLike, *, cells_per_block: int = 20_000, fingerprint: dict | None = None) -> StoreInfo:
    """Convert a count matrix into a store at ``output``; reuse a valid existing one.

    A store already at ``output`` is reused only when it was made from a file of
    the same size and SHA-256; one from another input raises :class:`StoreError`.
    """
    matrix, output = Path(matrix), Path(output)
    info = h5.open_matrix(matrix)
    fp = fingerprint or file_fingerprint(matrix)
    if output.exists():
        existing = open_store(output)
        if existing.source.get("sha256") == fp["sha256"] and existing.source.get("size") == fp["size"]:
            return existing
        raise StoreError(
            f"{output}: holds the converted matrix of another input ({existing.source.get('path')}); "
            "remove it or choose another --output / --output-dir"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write(info, tmp, fp, cells_per_block)
        os.replace(tmp, output)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"{output}: writing the converted store failed ({exc.strerror or exc}); "
            "free disk space or choose another --output-dir / --output"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(output)


def _remove_stale_temporaries(output: Path) -> None:
    """Delete half-written stores left by killed conversions (their process is gone)."""
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1].removesuffix(".rows")  # .rows: a MEX / CSC cell-order copy
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _text_array(group: zarr.Group, name: str, values: np.ndarray) -> None:
    arr = np.asarray([str(v) for v in values], dtype=object)
    z = group.create_array(name, shape=arr.shape, dtype=str, chunks=(max(1, min(arr.size, _CELL_CHUNK * 4)),), compressors=[_CODEC])
    z[:] = arr


def _append_block(block, start: int, stop: int, nnz: int, data, indices, indptr, totals) -> int:
    k = block.nnz
    if nnz + k > data.shape[0]:
        new = max(nnz + k, 2 * data.shape[0])
        data.resize((new,))
        indices.resize((new,))
    if k:
        data[nnz : nnz + k] = block.data
        indices[nnz : nnz + k] = block.indices
    indptr[start + 1 : stop + 1] = block.indptr[1:] + nnz
    totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
    return nnz + k


def _write(info: h5.MatrixInfo, tmp: Path, fp: dict, cells_per_block: int) -> None:
    if h5.needs_row_copy(info):  # MEX / CSC h5ad: copied once into cell order, not re-read per block
        rows = tmp.with_name(tmp.name + ".rows")
        try:
            return _write(h5.row_copy(info, rows), tmp, fp, cells_per_block)
        finally:
            shutil.rmtree(rows, ignore_errors=True)
    root = zarr.open_group(tmp, mode="w", zarr_format=3)
    x = root.create_group("X")
    cap = max(info.nnz, 1) if info.nnz >= 0 else 1 << 20
    data = x.create_array("data", shape=(cap,), dtype=np.int32, chunks=(_NNZ_CHUNK,), compressors=[_CODEC])
    indices = x.create_array("indices", shape=(cap,), dtype=np.int32, chunks=(_NNZ_CHUNK,), compressors=[_CODEC])
    indptr = np.zeros(info.n_cells + 1, dtype=np.int64)
    totals = np.zeros(info.n_cells, dtype=np.int64)
    nnz = 0
    starts = list(range(0, info.n_cells, cells_per_block))
    # read block i+1 (HDF5 inflates under h5py's lock) while block i is compressed and
    # written (zarr's codecs release the GIL): 10.0 -> 7.4 s per 200k cells, measured
    with ThreadPoolExecutor(1, thread_name_prefix="dask-annot-read") as reader:
        ahead = reader.submit(h5.read_cells, info, 0, cells_per_block) if starts else None
        for i, start in enumerate(starts):
            stop = min(start + cells_per_block, info.n_cells)
            block = ahead.result()
            if i + 1 < len(starts):
                ahead = reader.submit(h5.read_cells, info, starts[i + 1], starts[i + 1] + cells_per_block)
            nnz = _append_block(block, start, stop, nnz, data, indices, indptr, totals)
    data.resize((nnz,))
    indices.resize((nnz,))
    x.create_array("indptr", data=indptr, chunks=(_CELL_CHUNK,), compressors=[_CODEC])
    obs = root.create_group("obs")
    _text_array(obs, "barcode", info.barcodes)
    obs.create_array("umi_count", data=totals, chunks=(_CELL_CHUNK,), compressors=[_CODEC])
    var = root.create_group("var")
    _text_array(var, "feature_id", info.feature_ids)
    _text_array(var, "feature_name", info.feature_names)
    root.attrs.update(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": {
                "path": str(Path(info.path).resolve()),
                "layout": info.layout,
                "genomes": list(info.genomes),
                "n_features_total": info.n_features_total,
                "feature_types": info.extra.get("feature_types", []),
                **fp,
            },
            "n_cells": info.n_cells,
            "n_features": info.n_features,
            "nnz": int(nnz),
        }
    )


def open_store(path: str | os.PathLike) -> StoreInfo:
    """Open and check a store: format name and version, and array consistency."""
    p = Path(path)
    if not is_store(p):
        raise StoreError(f"{p}: not a dask-annot store (no zarr.json / X); convert the matrix again with `dask-annot convert`")
    try:
        root = zarr.open_group(p, mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception as exc:  # zarr raises several types for damaged metadata
        raise StoreError(f"{p}: the store's metadata cannot be read ({exc}); delete the store and convert again") from exc
    check_format(attrs, format=FORMAT, version=FORMAT_VERSION, where=str(p),
                 remedy="delete the store and convert again", error=StoreError)
    try:
        n_cells, n_features, nnz = int(attrs["n_cells"]), int(attrs["n_features"]), int(attrs["nnz"])
        barcodes = np.asarray(root["obs/barcode"][:], dtype=object)
        umi = np.asarray(root["obs/umi_count"][:])
        ids = np.asarray(root["var/feature_id"][:], dtype=object)
        names = np.asarray(root["var/feature_name"][:], dtype=object)
        shapes = (root["X/data"].shape[0], root["X/indices"].shape[0], root["X/indptr"].shape[0])
    except Exception as exc:
        raise StoreError(f"{p}: the store is incomplete or damaged ({exc}); delete it and convert again") from exc
    if barcodes.size != n_cells or umi.size != n_cells or ids.size != n_features or shapes != (nnz, nnz, n_cells + 1):
        raise StoreError(f"{p}: array sizes disagree with the store's metadata; delete it and convert again")
    return StoreInfo(
        path=str(p), n_cells=n_cells, n_features=n_features, nnz=nnz, barcodes=barcodes,
        feature_ids=ids, feature_names=names, umi_count=umi, source=dict(attrs.get("source", {})),
    )


def read_block(path: str, start: int, stop: int, n_features: int) -> sp.csr_matrix:
    """Cells ``start:stop`` of a store as CSR (pure: opens the store itself)."""
    root = zarr.open_group(path, mode="r", zarr_format=3)
    indptr = np.asarray(root["X/indptr"][start : stop + 1])
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = np.asarray(root["X/data"][lo:hi]) if hi > lo else np.zeros(0, np.int32)
    indices = np.asarray(root["X/indices"][lo:hi]) if hi > lo else np.zeros(0, np.int32)
    return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, n_features))


def read_barcodes(path: str, start: int, stop: int) -> np.ndarray:
    """Barcodes ``start:stop`` of a store (a task reads its own, so graphs do not carry them)."""
    root = zarr.open_group(path, mode="r", zarr_format=3)
    return np.asarray(root["obs/barcode"][start:stop], dtype=object)


def read_umi(path: str, start: int, stop: int) -> np.ndarray:
    """UMI totals of cells ``start:stop`` of a store (read by the task, not carried by the graph)."""
    root = zarr.open_group(path, mode="r", zarr_format=3)
    return np.asarray(root["obs/umi_count"][start:stop])


def cell_chunks(n_cells: int, chunk_cells: int) -> tuple[int, ...]:
    """Chunk sizes along cells for a given chunk length (the last one may be shorter)."""
    if chunk_cells <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_cells}")
    full, rest = divmod(n_cells, chunk_cells)
    return (chunk_cells,) * full + ((rest,) if rest else ())


def counts_array(store: StoreInfo, *, chunk_cells: int) -> da.Array:
    """The store's counts as a lazy Dask array of CSR blocks (cells x genes), chunked along cells."""
    meta = sp.csr_matrix((0, store.n_features), dtype=np.int32)
    blocks = []
    start = 0
    for size in cell_chunks(store.n_cells, chunk_cells):
        task = dask.delayed(read_block, pure=True)(store.path, start, start + size, store.n_features)
        blocks.append(da.from_delayed(task, shape=(size, store.n_features), dtype=np.int32, meta=meta))
        start += size
    return da.concatenate(blocks, axis=0)


def umi_array(store: StoreInfo, *, chunk_cells: int) -> da.Array:
    """Per-cell Gene Expression totals, chunked like :func:`counts_array`."""
    return da.from_array(store.umi_count, chunks=(cell_chunks(store.n_cells, chunk_cells),))


def summary(store: StoreInfo) -> str:
    return json.dumps({"cells": store.n_cells, "features": store.n_features, "nnz": store.nnz})
