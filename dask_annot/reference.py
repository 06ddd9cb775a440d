"""Reference models: build one from labelled counts, load one to annotate against.

A reference is a directory, a frozen versioned artifact::

    REF_DIR/reference.json   format, version, name, species, parameters, labels and
                             their Cell Ontology levels, datasets, checksums
    REF_DIR/arrays.npz       genes (ids, symbols), per-gene mean/std, PCA loadings,
                             embedding of every reference cell, label and dataset codes
    REF_DIR/index.pkl        pynndescent index (large references only); rebuilt from
                             the embedding and seed when it cannot be unpickled

It is fitted small on the driver (streaming sums, HVGs, PCA) and applied big on
the workers: :class:`Model` holds what the block kernels need and is shipped to
each worker once.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, InputFormatError, ReferenceArtifactError, check_format
from .normalize import _log_normalize_block, clipped_zscore, gene_moments, mean_var
from .ontology import CL_RELEASE, Levels, levels_for, read_ontology_map

FORMAT = "dask-annot-reference"
FORMAT_VERSION = 1
BUILTIN_DIR = "data/models"
MISSING_LABELS = frozenset({"", "nan", "NaN", "None", "<NA>"})


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded reference: everything the normalize/project/knn/vote kernels need."""

    name: str
    version: str
    species: str
    path: str
    gene_ids: np.ndarray
    gene_names: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    loadings: np.ndarray
    embedding: np.ndarray
    label_codes: np.ndarray
    labels: tuple[str, ...]
    levels: tuple[Levels, ...]
    dataset_codes: np.ndarray
    datasets: tuple[str, ...]
    meta: dict = field(repr=False)
    target_sum: float = 1e4
    clip: float = 10.0

    @property
    def n_cells(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def n_pcs(self) -> int:
        return int(self.loadings.shape[1])

    @cached_property
    def loadings64(self) -> np.ndarray:
        return self.loadings.astype(np.float64)

    @cached_property
    def embedding64(self) -> np.ndarray:
        return self.embedding.astype(np.float64)

    @cached_property
    def embedding_unit(self) -> np.ndarray:
        """Reference cells on the unit sphere: kNN uses cosine (angular) distance."""
        return unit_rows(self.embedding64)

    @cached_property
    def class_sizes(self) -> np.ndarray:
        return np.bincount(self.label_codes, minlength=len(self.labels))

    def ann_index(self):
        """The pynndescent index, unpickled once per process (rebuilt if it cannot be)."""
        return _ann_index(self)

    @cached_property
    def screen_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """For the exact search's float32 screen: the unit embedding transposed
        (PCs x cells), and the same for about 2,048 evenly spaced cells."""
        from .knn import screen_arrays

        return screen_arrays(self.embedding_unit)

    def __getstate__(self):
        state = self.__dict__.copy()  # caches (and indexes) are rebuilt where the model lands
        for key in ("loadings64", "embedding64", "embedding_unit", "screen_arrays"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


_INDEX_BYTES: dict[tuple[str, str], bytes] = {}
_INDEX_CACHE: dict[tuple[str, str, int], object] = {}
_INDEX_LOCK = threading.Lock()


def _ann_index(model: Model):
    """One index object per (reference, thread): pynndescent's search writes to
    buffers held by the index, so threads must not share one. The pickled index
    is read (or, if it cannot be unpickled here, rebuilt from the embedding and
    seed) once per process."""
    ref_key = (model.path, model.meta.get("checksums", {}).get("index.pkl", ""))
    key = (*ref_key, threading.get_ident())
    with _INDEX_LOCK:
        if key in _INDEX_CACHE:
            return _INDEX_CACHE[key]
        blob = _INDEX_BYTES.get(ref_key)
        if blob is None:
            blob = _index_bytes(model)
            _INDEX_BYTES[ref_key] = blob
    index = pickle.loads(blob)
    with _INDEX_LOCK:
        _INDEX_CACHE[key] = index
    return index


def _index_bytes(model: Model) -> bytes:
    p = Path(model.path) / "index.pkl"
    if p.exists():
        blob = p.read_bytes()
        try:
            pickle.loads(blob)
            return blob
        except Exception:  # another pynndescent/numba version: rebuild below
            pass
    knn = model.meta["knn"]
    index = build_ann_index(model.embedding, seed=int(knn["seed"]), n_neighbors=int(knn["n_neighbors"]))
    return pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def build_ann_index(embedding: np.ndarray, *, seed: int, n_neighbors: int = 30):
    """A pynndescent index over the reference embedding, deterministic for a seed."""
    from pynndescent import NNDescent

    index = NNDescent(
        unit_rows(embedding).astype(np.float32), metric="euclidean", n_neighbors=n_neighbors,
        random_state=seed, n_jobs=1, low_memory=True, compressed=False, parallel_batch_queries=False,
    )
    index.prepare()
    return index


def _sha256(path: Path) -> str:
    from .store import file_fingerprint

    return file_fingerprint(path)["sha256"]


def builtin_models() -> dict[str, Path]:
    """Built-in reference name -> directory inside the installed package."""
    root = resources.files("dask_annot").joinpath(BUILTIN_DIR)
    out: dict[str, Path] = {}
    if root.is_dir():
        for d in sorted(root.iterdir(), key=lambda x: x.name):
            if d.joinpath("reference.json").is_file():
                out[d.name] = Path(str(d))
    return out


def load_reference(path: str | os.PathLike) -> Model:
    """Load and check a reference directory (format, version, checksums)."""
    p = Path(path)
    meta_path = p / "reference.json"
    if not meta_path.is_file():
        raise ReferenceArtifactError(
            f"{p}: not a dask-annot reference (no reference.json); build one with `dask-annot build-reference` "
            "or pass a built-in model name (see `dask-annot models`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ReferenceArtifactError(f"{meta_path}: cannot be read as JSON ({exc}); rebuild the reference") from exc
    check_format(meta, format=FORMAT, version=FORMAT_VERSION, where=str(p),
                 remedy="rebuild it with `dask-annot build-reference`", error=ReferenceArtifactError)
    for name, digest in meta.get("checksums", {}).items():
        f = p / name
        if not f.is_file() or _sha256(f) != digest:
            raise ReferenceArtifactError(f"{f}: missing or its checksum differs from reference.json; the reference is damaged, rebuild it")
    try:
        with np.load(p / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ReferenceArtifactError(f"{p / 'arrays.npz'}: cannot be read ({exc}); rebuild the reference") from exc
    labels = tuple(meta["labels"])
    levels = tuple(Levels(**lv) for lv in meta["levels"])
    norm = meta["normalization"]
    return Model(
        name=meta["name"], version=str(meta["version"]), species=meta.get("species", "unknown"), path=str(p.resolve()),
        gene_ids=arrays["gene_ids"].astype(object), gene_names=arrays["gene_names"].astype(object),
        mean=arrays["mean"], std=arrays["std"], loadings=arrays["loadings"], embedding=arrays["embedding"],
        label_codes=arrays["label_codes"], labels=labels, levels=levels,
        dataset_codes=arrays["dataset_codes"], datasets=tuple(meta["datasets"]), meta=meta,
        target_sum=float(norm["target_sum"]), clip=float(norm["clip"]),
    )


def resolve_model(spec: str) -> Model:
    """A model from a built-in name or a reference directory path."""
    builtins = builtin_models()
    if spec in builtins:
        return load_reference(builtins[spec])
    p = Path(spec)
    if p.exists():
        return load_reference(p)
    raise ConfigError(
        f"--cell-annotation-model '{spec}': neither a built-in model ({', '.join(builtins) or 'none installed'}) "
        "nor a reference directory; use `dask-annot models` to list them"
    )


# ----------------------------------------------------------------------------- build


def _read_labels(input_path: Path, barcodes: np.ndarray, *, label_column: str, dataset_column: str | None, labels_csv: str | None):
    import pandas as pd

    if labels_csv:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
        if "barcode" not in table.columns or label_column not in table.columns:
            raise ConfigError(f"{labels_csv}: needs columns 'barcode' and '{label_column}', found {list(table.columns)}")
        table = table.set_index("barcode")
        missing = ~pd.Index(barcodes.astype(str)).isin(table.index)
        if missing.any():
            raise ConfigError(f"{labels_csv}: {int(missing.sum())} barcodes of the matrix have no label row (e.g. {barcodes[missing][0]})")
        table = table.loc[barcodes.astype(str)]
        labels = table[label_column].to_numpy(dtype=object)
        datasets = table[dataset_column].to_numpy(dtype=object) if dataset_column else None
        return labels, datasets
    if input_path.suffix != ".h5ad":
        raise ConfigError(f"{input_path}: a 10x matrix has no labels; pass --labels CSV (barcode,{label_column})")
    import h5py
    from anndata.io import read_elem

    with h5py.File(input_path, "r") as h5:
        def column(col: str) -> np.ndarray:
            if col not in h5["obs"]:
                cols = [k for k in h5["obs"].keys() if not k.startswith("_")]
                raise ConfigError(f"{input_path}: obs has no column '{col}'; columns are {', '.join(cols)}")
            return np.asarray(read_elem(h5["obs"][col]), dtype=object)

        labels = column(label_column)
        datasets = column(dataset_column) if dataset_column else None
    return labels, datasets


def _select_hvg(mean: np.ndarray, var: np.ndarray, n_cells_expr: np.ndarray, n_top: int) -> np.ndarray:
    """Highly variable genes: dispersion normalized within 20 mean bins (Seurat-style)."""
    ok = (mean > 0.0125) & (n_cells_expr >= 3)
    disp = np.full(mean.shape, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp[ok] = np.log(var[ok] / mean[ok])
    edges = np.linspace(mean[ok].min(), mean[ok].max(), 21) if ok.any() else np.array([0.0, 1.0])
    bins = np.clip(np.digitize(mean, edges[1:-1]), 0, 19)
    norm = np.full(mean.shape, -np.inf)
    for b in range(20):
        m = ok & (bins == b)
        if not m.any():
            continue
        d = disp[m]
        sd = d.std()
        norm[m] = (d - d.mean()) / sd if sd > 0 else 0.0
    order = np.lexsort((np.arange(mean.size), -norm))
    chosen = order[: min(n_top, int(ok.sum()))]
    return np.sort(chosen)


def _pca_loadings(gram: np.ndarray, n_pcs: int) -> np.ndarray:
    """Top principal axes (genes x PCs) from the Gram matrix, each signed so its largest entry is positive."""
    import scipy.linalg

    n_pcs = min(n_pcs, gram.shape[0])
    _, vecs = scipy.linalg.eigh(gram, subset_by_index=(gram.shape[0] - n_pcs, gram.shape[0] - 1))
    v = vecs[:, ::-1]
    flip = np.sign(v[np.abs(v).argmax(axis=0), np.arange(n_pcs)])
    return (v * flip).astype(np.float32)


def build_reference(
    input_path: str | os.PathLike,
    *,
    label_column: str,
    name: str,
    output: str | os.PathLike,
    ontology_map: str | os.PathLike | None = None,
    dataset_column: str | None = None,
    labels_csv: str | None = None,
    exclude_labels: tuple[str, ...] = (),
    species: str | None = None,
    version: str = "1",
    n_hvg: int = 1000,
    n_pcs: int = 30,
    scale: bool = True,
    seed: int = 0,
    knn_method: str = "auto",
    cells_per_block: int = 20_000,
) -> Path:
    """Build a reference directory from labelled raw counts; returns its path.

    Streams the counts three times (gene statistics; the Gram matrix of the
    z-scored selected genes, whose eigenvectors are the exact PCA loadings;
    the embedding), so memory holds genes x genes plus the cells x PCs embedding.
    """
    from . import h5, knn

    input_path, output = Path(input_path), Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output}: exists and is not empty; choose a new --output directory for the reference")
    info = h5.open_matrix(input_path)
    labels_raw, datasets_raw = _read_labels(input_path, info.barcodes, label_column=label_column, dataset_column=dataset_column, labels_csv=labels_csv)
    labels_str = np.array(["" if v is None else str(v) for v in labels_raw], dtype=object)
    keep = ~np.isin(labels_str, list(MISSING_LABELS | set(exclude_labels)))
    if keep.sum() < 10:
        raise InputFormatError(f"{input_path}: only {int(keep.sum())} labelled cells after exclusions; a reference needs more")
    omap = read_ontology_map(ontology_map) if ontology_map else {}
    raw_labels = sorted(set(labels_str[keep].tolist()))
    unmapped = [lab for lab in raw_labels if omap and lab not in omap]
    if unmapped:
        raise ConfigError(f"{ontology_map}: no ontology id for label(s) {', '.join(map(repr, unmapped))}; add rows label,ontology_id")
    raw_levels = {lab: levels_for(lab, omap.get(lab)) for lab in raw_labels}
    fine_names = sorted({lv.fine for lv in raw_levels.values()})
    fine_code = {f: i for i, f in enumerate(fine_names)}
    levels_by_fine = {lv.fine: lv for lv in raw_levels.values()}

    keep_idx = np.flatnonzero(keep)
    # pass 1: per-gene sums of log-normalized values over kept cells
    G = info.n_features
    s1 = np.zeros(G)
    s2 = np.zeros(G)
    nexpr = np.zeros(G, dtype=np.int64)
    blocks = []
    for start in range(0, info.n_cells, cells_per_block):
        stop = min(start + cells_per_block, info.n_cells)
        sel = keep_idx[(keep_idx >= start) & (keep_idx < stop)] - start
        if sel.size == 0:
            continue
        block = h5.read_cells(info, start, stop)[sel]
        umi = np.asarray(block.sum(axis=1)).ravel()
        b1, b2, bn = gene_moments(_log_normalize_block(block, umi, 1e4))
        s1 += b1
        s2 += b2
        nexpr += bn
        blocks.append((start, stop, sel))
    n = keep_idx.size
    mean_all, var_all = mean_var(s1, s2, n)
    hvg = _select_hvg(mean_all, var_all, nexpr, n_hvg)
    mean = mean_all[hvg]
    std = np.sqrt(var_all[hvg]) if scale else np.ones(hvg.size)
    std[std == 0] = 1.0

    def z_blocks():
        for start, stop, sel in blocks:
            block = h5.read_cells(info, start, stop)[sel]
            umi = np.asarray(block.sum(axis=1)).ravel()
            logn = _log_normalize_block(block[:, hvg], umi, 1e4).toarray()
            yield clipped_zscore(logn, mean, std, 10.0)

    # pass 2: the genes x genes Gram matrix of the z-scores; its eigenvectors are the
    # PCA loadings (exact, and only genes x genes is ever held, whatever the cell count)
    gram = np.zeros((hvg.size, hvg.size))
    for zb in z_blocks():
        gram += zb.T @ zb
    loadings = _pca_loadings(gram, n_pcs)
    # pass 3: the embedding of every reference cell
    embedding = np.concatenate([(zb @ loadings.astype(np.float64)).astype(np.float32) for zb in z_blocks()], axis=0)

    label_codes = np.array([fine_code[raw_levels[lab].fine] for lab in labels_str[keep_idx]], dtype=np.int32)
    if datasets_raw is not None:
        ds_str = np.array([str(v) for v in datasets_raw[keep_idx]], dtype=object)
        datasets = sorted(set(ds_str.tolist()))
        ds_code = {d: i for i, d in enumerate(datasets)}
        dataset_codes = np.array([ds_code[d] for d in ds_str], dtype=np.int32)
    else:
        datasets = [name]
        dataset_codes = np.zeros(n, dtype=np.int32)
    method = knn.choose_method(n, knn_method)
    knn_meta = {"method": method, "seed": seed, "n_neighbors": 30, "epsilon": 0.2}

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        np.savez(
            tmp / "arrays.npz",
            gene_ids=np.asarray(info.feature_ids[hvg], dtype=str), gene_names=np.asarray(info.feature_names[hvg], dtype=str),
            mean=mean, std=std, loadings=loadings, embedding=embedding, label_codes=label_codes, dataset_codes=dataset_codes,
        )
        checksums = {"arrays.npz": _sha256(tmp / "arrays.npz")}
        if method == "ann":
            index = build_ann_index(embedding, seed=seed, n_neighbors=knn_meta["n_neighbors"])
            with open(tmp / "index.pkl", "wb") as fh:
                pickle.dump(index, fh, protocol=pickle.HIGHEST_PROTOCOL)
            checksums["index.pkl"] = _sha256(tmp / "index.pkl")
        class_sizes = np.bincount(label_codes, minlength=len(fine_names))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "species": species or _guess_species(info.feature_ids, info.feature_names),
            "created_by": f"dask-annot {__version__}",
            "source": {"file": input_path.name, "label_column": label_column, "dataset_column": dataset_column,
                       "excluded_labels": sorted(set(exclude_labels)), "n_cells_input": info.n_cells,
                       "n_cells_excluded": int(info.n_cells - n), **_file_digest(input_path)},
            "n_cells": int(n),
            "n_genes": int(hvg.size),
            "n_pcs": int(loadings.shape[1]),
            "normalization": {"target_sum": 1e4, "log1p": True, "zscore": "reference mean/std (population)" if scale else "reference mean (centred, not scaled)", "clip": 10.0,
                              "hvg": {"flavor": "dispersion normalized in 20 mean bins", "n_top": n_hvg}},
            "labels": fine_names,
            "label_counts": {f: int(c) for f, c in zip(fine_names, class_sizes)},
            "levels": [vars(levels_by_fine[f]) | {} for f in fine_names],
            "input_labels": {lab: raw_levels[lab].fine for lab in raw_labels},
            "ontology": {"release": CL_RELEASE, "mapped": bool(omap)},
            "datasets": list(datasets),
            "knn": knn_meta,
            "checksums": checksums,
        }
        (tmp / "reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _file_digest(p: Path) -> dict:
    from .store import file_fingerprint

    return file_fingerprint(p)


def _guess_species(ids: np.ndarray, names: np.ndarray) -> str:
    ids = np.asarray(ids, dtype=str)
    if np.mean([x.startswith("ENSMUSG") for x in ids[:1000]]) > 0.5:
        return "mouse"
    if np.mean([x.startswith("ENSG") for x in ids[:1000]]) > 0.5:
        return "human"
    names = np.asarray(names, dtype=str)
    alpha = [x for x in names[:5000] if x[:1].isalpha() and len(x) > 2]
    if not alpha:
        return "unknown"
    upper = np.mean([x == x.upper() for x in alpha])
    return "human" if upper > 0.8 else ("mouse" if upper < 0.3 else "unknown")
