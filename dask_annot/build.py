"""Build a reference model from labelled counts (the other half of :mod:`dask_annot.reference`).

The counts are streamed three times (gene statistics; the Gram matrix of the
z-scored selected genes, whose eigenvectors are the exact PCA loadings; the
embedding), so memory holds genes x genes plus the cells x PCs embedding,
whatever the number of cells. The artifact is written to a temporary directory
and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, confidence, h5, knn
from .errors import ConfigError, InputFormatError
from .normalize import clipped_zscore, gene_moments, log_normalize_block, mean_var
from .ontology import CL_RELEASE, levels_for, read_ontology_map
from .reference import FORMAT, FORMAT_VERSION, MISSING_LABELS
from .store import file_fingerprint


def read_labels(input_path: Path, barcodes: np.ndarray, *, label_column: str, dataset_column: str | None, labels_csv: str | None):
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


def select_hvg(mean: np.ndarray, var: np.ndarray, n_cells_expr: np.ndarray, n_top: int) -> np.ndarray:
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


def pca_loadings(gram: np.ndarray, n_pcs: int) -> np.ndarray:
    """Top principal axes (genes x PCs) from the Gram matrix, each signed so its largest entry is positive."""
    import scipy.linalg

    n_pcs = min(n_pcs, gram.shape[0])
    _, vecs = scipy.linalg.eigh(gram, subset_by_index=(gram.shape[0] - n_pcs, gram.shape[0] - 1))
    v = vecs[:, ::-1]
    flip = np.sign(v[np.abs(v).argmax(axis=0), np.arange(n_pcs)])
    return (v * flip).astype(np.float32)


@dataclass
class LabelledCells:
    """The labelled cells a reference is built from: where they are, which to keep, their labels.

    ``read(start, stop)`` gives raw counts of input cells ``start:stop`` (CSR, cells x
    ``gene_ids``); ``keep`` marks the cells that go into the reference (labelled, not
    excluded); ``labels`` / ``datasets`` are per input cell (text).
    """

    info: h5.MatrixInfo
    labels: np.ndarray
    datasets: np.ndarray | None
    keep: np.ndarray
    provenance: dict

    @property
    def gene_ids(self) -> np.ndarray:
        return np.asarray(self.info.feature_ids, dtype=str)

    @property
    def gene_names(self) -> np.ndarray:
        return np.asarray(self.info.feature_names, dtype=str)

    def read(self, start: int, stop: int):
        if h5.needs_row_copy(self.info):  # MEX / CSC h5ad: copied once into cell order, kept while this object lives
            self._rows = tempfile.TemporaryDirectory(prefix="dask-annot-rows-")
            self.info = h5.row_copy(self.info, self._rows.name)
        block = h5.read_cells(self.info, start, stop)
        if block.indices.dtype != block.indptr.dtype:  # scipy < 1.13 cannot row-index a CSR whose two differ
            block.indices = block.indices.astype(block.indptr.dtype)
        return block

    def kept_blocks(self, cells_per_block: int):
        """(start, stop, rows kept within the block) for every block holding a kept cell."""
        keep_idx = np.flatnonzero(self.keep)
        for start in range(0, self.info.n_cells, cells_per_block):
            stop = min(start + cells_per_block, self.info.n_cells)
            sel = keep_idx[(keep_idx >= start) & (keep_idx < stop)] - start
            if sel.size:
                yield start, stop, sel


def with_ensembl_ids(info: h5.MatrixInfo, table: str | os.PathLike) -> h5.MatrixInfo:
    """``info`` with Ensembl ids for its symbols, from a 10x matrix's feature table (``table``: any
    matrix :func:`h5.open_matrix` reads, e.g. a Cell Ranger GRCh38 H5); ``""`` where the table
    lacks a symbol or repeats it, so those genes match queries by symbol."""
    from dataclasses import replace

    from .align import ensembl_ids_for_symbols, looks_like_ensembl

    if looks_like_ensembl(info.feature_ids):
        return info
    t = h5.open_matrix(table)
    ids = ensembl_ids_for_symbols(info.feature_names, table_ids=t.feature_ids, table_names=t.feature_names)
    return replace(info, feature_ids=ids)


def open_labelled_cells(input_path: Path, *, label_column: str, dataset_column: str | None, labels_csv: str | None,
                        exclude_labels: tuple[str, ...], gene_id_table: str | os.PathLike | None = None) -> LabelledCells:
    """Open the input matrix and its labels; refuse one with too few labelled cells."""
    info = h5.open_matrix(input_path)
    if gene_id_table:
        info = with_ensembl_ids(info, gene_id_table)
    labels_raw, datasets_raw = read_labels(input_path, info.barcodes, label_column=label_column, dataset_column=dataset_column, labels_csv=labels_csv)
    labels = np.array(["" if v is None else str(v) for v in labels_raw], dtype=object)
    keep = ~np.isin(labels, list(MISSING_LABELS | set(exclude_labels)))
    if keep.sum() < 10:
        raise InputFormatError(f"{input_path}: only {int(keep.sum())} labelled cells after exclusions; a reference needs more")
    datasets = np.array([str(v) for v in datasets_raw], dtype=object) if datasets_raw is not None else None
    provenance = {"file": input_path.name, "label_column": label_column, "dataset_column": dataset_column,
                  "excluded_labels": sorted(set(exclude_labels)), "n_cells_input": info.n_cells,
                  "n_cells_excluded": int(info.n_cells - keep.sum()), **file_fingerprint(input_path)}
    return LabelledCells(info=info, labels=labels, datasets=datasets, keep=keep, provenance=provenance)


@dataclass
class GeneStatistics:
    """Pass 1: per gene of the universe, moments of the log-normalized values over kept cells."""

    s1: np.ndarray
    s2: np.ndarray
    n_expressing: np.ndarray
    n_cells: int


def _over_kept_blocks(cells: LabelledCells, cells_per_block: int, kernel, *args, window: int | None = None):
    """``kernel(raw counts of a block's kept cells, *args)`` for every block, in block order.

    An input that reads in Dask tasks (the Census: ``cells.map_kept_blocks``) runs the kernel
    in the task that read the slice; the results still come in block order, so the sums made
    from them are the same as reading here."""
    mapper = getattr(cells, "map_kept_blocks", None)
    if mapper is not None:
        return mapper(cells_per_block, kernel, *args, window=window)
    return (kernel(cells.read(start, stop)[sel], *args) for start, stop, sel in cells.kept_blocks(cells_per_block))


def _block_moments(block, target_sum: float):
    """Pass 1's kernel: moments of one block's log-normalized values, and its cell count."""
    umi = np.asarray(block.sum(axis=1)).ravel()
    return (*gene_moments(log_normalize_block(block, umi, target_sum)), block.shape[0])


def _block_zscores(block, hvg: np.ndarray, mean: np.ndarray, std: np.ndarray, target_sum: float, clip: float) -> np.ndarray:
    """Clipped z-scores of the selected genes; each cell is scaled by its total over the whole
    universe (as queries are, see :mod:`dask_annot.normalize`)."""
    umi = np.asarray(block.sum(axis=1)).ravel()
    logn = log_normalize_block(block[:, hvg], umi, target_sum).toarray()
    return clipped_zscore(logn, mean, std, clip)


def _block_gram(block, hvg, mean, std, target_sum, clip) -> np.ndarray:
    """Pass 2's kernel: one block's share of the z-scores' genes x genes Gram matrix."""
    zb = _block_zscores(block, hvg, mean, std, target_sum, clip)
    return zb.T @ zb


def _block_embedding(block, hvg, mean, std, target_sum, clip, w: np.ndarray) -> np.ndarray:
    """Pass 3's kernel: one block's embedding."""
    return project_one_thread(_block_zscores(block, hvg, mean, std, target_sum, clip), w).astype(np.float32)


def project_one_thread(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``z @ w`` on one BLAS thread: OpenBLAS splits this product differently over its threads
    (real z-scores: last-bit differences between 1 and 2 threads), and a reference must not
    depend on where its blocks were computed (a Dask worker's BLAS has one thread, the driver all)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return z @ w


def _block_counts(block):
    """The raw counts themselves (confidence reads them twice)."""
    return block


def _gene_pass(cells: LabelledCells, cells_per_block: int, target_sum: float) -> GeneStatistics:
    G = cells.gene_ids.size
    s1, s2 = np.zeros(G), np.zeros(G)
    nexpr = np.zeros(G, dtype=np.int64)
    n = 0
    for b1, b2, bn, m in _over_kept_blocks(cells, cells_per_block, _block_moments, target_sum):
        s1 += b1
        s2 += b2
        nexpr += bn
        n += m
    return GeneStatistics(s1=s1, s2=s2, n_expressing=nexpr, n_cells=n)


def _label_table(cells: LabelledCells, ontology_map, *, merge_same_term: bool = False) -> tuple[list[str], dict, dict]:
    """Fine label names (sorted), raw label -> Levels, and fine name -> Levels.

    Labels the map sends to the same Cell Ontology term would become one class: refused
    unless ``merge_same_term`` (a reference built from CELLxGENE has CL ids as labels, its
    own map, ``cells.ontology_map``)."""
    omap = getattr(cells, "ontology_map", None) or (read_ontology_map(ontology_map) if ontology_map else {})
    raw_labels = sorted(set(cells.labels[cells.keep].tolist()))
    unmapped = [lab for lab in raw_labels if omap and lab not in omap]
    if unmapped:
        raise ConfigError(f"{ontology_map}: no ontology id for label(s) {', '.join(map(repr, unmapped))}; add rows label,ontology_id")
    raw_levels = {lab: levels_for(lab, omap.get(lab)) for lab in raw_labels}
    by_fine: dict[str, list[str]] = {}
    for lab, lv in raw_levels.items():
        by_fine.setdefault(lv.fine, []).append(lab)
    merged = {f: labs for f, labs in by_fine.items() if len(labs) > 1}
    if merged and not merge_same_term:
        f, labs = next(iter(sorted(merged.items())))
        raise ConfigError(
            f"{ontology_map or 'the labels'}: {', '.join(map(repr, labs))} map to the same Cell Ontology term ('{f}') and would "
            f"become one class{f' ({len(merged)} such terms)' if len(merged) > 1 else ''}; map them to distinct terms, "
            "or pass --merge-same-term to pool them"
        )
    fine_names = sorted({lv.fine for lv in raw_levels.values()})
    return fine_names, raw_levels, {lv.fine: lv for lv in raw_levels.values()}


def _write_artifact(output: Path, arrays: dict[str, np.ndarray], meta: dict, *, extra_files=None) -> Path:
    """Write arrays.npz, any extra files (name -> writer(path)) and reference.json into a
    temporary directory beside ``output``, with checksums, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a reference is meant to be shared
    try:
        np.savez_compressed(tmp / "arrays.npz", **arrays)
        checksums = {"arrays.npz": _sha256_of(tmp / "arrays.npz")}
        for fname, writer in (extra_files or {}).items():
            writer(tmp / fname)
            checksums[fname] = _sha256_of(tmp / fname)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "checksums": checksums}
        (tmp / "reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


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
    shard_cells: int | None = None,
    ivf_lists: int | None = None,
    ivf_probes: int | None = None,
    gene_id_table: str | os.PathLike | None = None,
    cells: LabelledCells | None = None,
    merge_same_term: bool = False,
) -> Path:
    """Build a kNN reference directory from labelled raw counts; returns its path.

    Streams the counts three times (gene statistics; the Gram matrix of the
    z-scored selected genes, whose eigenvectors are the exact PCA loadings;
    the embedding), so memory holds genes x genes plus the cells x PCs embedding.
    The input's whole gene list is kept as the reference's gene universe: a query
    is scaled by its total over the same genes (see :mod:`dask_annot.normalize`).
    ``gene_id_table``: a 10x matrix whose features give Ensembl ids to an input that has
    symbols only, so queries with ids match by id (:func:`with_ensembl_ids`).
    ``cells``: an input already opened (e.g. CELLxGENE files or the Census, see
    :mod:`dask_annot.sources`); ``input_path`` and the label options are then unused.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output}: exists and is not empty; choose a new --output directory for the reference")
    target_sum, clip = 1e4, 10.0
    if cells is None:
        cells = open_labelled_cells(Path(input_path), label_column=label_column, dataset_column=dataset_column,
                                    labels_csv=labels_csv, exclude_labels=exclude_labels, gene_id_table=gene_id_table)
    fine_names, raw_levels, levels_by_fine = _label_table(cells, ontology_map, merge_same_term=merge_same_term)
    fine_code = {f: i for i, f in enumerate(fine_names)}

    # pass 1: gene statistics -> highly variable genes and their mean / std
    stats = _gene_pass(cells, cells_per_block, target_sum)
    n = stats.n_cells
    mean_all, var_all = mean_var(stats.s1, stats.s2, n)
    hvg = select_hvg(mean_all, var_all, stats.n_expressing, n_hvg)
    mean = mean_all[hvg]
    std = np.sqrt(var_all[hvg]) if scale else np.ones(hvg.size)
    std[std == 0] = 1.0
    # pass 2: the genes x genes Gram matrix of the z-scores; its eigenvectors are the
    # PCA loadings (exact, and only genes x genes is ever held, whatever the cell count)
    gram = np.zeros((hvg.size, hvg.size))
    for g in _over_kept_blocks(cells, cells_per_block, _block_gram, hvg, mean, std, target_sum, clip):
        gram += g
    loadings = pca_loadings(gram, n_pcs)
    # pass 3: the embedding of every reference cell
    w = loadings.astype(np.float64)
    embedding = np.concatenate(list(_over_kept_blocks(cells, cells_per_block, _block_embedding, hvg, mean, std, target_sum, clip, w)), axis=0)

    kept_labels = cells.labels[cells.keep]
    label_codes = np.array([fine_code[raw_levels[lab].fine] for lab in kept_labels], dtype=np.int32)
    if cells.datasets is not None:
        ds_str = cells.datasets[cells.keep]
        datasets = sorted(set(ds_str.tolist()))
        ds_code = {d: i for i, d in enumerate(datasets)}
        dataset_codes = np.array([ds_code[d] for d in ds_str], dtype=np.int32)
    else:
        datasets = [name]
        dataset_codes = np.zeros(n, dtype=np.int32)
    shard_files, shard_meta = knn.plan_shards(embedding, n_cells=n, knn_method=knn_method, shard_cells=shard_cells,
                                              ivf_lists=ivf_lists, ivf_probes=ivf_probes, seed=seed)
    method = knn.choose_method(n, knn_method, has_ivf=bool(shard_meta and shard_meta["ivf"]))
    knn_meta = {"method": method, "seed": seed, "n_neighbors": 30, "epsilon": 0.2}
    extra_files = dict(shard_files)
    if method == "ann":
        def write_index(path: Path) -> None:
            index = knn.build_ann_index(embedding, seed=seed, n_neighbors=knn_meta["n_neighbors"])
            with open(path, "wb") as fh:
                pickle.dump(index, fh, protocol=pickle.HIGHEST_PROTOCOL)
        extra_files["index.pkl"] = write_index

    arrays = dict(
        universe_ids=cells.gene_ids, universe_names=cells.gene_names, hvg_index=hvg.astype(np.int64),
        mean=mean, std=std, loadings=loadings, embedding=embedding, label_codes=label_codes, dataset_codes=dataset_codes,
    )
    class_sizes = np.bincount(label_codes, minlength=len(fine_names))
    meta = {
        "kind": "knn",
        "name": name,
        "version": version,
        "species": species or guess_species(cells.gene_ids, cells.gene_names),
        "created_by": f"dask-annot {__version__}",
        "source": cells.provenance,
        "n_cells": int(n),
        "n_genes": int(hvg.size),
        "n_universe_genes": int(cells.gene_ids.size),
        "n_pcs": int(loadings.shape[1]),
        "normalization": {"target_sum": target_sum, "log1p": True, "size": "each cell's total over the reference's gene universe",
                          "zscore": "reference mean/std (population)" if scale else "reference mean (centred, not scaled)", "clip": clip,
                          "hvg": {"flavor": "dispersion normalized in 20 mean bins", "n_top": n_hvg}},
        "labels": fine_names,
        "label_counts": {f: int(c) for f, c in zip(fine_names, class_sizes)},
        "levels": [vars(levels_by_fine[f]) | {} for f in fine_names],
        "input_labels": {lab: raw_levels[lab].fine for lab in raw_levels},
        "ontology": {"release": CL_RELEASE, "mapped": any(lv.ontology_id for lv in raw_levels.values())},
        "datasets": list(datasets),
        "knn": knn_meta,
        **({"shards": shard_meta} if shard_meta else {}),
    }
    # novelty thresholds and calibration maps (see dask_annot.confidence)
    meta["confidence"], conf_arrays = confidence.fit(
        lambda: _over_kept_blocks(cells, cells_per_block, _block_counts, window=1), label_codes=label_codes,
        labels=fine_names, levels=[levels_by_fine[f] for f in fine_names], embedding=embedding, dataset_codes=dataset_codes,
        n_datasets=len(datasets), n_genes=int(cells.gene_ids.size), seed=seed)
    arrays.update(conf_arrays)
    return _write_artifact(output, arrays, meta, extra_files=extra_files)


def build_marker_reference(table: str | os.PathLike, *, name: str, output: str | os.PathLike, species: str = "human",
                           version: str = "1") -> Path:
    """Build a marker model directory (``kind: markers``) from a marker table CSV; see
    :func:`dask_annot.markers.read_marker_table` for the columns."""
    from .markers import marker_artifact, read_marker_table

    table, output = Path(table), Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output}: exists and is not empty; choose a new --output directory for the reference")
    parsed = read_marker_table(table)
    source = {"path": table.name, "sha256": _sha256_of(table)}
    arrays, meta = marker_artifact(parsed, name=name, species=species, version=version, source=source)
    meta["created_by"] = f"dask-annot {__version__}"
    meta["ontology"] = {"release": CL_RELEASE}
    return _write_artifact(output, arrays, meta)


def reshard_reference(source: str | os.PathLike, output: str | os.PathLike, *, shard_cells: int) -> Path:
    """A copy of a built kNN reference split into shards of ``shard_cells`` cells; the same
    arrays, labels and inverted lists (so annotate's outputs do not change), new shard files."""
    from .reference import read_artifact

    source, output = Path(source), Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output}: exists and is not empty; choose a new --output directory for the reference")
    if shard_cells < 1:
        raise ConfigError(f"--shard-cells {shard_cells}: must be a positive number")
    meta, arrays = read_artifact(source, kind="knn")
    old = meta.get("shards") or {}
    ivf = old.get("ivf")
    cent = np.load(source / knn.IVF_CENTROIDS) if ivf else None
    files, smeta = knn.shard_writers(arrays["embedding"], shard_cells=shard_cells, n_lists=None, seed=int(meta["knn"]["seed"]),
                                     centroids=cent)
    if ivf:
        smeta["ivf"] = ivf
    extra = dict(files)
    for name in meta.get("checksums", {}):  # other files (a pynndescent index) are copied as they are
        if name != "arrays.npz" and not name.startswith(knn.SHARD_DIR + "/"):
            extra[name] = lambda path, name=name: shutil.copyfile(source / name, path)
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "checksums", "shards")}
    return _write_artifact(output, arrays, {**keep, "shards": smeta}, extra_files=extra)


def _sha256_of(p: Path) -> str:
    return file_fingerprint(p)["sha256"]


def guess_species(ids: np.ndarray, names: np.ndarray) -> str:
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
