"""The annotate run: the only module that knows the stage order and calls ``compute``.

matrix -> store (zarr, reused) -> align -> normalize -> project -> knn -> vote
-> outputs, then DE on the final coarse types; run.json is written last.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask
import dask.array as da
from dask.delayed import Delayed
import numpy as np

from . import (__version__, align, confidence, consensus, de, h5, knn, markers, normalize, outputs, project, refcache, store,
               summary, visium, vote)
from .config import Settings
from .errors import ConfigError, DaskAnnotError, GeneOverlapError, OutputError, TooFewCellsError
from .models import builtin_models, load_model, model_kind, resolve_model
from .reference import Model, load_reference

DE_CHUNK_CELLS = 16_384  # fixed, so DE sums (and so its digits) never depend on --chunk-cells


@dataclass
class Timer:
    stages: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter)

    def stage(self, name: str):
        timer = self

        class _S:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = round(timer.stages.get(name, 0.0) + time.perf_counter() - self.t, 3)

        return _S()

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self._t0, 3)


@dataclass(frozen=True)
class RunResult:
    model_dir: Path
    record: dict
    embedding2d: np.ndarray | None = None  # first two reference PCs per cell, matrix order
    positions: Any = None  # visium.Positions of the cells (Visium HD with cell geometry), matrix order
    calls: np.ndarray | None = None  # outputs.CALL_DTYPE per cell, matrix order


def _versions() -> dict:
    import h5py
    import pandas
    import scipy
    import zarr

    out = {"dask-annot": __version__, "python": platform.python_version(), "dask": dask.__version__,
           "numpy": np.__version__, "scipy": scipy.__version__, "pandas": pandas.__version__,
           "zarr": zarr.__version__, "h5py": h5py.__version__}
    try:
        import distributed

        out["distributed"] = distributed.__version__
    except ImportError:
        pass
    if "pynndescent" in sys.modules:
        out["pynndescent"] = getattr(sys.modules["pynndescent"], "__version__", "?")
    return out


def embedding(st: store.StoreInfo, mdl: Model, al: align.Alignment, *, chunk_cells: int, model_d=None):
    """Lazy reference-PCA coordinates of every cell (cells x PCs, float32): align to the
    reference's gene universe, log-normalize by the universe total, then the sparse form
    of z-score + projection of the selected genes."""
    model_d = model_d if model_d is not None else dask.delayed(mdl, pure=True, traverse=False)
    proj = project.projection_matrix(mdl.loadings, al.query_index[mdl.hvg_index] >= 0, what=str(st.source.get("path", st.path)))
    terms_d = dask.delayed(project.projection_terms(proj, mdl.mean, mdl.std), pure=True, traverse=False)
    X = store.counts_array(st, chunk_cells=chunk_cells)
    logn = normalize.log_normalize_columns(align.align(X, al), mdl.hvg_index, target_sum=mdl.target_sum)
    return project.project_counts(logn, terms_d, model_d, n_pcs=mdl.n_pcs)


def _materialised(emb: da.Array) -> da.Array:
    """``emb`` with each chunk one task (its read, alignment, normalisation and projection
    fused), so that several consumers share the chunk's small embedding, not its counts."""
    blocks = emb.to_delayed().ravel()
    return da.concatenate([da.from_delayed(b, shape=(size, emb.shape[1]), dtype=emb.dtype, meta=emb._meta)
                           for b, size in zip(blocks, emb.chunks[0])], axis=0)


def reference_pcs(record: dict, *, n_pcs: int = 2, client=None) -> np.ndarray:
    """The first ``n_pcs`` reference PCs of each cell of a finished run (float32, matrix order),
    recomputed from its zarr store and reference with :func:`embedding` (what the run used)."""
    from .errors import InputNotFoundError

    store_path = (record.get("input") or {}).get("store")
    if not store_path or not Path(store_path).exists():
        raise InputNotFoundError(f"{store_path}: the run's zarr store is gone; run annotate again to rebuild it")
    st = store.open_store(store_path)
    mdl = load_reference(record["reference"]["path"])
    al = align_to_model(st, mdl, source=str(store_path))
    chunk = int((record.get("parameters") or {}).get("chunk_cells") or 10_000)
    emb = embedding(st, mdl, al, chunk_cells=chunk)[:, :n_pcs]
    (out,) = dask.compute(emb, scheduler=client if client is not None else "threads")
    return np.asarray(out, dtype=np.float32)


def align_to_model(st: store.StoreInfo, model, *, source: str | None = None) -> align.Alignment:
    """The query's genes onto a kNN model's gene universe; the overlap check is about its PCA genes."""
    return align.align_genes(query_ids=st.feature_ids, query_names=st.feature_names, ref_ids=model.universe_ids,
                             ref_names=model.universe_names, source=source or st.source.get("path", st.path),
                             reference=f"model '{model.name}'", required=model.hvg_index)


def choose_model(spec: str, st: store.StoreInfo) -> tuple[Model, align.Alignment, dict]:
    """The model named by ``spec``; ``auto`` takes the built-in kNN model sharing most genes."""
    if spec != "auto":
        model = resolve_model(spec)
        return model, align_to_model(st, model), {"requested": spec}
    tried = {}
    best = None
    for name, path in builtin_models().items():
        if model_kind(path) != "knn":
            continue
        model = load_model(path)
        try:
            al = align_to_model(st, model, source="query")
        except GeneOverlapError:
            tried[name] = 0.0
            continue
        tried[name] = al.required_fraction
        if best is None or al.required_fraction > best[1].required_fraction:
            best = (model, al)
    if best is None:
        raise GeneOverlapError(
            f"{st.source.get('path', st.path)}: no built-in model shares enough genes with the matrix "
            f"(shared fractions: {', '.join(f'{k} {v:.0%}' for k, v in tried.items())}); "
            "build a reference for this species with `dask-annot build-reference`"
        )
    return best[0], best[1], {"requested": "auto", "gene_overlap_by_model": {k: round(v, 4) for k, v in tried.items()}}


