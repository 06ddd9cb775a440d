"""Confidence: cells unlike the reference become ``Unassigned``; the probability is calibrated.

Two parts, both fitted at ``build-reference`` time and stored in ``reference.json``
under ``confidence``, so annotate needs no extra pass over the reference.

**Novelty test (foreign genes).** A type the reference lacks is defined by what it
expresses that the reference does not. *Foreign genes* are the genes of the
reference's input universe that at most :data:`FOREIGN_MAX_FRACTION` of *every* label's
reference cells express. A cell's foreign load is the UMIs it has in foreign genes it
expresses at least :data:`MIN_COUNT` times (one stray UMI is ambient RNA or a more
sensitive chemistry, not a program), divided by its depth (its UMIs over the universe's
genes the query measured): a fraction, so it does not grow with depth. A single cell's
load is noisy, so the test reads it *pooled* over the cell and its :data:`POOL_K`
nearest neighbours in the query's own neighbour graph (the one the consensus uses):
summed foreign UMIs over summed depth. The per-label threshold is the
:data:`QUANTILE` quantile of the same pooled load over that label's reference cells,
computed leave-one-out (a gene a reference cell expresses counts as foreign for it
only if it is foreign without that cell) and pooled over the reference's own
:data:`POOL_K`-NN graph. Only genes the query measured count: the thresholds are scaled
by the share of the reference's foreign load that falls in measured genes.

**Second signal (a foreign program).** The load alone cannot tell a missing type from a
technology shift, which adds a few UMIs of many foreign genes to every cell. A missing
type has a *program*: foreign genes most of its cells express. :func:`program_genes`
counts, per cell, the foreign genes more than :data:`PROGRAM_FRACTION` of the cell and
its neighbours express; the per-label threshold is the :data:`QUANTILE` quantile of the
same count over the label's reference cells (leave-one-out counts, reference graph).
Genes the query's cells of every populated nearest type express, none in most of its
cells (:func:`sample_wide`), are the sample's and do not count. A cell is rejected only when both signals fire.

**Calibration.** At build time the reference's cells are annotated in held-out folds
(by dataset when the reference has several, else :data:`N_FOLDS` stratified random
folds, seeded) with the rest, by the same kNN vote annotate uses (cosine distance,
``k`` capped by the same small-reference rule, class-balanced when capped). An
isotonic regression per level (fine, coarse) maps the raw score (the winning label's
share of the class-balanced vote; at the coarse level the share of the labels with the
same coarse type) to "was right"; its knots are stored and applied at annotate time
with linear interpolation. The reported ECE and calibration curve are cross-fitted:
each fold's cells are scored by a map fitted on the other folds.

A call is as deep as its calibrated probability allows: the fine label when its
probability is at least :data:`CONFIDENT`, else the coarse type (``Fine Not Confidently
Annotated``) when the coarse probability is, else the broad type only.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import numpy as np
import scipy.sparse as sp

from . import knn, store, vote
from .outputs import DEPTH_BROAD, DEPTH_COARSE, DEPTH_FINE, DEPTH_NONE

Reject = Literal["auto", "none"]
FOREIGN_MAX_FRACTION = 0.01
MIN_COUNT = 2
POOL_K = 15
QUANTILE = 0.99
MIN_POOLED_UMIS = 10
PROGRAM_FRACTION = 0.5  # a gene "most of" a neighbourhood expresses
MIN_GROUP_CELLS = int(round(1 / FOREIGN_MAX_FRACTION))  # cells a fraction needs to be measured at FOREIGN_MAX_FRACTION
RULE = ("rejected when both: the pooled foreign-gene load, above the query's own per-gene background, is over the label's "
        "leave-one-out reference quantile (on the genes the query measured); and the cell's neighbourhood shares a foreign "
        "program (more foreign genes expressed by most of the cell and its neighbours than the label's reference cells' quantile; "
        "genes every populated nearest type of the query expresses, none of them in most of its cells, are the sample's, "
        "not a program, and do not count)")
N_FOLDS = 5
CALIBRATION_MAX_CELLS = 20_000
SELF_GRAPH_EXACT_MAX_CELLS = 50_000
SEARCH_DENSE_MAX_CELLS = 100_000  # above: the tiled exact search (bounded memory)
CALIBRATION_K = 500  # annotate's default --k; capped by knn.neighbourhood as at annotate time
CONFIDENT = 0.5
ECE_BINS = 10
SCHEMA = 1


# ----------------------------------------------------------------------------- build time

def _label_expression(blocks: Iterable[sp.csr_matrix], label_codes: np.ndarray, n_labels: int, n_genes: int):
    """Per label and gene: reference cells expressing it (count > 0); per cell: depth."""
    nexpr = np.zeros((n_labels, n_genes), dtype=np.int64)
    depth = []
    start = 0
    for block in blocks:
        b = sp.csr_matrix(block)
        codes = label_codes[start:start + b.shape[0]]
        ind = sp.csr_matrix((np.ones(b.nnz, dtype=np.int64), b.indices, b.indptr), shape=b.shape)
        onehot = sp.csr_matrix((np.ones(b.shape[0], dtype=np.int64), (codes, np.arange(b.shape[0]))), shape=(n_labels, b.shape[0]))
        nexpr += (onehot @ ind).toarray()
        depth.append(np.asarray(b.sum(axis=1), dtype=np.float64).ravel())
        start += b.shape[0]
    return nexpr, np.concatenate(depth) if depth else np.zeros(0)


def _loo_foreign_counts(blocks: Iterable[sp.csr_matrix], label_codes: np.ndarray, nexpr: np.ndarray, class_sizes: np.ndarray,
                        foreign_or_near: np.ndarray) -> sp.csr_matrix:
    """Reference cells x candidate genes: the UMIs that count as foreign for each cell,
    leave-one-out (a gene is foreign for a cell if it is foreign once that cell is left
    out) and only where the cell has at least :data:`MIN_COUNT` of them."""
    n_labels = nexpr.shape[0]
    cand = np.flatnonzero(foreign_or_near)
    frac = nexpr[:, cand] / np.maximum(class_sizes, 1)[:, None]
    parts = []
    start = 0
    for block in blocks:
        b = sp.csr_matrix(block)[:, cand].tocsr()
        codes = label_codes[start:start + b.shape[0]]
        rows = np.repeat(np.arange(b.shape[0]), np.diff(b.indptr))
        lab = codes[rows]
        cols = b.indices
        # the cell's own label without it; every other label as is
        own = (nexpr[lab, cand[cols]] - 1) / np.maximum(class_sizes[lab] - 1, 1)
        others = frac[:, cols].copy()
        others[lab, np.arange(cols.size)] = -1.0
        foreign = (own <= FOREIGN_MAX_FRACTION) & (others.max(axis=0, initial=-1.0) <= FOREIGN_MAX_FRACTION) if n_labels else own <= FOREIGN_MAX_FRACTION
        counted = sp.csr_matrix((np.where(foreign & (b.data >= MIN_COUNT), b.data, 0).astype(np.float32), b.indices, b.indptr), shape=b.shape)
        counted.eliminate_zeros()
        parts.append(counted)
        start += b.shape[0]
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, cand.size), dtype=np.float32)


def self_graph(embedding: np.ndarray, k: int = POOL_K, *, block: int = 1024) -> np.ndarray:
    """Each reference cell's ``k`` nearest other reference cells (cosine; ties to the lower index):
    exact up to :data:`SELF_GRAPH_EXACT_MAX_CELLS` cells, through inverted lists above
    (:func:`knn.self_neighbors`: an all-pairs search is quadratic in time, and its blocks
    of block x cells float64 took 17 GB at 1M cells)."""
    if embedding.shape[0] > SELF_GRAPH_EXACT_MAX_CELLS:
        return knn.self_neighbors(embedding, k)
    u = knn.unit_rows(embedding)
    n = u.shape[0]
    k = min(k, n - 1)
    out = np.full((n, max(k, 0)), -1, dtype=np.int64)
    if k < 1:
        return out
    for s in range(0, n, block):
        e = min(s + block, n)
        d = 2.0 - 2.0 * (u[s:e] @ u.T)
        d[np.arange(e - s), np.arange(s, e)] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        dd = np.take_along_axis(d, part, axis=1)
        order = np.lexsort((part, dd), axis=1)
        out[s:e] = np.take_along_axis(part, order, axis=1)
    return out


def pooled_load(foreign: np.ndarray, depth: np.ndarray, nbr: np.ndarray | None) -> np.ndarray:
    """Foreign UMIs over depth, summed over each cell and its neighbours (``nbr``, -1 = none)."""
    f, d = pooled_sums(np.asarray(foreign, dtype=np.float64), np.asarray(depth, dtype=np.float64), nbr)
    return np.divide(f, d, out=np.zeros_like(f), where=d > 0)


def _folds(label_codes: np.ndarray, dataset_codes: np.ndarray, n_datasets: int, seed: int) -> tuple[np.ndarray, str]:
    if n_datasets >= 2:
        return dataset_codes.astype(np.int64), f"by dataset ({n_datasets} folds)"
    rng = np.random.default_rng(seed)
    fold = np.empty(label_codes.size, dtype=np.int64)
    for lab in np.unique(label_codes):
        idx = np.flatnonzero(label_codes == lab)
        fold[idx] = np.arange(idx.size)[rng.permutation(idx.size)] % N_FOLDS
    return fold, f"stratified random ({N_FOLDS} folds, seed {seed})"


def _search(query: np.ndarray, ref: np.ndarray, k: int, *, block: int = 512) -> np.ndarray:
    """Exact cosine kNN records (``knn.neighbor_dtype``) of ``query`` rows among ``ref`` rows."""
    if ref.shape[0] > SEARCH_DENSE_MAX_CELLS:  # dense blocks would be block x reference cells of float64
        ru = np.ascontiguousarray(knn.unit_rows(np.asarray(ref, dtype=np.float64)))
        vals, idx = knn.exact_search(query, ru, k)
        return knn.records_from_dots(vals, idx, k)
    qu, ru = knn.unit_rows(query), knn.unit_rows(ref)
    k_eff = min(k, ru.shape[0])
    out = np.empty(qu.shape[0], dtype=knn.neighbor_dtype(k))
    out["idx"], out["dist"] = -1, np.inf
    for s in range(0, qu.shape[0], block):
        e = min(s + block, qu.shape[0])
        d = np.sqrt(np.maximum(2.0 - 2.0 * (qu[s:e] @ ru.T), 0.0))
        part = np.argpartition(d, k_eff - 1, axis=1)[:, :k_eff]
        dd = np.take_along_axis(d, part, axis=1)
        order = np.lexsort((part, dd), axis=1)
        out["idx"][s:e, :k_eff] = np.take_along_axis(part, order, axis=1)
        out["dist"][s:e, :k_eff] = np.take_along_axis(dd, order, axis=1)
    return out


def coarse_matrix(levels) -> np.ndarray:
    """labels x labels: 1 where two labels share a coarse type."""
    coarse = np.array([lv.coarse for lv in levels], dtype=object)
    return (coarse[:, None] == coarse[None, :]).astype(np.float64)


def raw_scores(p: np.ndarray, fine: np.ndarray, same_coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The raw scores calibration maps: the fine label's share of ``p`` (per-label vote shares),
    and the share of the labels with its coarse type."""
    p = np.asarray(p, dtype=np.float64)
    rows = np.arange(p.shape[0])
    fine = np.asarray(fine, dtype=np.int64)
    return p[rows, fine], (p * same_coarse[fine]).sum(axis=1)


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
    return np.asarray(iso.X_thresholds_, dtype=np.float64), np.asarray(iso.y_thresholds_, dtype=np.float64)