def prepare_store(matrix: str | Path, work_dir: Path, settings: Settings, timer: Timer, log) -> tuple[store.StoreInfo, dict]:
    """Open or convert the input; check the cell count and that the run directory
    is free for this input (before anything is written). Returns the store and the
    input's fingerprint."""
    matrix = Path(matrix)
    root = work_dir.parent
    if store.is_store(matrix):
        st = store.open_store(matrix)
        fp = {"path": st.source.get("path"), "sha256": st.source.get("sha256"), "size": st.source.get("size"), "store": str(matrix)}
        _check_cells(st.n_cells, str(matrix), settings, log)
        outputs.check_output_dir(root, input_sha256=fp["sha256"])
        return st, fp
    info = h5.open_matrix(matrix)
    _check_cells(info.n_cells, str(matrix), settings, log)
    with timer.stage("fingerprint"):
        fp = store.file_fingerprint(matrix)
    outputs.check_output_dir(root, input_sha256=fp["sha256"])
    target = work_dir / "matrix.zarr"
    with timer.stage("convert"):
        reused = target.exists()
        st = store.convert(matrix, target, fingerprint=fp)
    log(f"{'reused' if reused else 'converted to'} {target} ({st.n_cells} cells, {st.n_features} genes)")
    return st, {"path": str(matrix.resolve()), **fp, "layout": st.source.get("layout"), "store": str(target), "store_reused": reused}


def _check_cells(n: int, path: str, settings: Settings, log) -> None:
    if n < settings.min_cells:
        msg = (f"{path}: {n} cells, fewer than the supported minimum of {settings.min_cells}; "
               "annotation of so few cells is unreliable, pass --force to run anyway")
        if not settings.force:
            raise TooFewCellsError(msg)
        log(f"warning: {msg.split(';')[0]} (running because of --force)")
    if n > settings.max_cells:
        log(f"warning: {path}: {n} cells, more than the {settings.max_cells} 10x supports; running anyway")


def annotate(run_id: str, matrix: str | Path, *, model: str = "auto", output_dir: str | Path = ".",
             settings: Settings, log=print, progress: bool = False, client=None, allow_bins: bool = False,
             cell_geometry: str | Path | None = None) -> RunResult:
    """Annotate one matrix with one model and write the outputs; returns where they are.

    ``client``: an existing ``distributed.Client`` to run on (used as is, not closed).
    """
    return run(run_id, matrix, models=[model], output_dir=output_dir, settings=settings, log=log,
               progress=progress, client=client, allow_bins=allow_bins, cell_geometry=cell_geometry)[0]


def run(run_id: str, matrix: str | Path, *, models: Sequence[str] | None = None, output_dir: str | Path = ".",
        settings: Settings, log=print, progress: bool = False, client=None, allow_bins: bool = False,
        cell_geometry: str | Path | None = None) -> list[RunResult]:
    """Annotate one matrix with each of ``models`` (default: :func:`default_models`), each
    model's outputs in its own folder under ``cell_types/``; returns them in order.

    The matrix is converted once; the query's own neighbour graph, when a model needs
    it, is built once and shared; one Dask client serves every model.

    ``matrix`` may be a Space Ranger ``outs/`` (Visium HD): see :mod:`dask_annot.visium`;
    binned matrices are refused unless ``allow_bins``; ``cell_geometry`` overrides the
    ``cell_segmentations.geojson`` found beside the matrix.
    """
    try:
        return _run(run_id, matrix, specs=models, output_dir=output_dir, settings=settings, log=log,
                    progress=progress, client=client, allow_bins=allow_bins, cell_geometry=cell_geometry)
    except OSError as exc:
        if isinstance(exc, DaskAnnotError) or exc.errno not in _WRITE_ERRNOS:
            raise
        where = exc.filename or Path(output_dir) / run_id
        what = "free disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check permissions"
        raise OutputError(f"{where}: {exc.strerror or exc}; {what} or choose another --output-dir") from exc


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}


PAN_MODELS = {"human": "pan_human_v1", "mouse": "pan_mouse_v1"}


def default_models(st: store.StoreInfo) -> list[str]:
    """What runs when no model is named, as Space Ranger runs Azimuth and the 10x cloud model:
    the ``auto`` kNN model (see :func:`choose_model`) and the built-in marker model of the
    matrix's species (guessed from its genes; left out when the species is not known)."""
    from .build import guess_species

    pan = PAN_MODELS.get(guess_species(np.asarray(st.feature_ids), np.asarray(st.feature_names)))
    return ["auto", pan] if pan and pan in builtin_models() else ["auto"]


def parse_model_specs(value: str | Sequence[str] | None) -> list[str] | None:
    """``--cell-annotation-model`` as a list: a comma-separated text, a sequence, or None (defaults)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    specs = [x.strip() for x in items if x and x.strip()]
    if not specs:
        raise ConfigError("--cell-annotation-model is empty; name a model (see `dask-annot models`), or leave it out for the defaults")
    return specs


@dataclass
class KnnPlan:
    """How one kNN model annotates this matrix (decided before anything runs)."""

    model: Model
    alignment: align.Alignment
    choice: dict
    k_used: int
    k_rule: str
    balanced: bool
    spread: bool
    method: str

    kind = "knn"

    @property
    def name(self) -> str:
        return self.model.name


def _default_plan(spec: str, st: store.StoreInfo, settings: Settings, log):
    """A default (not named) marker model: left out, with a warning, when the matrix has too few
    of its marker genes to judge any cell type; the kNN default still runs."""
    try:
        return plan_model(spec, st, settings)
    except GeneOverlapError as exc:
        log(f"warning: default model {spec} left out: {exc}")
        return None


@dataclass
class MarkerPlan:
    """How one marker model annotates this matrix: its genes found in the query."""

    model: markers.MarkerModel
    genes: markers.GenePlan
    choice: dict

    kind = "markers"
    method = "markers"

    @property
    def name(self) -> str:
        return self.model.name


def plan_model(spec: str, st: store.StoreInfo, settings: Settings) -> KnnPlan | MarkerPlan:
    """Load the model ``spec`` names and decide how it runs on ``st``."""
    if spec != "auto":
        mdl = resolve_model(spec)
        if mdl.kind == "markers":
            genes = markers.align_markers(mdl, st.feature_names, source=str(st.source.get("path", st.path)), organs=settings.organs)
            return MarkerPlan(model=mdl, genes=genes, choice={"requested": spec})
        mdl, al, choice = mdl, align_to_model(st, mdl), {"requested": spec}
    else:
        mdl, al, choice = choose_model(spec, st)
    k_used, k_rule = knn.neighbourhood(settings.k, mdl.n_cells)
    balanced = vote.small_reference(mdl.n_cells)  # keyed on the reference, not on --k (issue 13.3)
    if settings.knn_method == "ivf" and not mdl.has_ivf:
        raise ConfigError(f"--knn-method ivf: the reference '{mdl.name}' has no inverted lists; rebuild it with "
                          "`dask-annot build-reference ... --knn-method ivf`, or use --knn-method exact or ann")
    spread = settings.consensus == "spread" or (settings.consensus == "auto" and balanced)
    return KnnPlan(model=mdl, alignment=al, choice=choice, k_used=k_used, k_rule=k_rule, balanced=balanced,
                   spread=spread, method=knn.choose_method(mdl.n_cells, settings.knn_method, has_ivf=mdl.has_ivf))


class _QueryGraph:
    """The query's own kNN graph, built at most once per run (checkpointed under work/)."""

    def __init__(self, st: store.StoreInfo, work: Path, fp: dict):
        self.st, self.value = st, None
        key = json.dumps({"input": fp.get("sha256"), "params": consensus.parameters(), "code": code_fingerprint()}, sort_keys=True)
        self.path = work / f"query_graph-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"

    def task(self):
        """The graph as a Delayed (to compute with other work), or its value once known."""
        if self.value is not None:
            return self.value
        if self.path.is_file():
            return dask.delayed(_load_graph, pure=True)(str(self.path))
        return dask.delayed(_save_graph, pure=True)(consensus.query_graph(self.st), str(self.path))


def _compute_beside_graph(parts: list, graph_task, fstats):
    """``dask.compute(parts, graph_task, fstats)``, with the query graph (a Delayed) submitted
    on its own beside the rest. In one submission dask ordered the graph's chain (the query's
    own PCA, its lists) after the whole search (dask timeline of a 200k-cell run): on the
    critical path, partly on one thread. Aside, it runs while the search does."""
    if not isinstance(graph_task, Delayed):
        parts, fstats = dask.compute(parts, fstats)
        return parts, graph_task, fstats
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="dask-annot-graph") as ex:
        pending = ex.submit(dask.compute, graph_task)
        parts, fstats = dask.compute(parts, fstats)
        (graph_value,) = pending.result()
    return parts, graph_value, fstats


def _save_graph(graph: dict, path: str) -> dict:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    nbr = graph["nbr"] if graph["nbr"] is not None else np.empty((0, 0), np.int64)
    with open(tmp, "wb") as fh:
        np.savez(fh, nbr=nbr, has=np.array(graph["nbr"] is not None), how=np.array(graph["how"]), pcs=np.array(graph["pcs"]))
    os.replace(tmp, p)
    return graph


def _load_graph(path: str) -> dict:
    with np.load(path) as z:
        return {"nbr": z["nbr"] if bool(z["has"]) else None, "how": str(z["how"]), "pcs": int(z["pcs"])}