def apply_map(knots: dict, x: np.ndarray) -> np.ndarray:
    """A stored monotone map (``{"x": [...], "y": [...]}``) at ``x`` (linear between knots, flat outside)."""
    return np.interp(np.asarray(x, dtype=np.float64), np.asarray(knots["x"], dtype=np.float64), np.asarray(knots["y"], dtype=np.float64))


def calibration_curve(prob: np.ndarray, right: np.ndarray, bins: int = ECE_BINS) -> tuple[list[dict], float]:
    """Equal-width bins of ``prob``: cells, mean probability, share right; and the ECE."""
    prob, right = np.asarray(prob, dtype=np.float64), np.asarray(right, dtype=np.float64)
    which = np.minimum((prob * bins).astype(np.int64), bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        mp, acc = float(prob[m].mean()), float(right[m].mean())
        curve.append({"bin": [b / bins, (b + 1) / bins], "cells": int(m.sum()), "mean_prob": round(mp, 4), "fraction_right": round(acc, 4)})
        ece += m.sum() / prob.size * abs(mp - acc)
    return curve, round(float(ece), 4)


def _calibrate(embedding: np.ndarray, label_codes: np.ndarray, levels, dataset_codes: np.ndarray, n_datasets: int,
               seed: int) -> dict:
    n_labels = len(levels)
    fold, scheme = _folds(label_codes, dataset_codes, n_datasets, seed)
    # at most CALIBRATION_MAX_CELLS held-out cells are scored (a seeded sample)
    scored = np.arange(label_codes.size)
    if scored.size > CALIBRATION_MAX_CELLS:
        scored = np.sort(np.random.default_rng(seed).choice(scored, CALIBRATION_MAX_CELLS, replace=False))
    same = coarse_matrix(levels)
    xs = {"fine": [], "coarse": []}
    ys = {"fine": [], "coarse": []}
    fold_of = []
    for f in np.unique(fold):
        test = scored[fold[scored] == f]
        train = np.flatnonzero(fold != f)
        if test.size == 0 or train.size == 0:
            continue
        k_used, _ = knn.neighbourhood(CALIBRATION_K, train.size)
        nbrs = _search(embedding[test], embedding[train], k_used)
        shim = SimpleNamespace(labels=tuple(range(n_labels)), label_codes=label_codes[train],
                               class_sizes=np.bincount(label_codes[train], minlength=n_labels))
        votes, _, p0 = vote.vote_with_scores(nbrs, shim, vote.small_reference(label_codes.size))
        fine = votes["fine"].astype(np.int64)
        sf, sc = raw_scores(p0, fine, same)
        truth = label_codes[test]
        xs["fine"].append(sf)
        ys["fine"].append((fine == truth).astype(np.float64))
        xs["coarse"].append(sc)
        ys["coarse"].append(same[fine, truth])
        fold_of.append(np.full(test.size, f))
    fold_of = np.concatenate(fold_of)
    out = {"folds": scheme, "cells_scored": int(fold_of.size), "k": CALIBRATION_K, "raw_score": "winning label's share of the (class-balanced) vote"}
    for level in ("fine", "coarse"):
        x, y = np.concatenate(xs[level]), np.concatenate(ys[level])
        kx, ky = _isotonic(x, y)
        # cross-fitted: each fold scored by a map fitted on the other folds
        cal = np.empty_like(x)
        for f in np.unique(fold_of):
            m = fold_of == f
            if (~m).any():
                fx, fy = _isotonic(x[~m], y[~m])
                cal[m] = np.interp(x[m], fx, fy)
            else:
                cal[m] = np.interp(x[m], kx, ky)
        curve, ece = calibration_curve(cal, y)
        out[level] = {"x": [round(float(v), 6) for v in kx], "y": [round(float(v), 6) for v in ky], "ece": ece, "curve": curve,
                      "accuracy": round(float(y.mean()), 4)}
    return out


def fit(blocks: Callable[[], Iterable[sp.csr_matrix]], *, label_codes: np.ndarray, labels: list[str], levels, embedding: np.ndarray,
        dataset_codes: np.ndarray, n_datasets: int, n_genes: int, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``confidence`` section of ``reference.json`` and the arrays it needs (for
    ``arrays.npz``, names starting ``conf_``): the candidate foreign genes, each reference
    cell's leave-one-out foreign UMIs in them (sparse), depth and :data:`POOL_K`-NN graph,
    and the calibration maps. ``blocks()`` yields the kept reference cells' raw counts
    (CSR, cells x universe genes) in reference order; it is read twice."""
    label_codes = np.asarray(label_codes, dtype=np.int64)
    n_labels = len(labels)
    class_sizes = np.bincount(label_codes, minlength=n_labels)
    nexpr, depth = _label_expression(blocks(), label_codes, n_labels, n_genes)
    frac = nexpr / np.maximum(class_sizes, 1)[:, None]
    foreign = frac.max(axis=0) <= FOREIGN_MAX_FRACTION
    # a gene one cell keeps out of the foreign set is foreign for that cell left out
    near = ((nexpr - 1) / np.maximum(class_sizes - 1, 1)[:, None]).max(axis=0) <= FOREIGN_MAX_FRACTION
    cand = foreign | near
    counts = _loo_foreign_counts(blocks(), label_codes, nexpr, class_sizes, cand)
    cand_idx = np.flatnonzero(cand)
    graph = self_graph(embedding)
    thr = reference_thresholds(counts, depth, graph, label_codes, n_labels, np.ones(cand_idx.size, dtype=bool))
    section = {
        "schema": SCHEMA,
        "novelty": {
            "rule": ("pooled foreign-gene load, above the query's own per-gene background, over the label's leave-one-out "
                     "reference quantile (on the genes the query measured)"),
            "foreign_max_fraction": FOREIGN_MAX_FRACTION, "min_count": MIN_COUNT, "pool_k": POOL_K, "quantile": QUANTILE,
            "min_pooled_umis": MIN_POOLED_UMIS, "background": "median over the query's neighbourhoods, per gene",
            "foreign_genes": int(foreign.sum()), "candidate_genes": int(cand_idx.size),
            "thresholds_all_genes": {lab: float(t) for lab, t in zip(labels, thr)},
        },
        "calibration": _calibrate(np.asarray(embedding, dtype=np.float64), label_codes, levels, np.asarray(dataset_codes), n_datasets, seed),
    }
    # canonical CSR (sorted column indices, no explicit zeros): the bytes must not depend on how the
    # input's sparse blocks were laid out (CSR h5ad, CSC h5ad, a SOMA store give the same reference)
    counts = sp.csr_matrix(counts)
    counts.eliminate_zeros()
    counts.sort_indices()
    arrays = {"conf_genes": cand_idx.astype(np.int64), "conf_foreign": foreign[cand_idx], "conf_ref_indptr": counts.indptr.astype(np.int64),
              "conf_ref_indices": counts.indices.astype(np.int32), "conf_ref_data": counts.data.astype(np.float32),
              "conf_ref_depth": depth.astype(np.float64), "conf_ref_graph": graph.astype(np.int32)}
    return section, arrays


def reference_thresholds(counts: sp.csr_matrix, depth: np.ndarray, graph: np.ndarray, label_codes: np.ndarray, n_labels: int,
                         genes: np.ndarray) -> np.ndarray:
    """Per label: the :data:`QUANTILE` quantile of the reference cells' pooled foreign load
    over the candidate genes ``genes`` (bool), never below the reference-wide quantile."""
    load = np.asarray(counts[:, np.flatnonzero(genes)].sum(axis=1), dtype=np.float64).ravel()
    return label_quantiles(pooled_load(load, depth, graph), label_codes, n_labels)


# ----------------------------------------------------------------------------- annotate time

@dataclass(frozen=True)
class Confidence:
    """What annotate needs from a reference's confidence section, for one query's genes."""

    genes: np.ndarray  # universe columns of the candidate foreign genes the query measured
    cand_columns: np.ndarray  # their columns among the reference's candidate genes
    foreign: np.ndarray  # bool per measured candidate: foreign in the whole reference (the query counts these)
    measured: np.ndarray  # universe columns the query measured
    ref_counts: sp.csr_matrix
    ref_depth: np.ndarray
    ref_graph: np.ndarray
    label_codes: np.ndarray
    n_labels: int
    calibration: dict
    same_coarse: np.ndarray
    section: dict

    @classmethod
    def from_model(cls, model, query_index: np.ndarray) -> "Confidence | None":
        """None for a reference built without a confidence section."""
        sec = (model.meta or {}).get("confidence")
        arr = getattr(model, "extra", None) or {}
        if not sec or sec.get("schema") != SCHEMA or "conf_genes" not in arr:
            return None
        genes = arr["conf_genes"]
        measured_mask = np.asarray(query_index) >= 0
        got = measured_mask[genes]
        counts = sp.csr_matrix((arr["conf_ref_data"], arr["conf_ref_indices"], arr["conf_ref_indptr"]),
                               shape=(arr["conf_ref_depth"].size, genes.size))
        return cls(genes=genes[got], cand_columns=np.flatnonzero(got), foreign=arr["conf_foreign"][got],
                   measured=np.flatnonzero(measured_mask), ref_counts=counts, ref_depth=arr["conf_ref_depth"],
                   ref_graph=arr["conf_ref_graph"].astype(np.int64), label_codes=np.asarray(model.label_codes, dtype=np.int64),
                   n_labels=len(model.labels), calibration=sec["calibration"], same_coarse=coarse_matrix(model.levels), section=sec)


def _stats_block(block: sp.csr_matrix, cols: np.ndarray, weights: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """One chunk of query counts: its cells' UMIs in the columns ``cols`` (the foreign genes)
    where at least :data:`MIN_COUNT` (CSR), and their depth ``block @ weights`` (``weights``:
    per column, how many measured universe genes it is)."""
    b = sp.csr_matrix(block)
    f = b[:, cols].tocsr().astype(np.float32)
    f.data = np.where(f.data >= MIN_COUNT, f.data, 0).astype(np.float32)
    f.eliminate_zeros()
    return f, np.asarray(b @ weights, dtype=np.float64).ravel()


def _read_stats_block(path: str, start: int, stop: int, n_features: int, cols: np.ndarray,
                      weights: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    return _stats_block(store.read_block(path, start, stop, n_features), cols, weights)


def foreign_stats(st, conf: Confidence, query_index: np.ndarray, *, chunk_cells: int) -> list:
    """Lazy, one Delayed per chunk of the store ``st`` (see :func:`_stats_block`), each task
    reading its own chunk (``query_index``: the query column of each universe gene, -1 where
    unmeasured): the cells' foreign UMIs in the measured foreign genes, and their depth over the
    measured universe genes. The same integer sums as from the counts aligned to the universe,
    without aligning every chunk. The read stays inside the task: dask runs these last, and
    separate read tasks were run first and held (5.9 GB at 1.2M cells)."""
    import dask

    qi = np.asarray(query_index, dtype=np.int64)
    cols = qi[conf.genes[conf.foreign]]
    weights = np.bincount(qi[conf.measured], minlength=st.n_features).astype(np.float64)
    bounds = np.cumsum((0,) + store.cell_chunks(st.n_cells, chunk_cells))
    return [dask.delayed(_read_stats_block, pure=True)(st.path, int(a), int(b), st.n_features, cols, weights)
            for a, b in zip(bounds[:-1], bounds[1:])]


def background_excess(E: sp.csr_matrix, depth: np.ndarray, nbr: np.ndarray | None,
                      A: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled foreign UMIs above the query's own background, pooled depth, and per gene the
    background rate.

    Each cell's foreign UMIs (``E``, cells x genes) and depth are summed over the cell and
    its neighbours. A gene's background rate is the median over those neighbourhoods of its
    pooled UMIs per pooled depth: zero for a gene that only some of the query's
    populations express (a type's program), the common level for one a chemistry or
    gene-annotation difference adds to every cell. Only the excess over it counts.
    ``A``: :func:`neighbourhood_matrix` of ``nbr`` when the caller already has it.
    """
    n, G = E.shape
    A = neighbourhood_matrix(n, nbr) if A is None else A
    P = (A @ E.astype(np.float64)).tocsc()
    D = A @ np.asarray(depth, dtype=np.float64)
    rate = np.zeros(G)
    common = np.flatnonzero(np.diff(P.indptr) * 2 > n)  # a median above zero needs most neighbourhoods
    inv = np.divide(1.0, D, out=np.zeros_like(D), where=D > 0)
    for g in common:
        col = np.zeros(n)
        sl = slice(P.indptr[g], P.indptr[g + 1])
        col[P.indices[sl]] = P.data[sl] * inv[P.indices[sl]]
        rate[g] = float(np.median(col))
    P = P.tocsr()
    if common.size:
        Pc = P[:, common].toarray()
        excess = (np.asarray(P.sum(axis=1)).ravel() - Pc.sum(axis=1)
                  + np.maximum(Pc - np.outer(D, rate[common]), 0.0).sum(axis=1))
    else:
        excess = np.asarray(P.sum(axis=1)).ravel()
    return excess, D, rate


def novel(conf: Confidence, stats: list, fine: np.ndarray, nbr: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """Which cells fail the novelty test (bool), and what was used (for run.json)."""
    E = sp.vstack([s[0] for s in stats], format="csr") if stats else sp.csr_matrix((0, int(conf.foreign.sum())))
    depth = np.concatenate([s[1] for s in stats]) if stats else np.zeros(0)
    A = neighbourhood_matrix(E.shape[0], nbr)  # the query's neighbourhoods, once for both tests
    xp, dp, rate = background_excess(E, depth, nbr, A)
    # the reference side on the same (measured) genes; candidate genes foreign only
    # leave-one-out stay in: the reference cells holding them would count them as new
    ref_genes = np.zeros(conf.ref_counts.shape[1], dtype=bool)
    ref_genes[conf.cand_columns] = True
    thr = reference_thresholds(conf.ref_counts, conf.ref_depth, conf.ref_graph, conf.label_codes, conf.n_labels, ref_genes)
    load = np.divide(xp, dp, out=np.zeros_like(xp), where=dp > 0)
    fine = np.asarray(fine, dtype=np.int64)
    loaded = (load > thr[fine]) & (xp >= MIN_POOLED_UMIS)
    # second signal: a foreign *program* (genes most of the neighbourhood expresses), over the
    # label's leave-one-out reference level; a technology shift adds diffuse foreign UMIs, not programs
    wide = sample_wide(E, fine, conf.n_labels)
    prog = program_genes(E[:, np.flatnonzero(~wide)], nbr, A)
    ref_prog = program_genes(conf.ref_counts[:, conf.cand_columns], conf.ref_graph)
    pthr = label_quantiles(ref_prog, conf.label_codes, conf.n_labels)
    programmed = prog > pthr[fine]
    rejected = loaded & programmed
    info = {"thresholds": thr, "program_thresholds": pthr, "foreign_genes_measured": int(conf.foreign.sum()),
            "foreign_genes_with_background": int((rate > 0).sum()), "sample_wide_genes": int(wide.sum()),
            "cells_over_load_threshold": int(loaded.sum()), "cells_with_foreign_program": int(programmed.sum())}
    return rejected, info


def neighbourhood_matrix(n: int, nbr: np.ndarray | None) -> sp.csr_matrix:
    """n x n, 1 where column j is row i or one of its neighbours (``nbr``, -1 = none)."""
    if nbr is None or not np.asarray(nbr).size:
        return sp.identity(n, format="csr")
    nbr = np.asarray(nbr, dtype=np.int64)
    own = np.concatenate([np.arange(n, dtype=np.int64)[:, None], nbr], axis=1)  # row i: i, then its neighbours
    keep = own >= 0
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    A = sp.csr_matrix((np.ones(int(indptr[-1])), own[keep], indptr), shape=(n, n))
    A.sum_duplicates()  # a neighbour listed twice (or the cell itself) counts once per listing, as before
    return A


def sample_wide(E: sp.csr_matrix, fine: np.ndarray, n_labels: int) -> np.ndarray:
    """Per foreign gene (column of ``E``): True when the query's cells of *every* nearest label
    with at least :data:`MIN_GROUP_CELLS` cells express it (at least :data:`MIN_COUNT` UMIs) more
    often than :data:`FOREIGN_MAX_FRACTION` but none of them in more than
    :data:`PROGRAM_FRACTION` of its cells, and at least two labels are that populated: the
    reference's foreign rule mirrored on the query. A gene every query population has at a low
    rate is the sample's (its chemistry, its gene annotation); one that a population expresses
    in most of its cells is a program, even when every population has it (a foreign tissue
    spread over several reference types). A query that falls on a single reference type
    cannot show this, and keeps every gene."""
    E = sp.csr_matrix(E)
    fine = np.asarray(fine, dtype=np.int64)
    sizes = np.bincount(fine, minlength=n_labels)
    big = np.flatnonzero(sizes >= MIN_GROUP_CELLS)
    if big.size < 2:
        return np.zeros(E.shape[1], dtype=bool)
    on = sp.csr_matrix(((E.data > 0).astype(np.float64), E.indices, E.indptr), shape=E.shape)
    onehot = sp.csr_matrix((np.ones(fine.size), (fine, np.arange(fine.size))), shape=(n_labels, fine.size))
    frac = (onehot @ on).toarray()[big] / sizes[big, None]
    return (frac > FOREIGN_MAX_FRACTION).all(axis=0) & (frac <= PROGRAM_FRACTION).all(axis=0)


def program_genes(E: sp.csr_matrix, nbr: np.ndarray | None, A: sp.csr_matrix | None = None) -> np.ndarray:
    """Per cell: how many foreign genes (columns of ``E``: counts kept only where at least
    :data:`MIN_COUNT`) more than :data:`PROGRAM_FRACTION` of the cell and its neighbours
    express: the foreign genes its neighbourhood shares as a program (``A``: as in
    :func:`background_excess`)."""
    E = sp.csr_matrix(E)
    n = E.shape[0]
    if n == 0:
        return np.zeros(0)
    A = neighbourhood_matrix(n, nbr) if A is None else A
    size = np.asarray(A.sum(axis=1), dtype=np.float64).ravel()
    on = sp.csr_matrix((np.ones(E.nnz), E.indices, E.indptr), shape=E.shape)
    on.data[E.data <= 0] = 0.0
    F = sp.csr_matrix(A @ on)
    rows = np.repeat(np.arange(n), np.diff(F.indptr))
    return np.bincount(rows, weights=(F.data > PROGRAM_FRACTION * size[rows]).astype(np.float64), minlength=n)


def label_quantiles(values: np.ndarray, label_codes: np.ndarray, n_labels: int) -> np.ndarray:
    """Per label: the :data:`QUANTILE` quantile of ``values`` over its reference cells, never below
    the reference-wide quantile."""
    overall = float(np.quantile(values, QUANTILE)) if values.size else 0.0
    out = np.full(n_labels, overall)
    for i in range(n_labels):
        vals = values[label_codes == i]
        if vals.size:
            out[i] = max(float(np.quantile(vals, QUANTILE)), overall)
    return out


def pooled_sums(x: np.ndarray, depth: np.ndarray, nbr: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``depth`` summed over each cell and its neighbours (``nbr``, -1 = none)."""
    f, d = np.asarray(x, dtype=np.float64).copy(), np.asarray(depth, dtype=np.float64).copy()
    if nbr is not None and nbr.size:
        valid = nbr >= 0
        safe = np.where(valid, nbr, 0)
        f += np.where(valid, x[safe], 0.0).sum(axis=1)
        d += np.where(valid, depth[safe], 0.0).sum(axis=1)
    return f, d


def calibrated(conf: Confidence, p: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth of the call and the calibrated probability that the reported level is right."""
    sf, sc = raw_scores(p, fine, conf.same_coarse)
    pf = apply_map(conf.calibration["fine"], sf)
    pc = np.maximum(apply_map(conf.calibration["coarse"], sc), pf)  # the coarse call is right whenever the fine one is
    depth = np.where(pf >= CONFIDENT, DEPTH_FINE, np.where(pc >= CONFIDENT, DEPTH_COARSE, DEPTH_BROAD)).astype(np.int8)
    prob = np.where(depth == DEPTH_FINE, pf, pc).astype(np.float32)
    return depth, prob


def record(conf: Confidence | None, *, reject: str, rejected: np.ndarray | None, fine: np.ndarray, labels, depth: np.ndarray | None,
           info: dict | None = None) -> dict:
    """The ``confidence`` block of run.json."""
    if conf is None:
        return {"reject": reject, "applied": False,
                "reason": "the reference has no confidence section (built before dask-annot could reject); rebuild it"}
    cal = conf.calibration
    nov = conf.section["novelty"]
    out = {
        "reject": reject,
        "applied": reject != "none",
        "rule": RULE if reject != "none" else "none: every cell keeps its vote (10x's semantics)",
        "parameters": {**{k: nov[k] for k in ("foreign_max_fraction", "min_count", "pool_k", "quantile", "min_pooled_umis", "background")},
                       "program_fraction": PROGRAM_FRACTION, "min_group_cells": MIN_GROUP_CELLS},
        "foreign_genes_in_reference": nov["foreign_genes"],
        "calibration": {"folds": cal["folds"], "cells_scored": cal["cells_scored"],
                        "fine": {"ece": cal["fine"]["ece"], "curve": cal["fine"]["curve"]},
                        "coarse": {"ece": cal["coarse"]["ece"], "curve": cal["coarse"]["curve"]}},
    }
    if info is not None:
        out["thresholds"] = {lab: float(t) for lab, t in zip(labels, info["thresholds"])}
        out["foreign_genes_measured"] = info["foreign_genes_measured"]
        out["foreign_genes_with_query_background"] = info["foreign_genes_with_background"]
        out["program_thresholds"] = {lab: float(t) for lab, t in zip(labels, info["program_thresholds"])}
        out["cells_over_load_threshold"] = info["cells_over_load_threshold"]
        out["cells_with_foreign_program"] = info["cells_with_foreign_program"]
        out["sample_wide_genes"] = info["sample_wide_genes"]
    if rejected is not None:
        fine = np.asarray(fine, dtype=np.int64)
        per = {}
        for i, lab in enumerate(labels):
            m = fine == i
            if m.any():
                per[lab] = {"cells": int(m.sum()), "rejected": int(rejected[m].sum()), "fraction": round(float(rejected[m].mean()), 4)}
        out["rejected"] = int(rejected.sum())
        out["rejected_by_nearest_type"] = per
    if depth is not None:
        out["depth_counts"] = {name: int((depth == d).sum()) for name, d in
                               (("unassigned", DEPTH_NONE), ("broad", DEPTH_BROAD), ("coarse", DEPTH_COARSE), ("fine", DEPTH_FINE))}
    return out