def _run(run_id: str, matrix: str | Path, *, specs: Sequence[str] | None, output_dir: str | Path,
         settings: Settings, log, progress: bool, client, allow_bins: bool = False,
         cell_geometry: str | Path | None = None) -> list[RunResult]:
    timer = Timer()
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise ConfigError(f"--id '{run_id}' must be a plain name (letters, digits, - and _)")
    root = Path(output_dir) / run_id
    vis = visium.resolve(matrix, allow_bins=allow_bins, cell_geometry=cell_geometry)
    if not store.is_store(vis.matrix):
        visium.check_barcodes(vis, h5.open_matrix(vis.matrix).barcodes, allow_bins=allow_bins)
    for w in vis.warnings:
        log(f"warning: {w}")
    st, fp = prepare_store(vis.matrix, root / "work", settings, timer, log)
    with timer.stage("geometry"):
        positions = visium.positions(vis, st.barcodes, cache_dir=root / "work")
    if vis.matrix != vis.given or positions is not None or vis.bin_size_um:
        fp["visium"] = {**vis.record(), **(positions.record if positions is not None else {})}
    named = parse_model_specs(specs)
    specs = named or default_models(st)
    with timer.stage("load_model"):
        plans = [p for p in (_default_plan(spec, st, settings, log) if named is None and spec in PAN_MODELS.values()
                             else plan_model(spec, st, settings) for spec in specs) if p is not None]
    names = [p.name for p in plans]
    if len(set(names)) < len(names):
        raise ConfigError(f"--cell-annotation-model names the model '{max(set(names), key=names.count)}' twice; name each model once")
    for plan in plans:
        if plan.kind == "markers":
            log(f"model {plan.name} v{plan.model.version}: marker model, {len(plan.model.labels)} cell types; "
                f"{plan.genes.query_cols.size}/{plan.genes.n_model_genes} marker genes in the matrix")
            continue
        al, mdl = plan.alignment, plan.model
        log(f"model {mdl.name} v{mdl.version}: {al.n_required_shared}/{al.n_required} model genes shared "
            f"({al.n_shared}/{al.n_reference_genes} of its gene universe, by {al.matched_by}); "
            f"k={plan.k_used} ({plan.k_rule}); {plan.method} search" + ("; label spreading over the query's own neighbours" if plan.spread else ""))
    settings = _resolve_scheduler(settings, [p.method for p in plans], log, n_cells=st.n_cells)
    for plan in (p for p in plans if p.kind == "knn"):
        check_memory(settings, n_cells=st.n_cells, n_genes=plan.alignment.n_reference_genes, k=plan.k_used,
                      n_ref=plan.model.n_cells, method=plan.method)
    shared = dict(timer.stages)
    results = []
    with _client(settings, log, shared_paths=[st.path, *(p.model.path for p in plans)], client=client) as active:
        graph = _QueryGraph(st, root / "work", fp)
        for plan in plans:
            run_one = _run_markers if plan.kind == "markers" else _run_knn
            results.append(run_one(plan, st, fp, root=root, run_id=run_id, output_dir=output_dir, settings=settings,
                                   log=log, progress=progress, active=active, client=client, graph=graph, shared_timings=shared,
                                   run_warnings=vis.warnings, positions=positions))
    return results


def _run_knn(plan: KnnPlan, st: store.StoreInfo, fp: dict, *, root: Path, run_id: str, output_dir, settings: Settings,
             log, progress: bool, active, client, graph: _QueryGraph, shared_timings: dict,
             run_warnings: Sequence[str] = (), positions: Any = None) -> RunResult:
    timer = Timer()
    mdl, al = plan.model, plan.alignment
    mdir = outputs.model_dir(output_dir, run_id, mdl.name)
    umi_all = st.umi_count
    model_d = dask.delayed(mdl, pure=True, traverse=False)
    emb = _materialised(embedding(st, mdl, al, chunk_cells=settings.chunk_cells, model_d=model_d))
    placement = None
    if mdl.shards and plan.method in ("exact", "ivf"):  # searched shard by shard, merged exactly
        placement = knn.shard_placement(_worker_addresses(active), len(mdl.shards))
        nbrs = knn.sharded_neighbors(emb, mdl.shards, k=plan.k_used, method=plan.method, probes=knn.probes_of(mdl.meta),
                                     placement=placement)
    else:
        nbrs = knn.neighbors(emb, model_d, k=plan.k_used, method=plan.method, epsilon=settings.ann_epsilon)
    bounds = np.cumsum((0,) + nbrs.chunks[0])
    emb2 = emb[:, :2].rechunk({0: nbrs.chunks[0], 1: -1})
    conf = confidence.Confidence.from_model(mdl, al.query_index)
    use_conf = conf is not None and settings.reject != "none"
    scores = plan.spread or use_conf
    fstats = confidence.foreign_stats(st, conf, al.query_index, chunk_cells=settings.chunk_cells) if use_conf else None
    ckpt = _checkpoint_dir(root / "work", fp, plan, settings, bounds, scores=scores)
    done = _finished_chunks(ckpt, bounds)
    parts = []
    # not optimised again: the search and the 2-D plot share each chunk's embedding task (optimised
    # separately, each re-read and re-projected the chunk), and pinned shard searches keep their pinning
    for i, (blk, e2) in enumerate(zip(nbrs.to_delayed(optimize_graph=False).ravel(), emb2.to_delayed(optimize_graph=False).ravel())):
        path = str(ckpt / f"chunk_{bounds[i]:012d}_{bounds[i + 1]:012d}.npz")
        if i in done:
            parts.append(dask.delayed(_load_chunk, pure=True)(path))
        else:
            barcodes = dask.delayed(store.read_barcodes, pure=True)(st.path, int(bounds[i]), int(bounds[i + 1]))
            parts.append(dask.delayed(_finish_chunk, pure=True)(blk, e2, model_d, plan.balanced, barcodes, path, scores))
    if done:
        log(f"resuming: {len(done)} of {len(parts)} chunks already annotated in {ckpt}")
    graph_task = graph.task() if scores and parts else None
    graph_bytes = {"annotate": refcache.graph_bytes(parts, graph_task, fstats)}
    with timer.stage("annotate"), _progress(progress, active):
        parts, graph_value, fstats = _compute_beside_graph(parts, graph_task, fstats)
    votes_np = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, dtype=vote.VOTE_DTYPE)
    member_paths = [p[1] for p in parts]  # the chunks' evidence stays on disk until it is written
    embedding2d = np.concatenate([p[2] for p in parts]).astype(np.float32) if parts else np.empty((0, 2), np.float32)
    consensus_rec = {"applied": False, "reason": f"--consensus {settings.consensus}" + (" (reference large enough for the 10x vote)" if settings.consensus == "auto" else "")}
    if graph_value is not None:
        graph.value = graph_value
    rejected = shares = conf_info = None
    if use_conf:  # cells unlike the reference, tested on the vote's label (see dask_annot.confidence)
        rejected, conf_info = confidence.novel(conf, fstats, votes_np["fine"], graph_value["nbr"] if graph_value else None)
        shares = np.concatenate([p[4] for p in parts]) if parts else np.zeros((0, len(mdl.labels)))
    if plan.spread and graph_value is not None:
        counts = np.concatenate([p[3] for p in parts])
        p0 = np.concatenate([p[4] for p in parts])
        with timer.stage("consensus"):
            votes_np, consensus_rec, shares = consensus.apply_with_scores(votes_np, counts, p0, graph_value, log=log,
                                                                          keep=None if rejected is None else ~rejected)
        del counts, p0
    if use_conf:
        depth, prob = confidence.calibrated(conf, shares, votes_np["fine"])
        depth[rejected] = outputs.DEPTH_NONE
        calls = outputs.calls_from(votes_np["fine"], prob=prob, count=votes_np["count"], depth=depth)
        log(f"{mdl.name}: {int(rejected.sum())} of {len(rejected)} cells unlike the reference (Unassigned)")
        if len(rejected) and rejected.mean() > 0.5:  # said, not decided: the rule stays the rule
            run_warnings = [*run_warnings, (
                f"{mdl.name}: {rejected.mean():.0%} of the cells are Unassigned (unlike the reference). Either the sample "
                "holds cell types this reference lacks (another tissue), or it was made with another technology than the "
                "reference in a way that also looks like foreign programs; in the second case rerun with --reject none and read "
                "final_level_softmax_prob (see docs/confidence.md)")]
            log("warning: " + run_warnings[-1])
    else:
        calls = outputs.calls_from(votes_np["fine"], prob=votes_np["prob"], count=votes_np["count"])
    conf_rec = confidence.record(conf, reject=settings.reject, rejected=rejected, fine=votes_np["fine"], labels=mdl.labels,
                                 depth=calls["depth"] if use_conf else None, info=conf_info)
    record = {
        "reference": {"name": mdl.name, "kind": mdl.kind, "version": mdl.version, "species": mdl.species, "path": mdl.path,
                      "cells": mdl.n_cells, "genes": int(mdl.gene_ids.size), "pcs": mdl.n_pcs,
                      "reference_json_sha256": store.file_fingerprint(Path(mdl.path) / "reference.json")["sha256"], **plan.choice},
        "gene_overlap": al.record(),
        "graph_bytes": graph_bytes,
        "parameters": {
            "k_requested": settings.k, "k_used": plan.k_used, "k_rule": plan.k_rule,
            "vote": "class-balanced plurality (small reference)" if plan.balanced else "plurality (10x)",
            "consensus": consensus_rec, "reject": settings.reject,
            "distance": "cosine (euclidean on unit-length PCA coordinates)",
            "missing_genes": "unmeasured: least-squares projection on measured genes" if al.n_required_shared < al.n_required else "none missing",
            "knn_method": plan.method, "ann_epsilon": settings.ann_epsilon if plan.method == "ann" else None,
            "shards": len(mdl.shards) or 1, "shard_placement": list(placement) if placement else None, "ivf_probes": knn.probes_of(mdl.meta) if plan.method == "ivf" else None,
            "chunk_cells": settings.chunk_cells, "de_chunk_cells": DE_CHUNK_CELLS, "layout": settings.layout,
            "scheduler": f"client {client.scheduler.address}" if client is not None else settings.scheduler,
            "n_workers": settings.n_workers, "low_umi_threshold": outputs.LOW_UMI_THRESHOLD,
        },
        "confidence": conf_rec,
    }
    if run_warnings:
        record["warnings"] = list(run_warnings)
    return _write_model(mdl, calls, st, fp, mdir=mdir, run_id=run_id, settings=settings, timer=timer, log=log,
                        progress=progress, active=active, record=record, shared_timings=shared_timings,
                        files={"cell_annotation_results.json.gz": outputs.json_results_parts(map(_chunk_member, member_paths))}, embedding2d=embedding2d,
                        positions=positions)


def _run_markers(plan: MarkerPlan, st: store.StoreInfo, fp: dict, *, root: Path, run_id: str, output_dir, settings: Settings,
                 log, progress: bool, active, client, graph: _QueryGraph, shared_timings: dict,
                 run_warnings=(), positions: Any = None) -> RunResult:
    """One marker model: per-cell type scores, pooled over the query graph, the hierarchy walk
    (:mod:`dask_annot.markers`); always the hierarchical layout; no JSON evidence file."""
    import dataclasses

    timer = Timer()
    mdl = plan.model
    settings = dataclasses.replace(settings, layout="hierarchical")
    mdir = outputs.model_dir(output_dir, run_id, mdl.name)
    scores, _ = markers.lazy_scores(st, mdl, plan.genes, chunk_cells=settings.chunk_cells)
    with timer.stage("annotate"), _progress(progress, active):
        raw, graph_value = dask.compute(scores, graph.task())
    graph.value = graph_value
    with timer.stage("consensus"):
        calls, scoring = markers.annotate_scores(raw, graph_value, mdl, plan.genes)
    del raw
    with timer.stage("marker_stats"):
        (stats,) = dask.compute(markers.lazy_marker_stats(st, mdl, plan.genes, calls))
    record = {
        "reference": {"name": mdl.name, "kind": mdl.kind, "version": mdl.version, "species": mdl.species, "path": mdl.path,
                      "cells": 0, "cell_types": len(mdl.labels), "genes": int(mdl.genes.size), "organs": mdl.organs,
                      "reference_json_sha256": store.file_fingerprint(Path(mdl.path) / "reference.json")["sha256"], **plan.choice},
        "gene_overlap": plan.genes.record(),
        "parameters": {
            "scoring": scoring, "chunk_cells": settings.chunk_cells, "de_chunk_cells": DE_CHUNK_CELLS, "layout": settings.layout,
            "scheduler": f"client {client.scheduler.address}" if client is not None else settings.scheduler,
            "n_workers": settings.n_workers, "low_umi_threshold": outputs.LOW_UMI_THRESHOLD,
        },
        "marker_expression": markers.dot_plot_table(mdl, plan.genes, calls, stats),
    }
    if run_warnings:
        record["warnings"] = list(run_warnings)
    return _write_model(mdl, calls, st, fp, mdir=mdir, run_id=run_id, settings=settings, timer=timer, log=log,
                        progress=progress, active=active, record=record, shared_timings=shared_timings, files={}, embedding2d=None,
                        positions=positions)


def _write_model(mdl, calls: np.ndarray, st: store.StoreInfo, fp: dict, *, mdir: Path, run_id: str, settings: Settings,
                 timer: Timer, log, progress: bool, active, record: dict, shared_timings: dict, files: dict,
                 embedding2d: np.ndarray | None, positions: Any = None) -> RunResult:
    """DE between the final coarse types, then every output of one model (run.json last)."""
    umi_all = st.umi_count
    labels = outputs.cell_labels(calls, umi_all, mdl, layout=settings.layout)
    coarse = labels["coarse_cell_type"]
    groups = sorted(set(coarse.tolist()))
    de_df = None
    if len(groups) >= 2:
        code_of = {g: i for i, g in enumerate(groups)}
        codes = np.array([code_of[c] for c in coarse], dtype=np.int32)
        Xde = store.counts_array(st, chunk_cells=DE_CHUNK_CELLS)
        codes_d = da.from_array(codes, chunks=(Xde.chunks[0],))
        graph = de.build_de(Xde, codes_d, group_names=groups, feature_ids=np.asarray(st.feature_ids, dtype=object),
                            feature_names=np.asarray(st.feature_names, dtype=object))
        record.setdefault("graph_bytes", {})["de"] = refcache.graph_bytes(graph)
        with timer.stage("de"), _progress(progress, active):
            (de_df,) = dask.compute(graph)
    with timer.stage("write"):
        mdir.mkdir(parents=True, exist_ok=True)
        stale = mdir / "run.json"
        if stale.exists():
            stale.unlink()  # the directory is not a finished run until the new record lands
        outputs.atomic_write(mdir / "cell_types.csv", outputs.cell_types_csv(st.barcodes, calls, umi_all, mdl, layout=settings.layout))
        for name, payload in files.items():
            outputs.atomic_write(mdir / name, payload)
        de_path = mdir / "cell_annotation_differential_expression.csv"
        if de_df is not None:
            outputs.atomic_write(de_path, de.format_de_csv(de_df))
        elif de_path.exists():
            de_path.unlink()
    low = int(np.count_nonzero(umi_all < outputs.LOW_UMI_THRESHOLD))
    composition = {g: int(c) for g, c in zip(*np.unique(coarse.astype(str), return_counts=True))}
    record = {
        "complete": True,
        "run_id": run_id,
        "command": "annotate",
        "input": fp,
        "cells": st.n_cells,
        "genes": st.n_features,
        "low_umi_barcodes": low,
        **record,
        "differential_expression": (
            {"written": True, "groups": groups} if de_df is not None
            else {"written": False, "reason": f"fewer than 2 coarse cell types ({len(groups)})"}
        ),
        "composition_coarse": composition,
        "outputs": sorted({p.name for p in mdir.iterdir() if not p.name.startswith(".") and p.name != "run.json"} | {"web_summary.html"}),
        "versions": _versions(),
    }
    timings = lambda: {**shared_timings, **timer.stages, "total": round(sum(shared_timings.values()) + timer.total, 3)}  # noqa: E731
    with timer.stage("summary"):
        record["timings_s"] = timings()
        summary.write_web_summary(mdir / "web_summary.html", record=record, cell_types=summary.read_cell_types(mdir / "cell_types.csv"),
                                  embedding2d=embedding2d, de=de_df,
                                  spatial=positions.summary_spatial() if positions is not None else None)
    record["timings_s"] = timings()
    outputs.write_run_record(mdir / "run.json", record)
    log(f"{mdl.name} timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items()))
    return RunResult(model_dir=mdir, record=record, embedding2d=embedding2d, positions=positions, calls=calls)


def chunk_memory_bytes(chunk_cells: int, *, n_genes: int, k: int, n_ref: int, method: str) -> int:
    """A generous estimate of one annotation task's peak memory.

    Dense z-scores (float64 and the float32 copy), the neighbour records, and for
    exact search one block of distances to every reference cell, and the JSON evidence kernel.
    """
    per_cell = n_genes * (8 + 8 + 4) + k * (8 + 8 + 16)
    exact = 256 * n_ref * 8 * 3 if method == "exact" else 0
    return int(chunk_cells * per_cell + exact + outputs.evidence_memory_bytes(chunk_cells, k=k) + 64 * 2**20)


def check_memory(settings: Settings, *, n_cells: int, n_genes: int, k: int, n_ref: int, method: str,
                 available: int | None = None) -> None:
    """Refuse a chunk size whose tasks cannot fit in memory (``available`` bytes; default: what
    the machine has free now), before the machine starts swapping."""
    import psutil

    workers = settings.n_workers or (os.cpu_count() or 1)
    chunk = min(settings.chunk_cells, n_cells)
    need = chunk_memory_bytes(chunk, n_genes=n_genes, k=k, n_ref=n_ref, method=method)
    have = psutil.virtual_memory().available if available is None else int(available)
    if settings.scheduler in ("auto", "threads", "processes", "local") and need * workers > 0.8 * have:
        per_cell = max(1, (need - 64 * 2**20) // max(1, chunk))
        fit = max(100, int(0.8 * have / workers - 64 * 2**20) // per_cell)
        raise ConfigError(
            f"--chunk-cells {settings.chunk_cells} needs about {need / 2**30:.1f} GiB per task x {workers} workers, "
            f"but {have / 2**30:.1f} GiB is available; use --chunk-cells {fit} or fewer, or fewer --n-workers"
        )


AUTO_PROCESSES_MIN_CELLS = 20_000


def _resolve_scheduler(settings: Settings, methods: Sequence[str], log, *, n_cells: int = 0) -> Settings:
    """``auto``: threads, except for pynndescent searches of at least
    :data:`AUTO_PROCESSES_MIN_CELLS` cells, which run in single-threaded worker
    processes (the search holds the GIL; below that size starting the workers
    costs more than it saves: 31 s against 12 s for 800 cells, measured)."""
    import dataclasses

    if settings.scheduler != "auto":
        return settings
    if "ann" in methods and n_cells >= AUTO_PROCESSES_MIN_CELLS and (settings.n_workers or os.cpu_count() or 1) > 1:
        log("scheduler: a LocalCluster of single-threaded processes (pynndescent's search holds the GIL)")
        return dataclasses.replace(settings, scheduler="local", threads_per_worker=1)
    return dataclasses.replace(settings, scheduler="threads")


def _worker_addresses(active) -> list[str]:
    """The workers of a distributed client (none for the threaded or sync scheduler)."""
    if active is None or not hasattr(active, "scheduler_info"):
        return []
    return sorted(active.scheduler_info(n_workers=-1)["workers"])


def _client(settings: Settings, log, *, shared_paths=(), client=None):
    """The Dask client for a run (see :func:`dask_annot.cluster.make_client`)."""
    from .cluster import make_client

    return make_client(settings.scheduler, n_workers=settings.n_workers, threads_per_worker=settings.threads_per_worker,
                       memory_limit=settings.memory_limit, log=log, client=client, cluster_config=settings.cluster_config,
                       shared_paths=shared_paths, worker_timeout=settings.worker_timeout, **settings.job_options)


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A digest of the package's source: checkpoints made by other code are never reused."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _checkpoint_dir(work: Path, fp: dict, plan: KnnPlan, settings: Settings, bounds, *, scores: bool = False) -> Path:
    """Per-chunk results live under a key of everything that determines them, the code included."""
    mdl = plan.model
    key = json.dumps({
        "input": fp.get("sha256"), "reference": mdl.meta.get("checksums"), "model": mdl.name, "k": plan.k_used,
        "method": plan.method, "epsilon": settings.ann_epsilon if plan.method == "ann" else None, "balanced": plan.balanced,
        "bounds": [int(b) for b in bounds], "code": code_fingerprint(), "scores": scores,
    }, sort_keys=True)
    return work / "chunks" / f"{mdl.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _finished_chunks(ckpt: Path, bounds) -> set[int]:
    done = set()
    for i in range(len(bounds) - 1):
        if (ckpt / f"chunk_{bounds[i]:012d}_{bounds[i + 1]:012d}.npz").is_file():
            done.add(i)
    return done


def _finish_chunk(nbrs: np.ndarray, emb2: np.ndarray, model: Model, balanced: bool, barcodes: np.ndarray,
                  path: str, scores: bool = False) -> tuple:
    """Vote, JSON and first two PCs of one chunk (with ``scores``, also the per-label counts and
    vote shares the consensus needs), saved under ``path`` (atomically) so a rerun can reuse them.
    The JSON is returned as ``path``: the driver reads it back only to write the evidence file."""
    votes, counts, p0 = vote.vote_with_scores(nbrs, model, balanced)
    extra = {"counts": counts, "p0": p0} if scores else {}
    member = outputs.json_block(nbrs, model, barcodes)
    emb2 = np.asarray(emb2, dtype=np.float32)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, votes=votes, member=np.frombuffer(member, dtype=np.uint8), emb2=emb2, **extra)
    os.replace(tmp, p)
    return (votes, path, emb2, counts, p0) if scores else (votes, path, emb2)


def _load_chunk(path: str) -> tuple:
    with np.load(path) as z:
        if "counts" in z.files:
            return z["votes"], path, z["emb2"], z["counts"], z["p0"]
        return z["votes"], path, z["emb2"]


def _chunk_member(path: str) -> bytes:
    """A saved chunk's JSON evidence (its gzip member), read when the file is written."""
    from .errors import StoreError

    try:
        with np.load(path) as z:
            return z["member"].tobytes()
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"{path}: this chunk's saved annotation is missing or damaged ({exc}); remove it and run "
                         "again (the chunk is annotated anew)") from exc


class _progress:
    """A terminal progress bar for the threaded scheduler; Dask's own for a cluster."""

    def __init__(self, enabled: bool, client):
        self.enabled, self.client, self.bar = enabled, client, None

    def __enter__(self):
        if self.enabled and self.client is None:
            from dask.diagnostics import ProgressBar

            self.bar = ProgressBar(minimum=2, out=sys.stderr)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.bar.__exit__(*exc)


def run_de(matrix: str | Path, groups_csv: str | Path, output: str | Path, *, settings: Settings, log=print) -> Path:
    """``dask-annot de``: sSeq DE between the user's own groups (CSV ``barcode,group``)."""
    import pandas as pd

    from .errors import InputFormatError, InputNotFoundError

    timer = Timer()
    output = Path(output)
    groups_csv = Path(groups_csv)
    if not groups_csv.exists():
        raise InputNotFoundError(f"{groups_csv}: no such file; pass a CSV with columns barcode,group")
    table = pd.read_csv(groups_csv, dtype=str, keep_default_na=False)
    if list(table.columns[:2]) != ["barcode", "group"] and not {"barcode", "group"} <= set(table.columns):
        raise InputFormatError(f"{groups_csv}: needs a header with columns barcode,group; found {', '.join(table.columns)}")
    matrix = Path(matrix)
    if store.is_store(matrix):
        st = store.open_store(matrix)
    else:
        info = h5.open_matrix(matrix)
        with timer.stage("convert"):
            st = store.convert(matrix, output.with_name(f".{output.name}.work") / "matrix.zarr")
        del info
    lookup = dict(zip(table["barcode"], table["group"]))
    missing = [b for b in st.barcodes if b not in lookup]
    if missing:
        raise InputFormatError(f"{groups_csv}: {len(missing)} barcodes of the matrix have no group (e.g. {missing[0]}); give every barcode a group")
    labels = np.array([lookup[b] for b in st.barcodes], dtype=object)
    groups = sorted(set(labels.tolist()))
    if len(groups) < 2:
        raise InputFormatError(f"{groups_csv}: only one group ({groups[0]}); differential expression needs at least two")
    code_of = {g: i for i, g in enumerate(groups)}
    codes = np.array([code_of[g] for g in labels], dtype=np.int32)
    settings = _resolve_scheduler(settings, ["exact"], log)
    with _client(settings, log, shared_paths=[st.path]):
        X = store.counts_array(st, chunk_cells=DE_CHUNK_CELLS)
        graph = de.build_de(X, da.from_array(codes, chunks=(X.chunks[0],)), group_names=groups,
                            feature_ids=np.asarray(st.feature_ids, dtype=object), feature_names=np.asarray(st.feature_names, dtype=object))
        with timer.stage("de"):
            (df,) = dask.compute(graph)
    output.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write(output, de.format_de_csv(df))
    log(f"wrote {output} ({len(groups)} groups, {st.n_features} genes); timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timer.stages.items()))
    return output


def rebuild_summary(model_dir: str | Path, *, embedding2d: np.ndarray | None = None) -> Path:
    """Write ``web_summary.html`` again from a finished run's files; returns its path.

    Without ``embedding2d``, the query cells are projected onto the reference again
    from the run's zarr store (the same stages as the run, so the same coordinates).
    """
    import pandas as pd

    from .errors import InputNotFoundError

    mdir = Path(model_dir)
    run_json, csv_path = mdir / "run.json", mdir / "cell_types.csv"
    for p in (run_json, csv_path):
        if not p.is_file():
            raise InputNotFoundError(f"{p}: missing; pass the model directory of a finished run "
                                     "(OUTPUT_DIR/ID/outs/segmented_outs/cell_types/MODEL)")
    record = json.loads(run_json.read_text())
    cell_types = summary.read_cell_types(csv_path)
    de_path = mdir / "cell_annotation_differential_expression.csv"
    de = pd.read_csv(de_path, keep_default_na=False, na_values=["NaN"]) if de_path.is_file() else None
    if embedding2d is None and (record.get("reference") or {}).get("kind", "knn") == "knn":
        embedding2d = reference_pcs(record)
    pos = visium.positions_for_record(record, cell_types["barcode"].to_numpy(), cache_dir=mdir.parents[3] / "work"
                                      if len(mdir.parents) > 3 else None)
    out = mdir / summary.FILENAME
    summary.write_web_summary(out, record=record, cell_types=cell_types, embedding2d=embedding2d, de=de,
                              spatial=pos.summary_spatial() if pos is not None else None)
    return out


def dask_parallelism() -> int:
    """How many tasks the current Dask scheduler runs at once: the threads of the default
    ``distributed`` client when there is one, else the configured ``num_workers`` (or the cores)."""
    try:
        from distributed import default_client

        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):
        return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def results_in_order(tasks, *, window: int | None = None):
    """The results of delayed ``tasks`` one by one, in the tasks' order, on the current scheduler.

    Computed ``window`` tasks at a time (default :func:`dask_parallelism`), the next window
    while the caller consumes this one, so at most two windows of results are held, and a
    caller that adds them up in this order gets the same sums whatever computed them
    (``build-reference`` reads the Census this way, see :mod:`dask_annot.sources`).
    """
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    it = iter(tasks)
    size = window or dask_parallelism()
    with ThreadPoolExecutor(1, thread_name_prefix="dask-annot-slices") as ex:
        batch = list(itertools.islice(it, size))
        pending = ex.submit(dask.compute, *batch) if batch else None
        while pending is not None:
            done = pending.result()
            batch = list(itertools.islice(it, size))
            pending = ex.submit(dask.compute, *batch) if batch else None
            yield from done
