"""Marker models: Cell Ontology types with marker genes, scored per cell (the Azimuth analogue).

A marker model (reference format v2, ``kind: markers``) holds no cells: each cell type is a
Cell Ontology term with positive (and, where the source table gives them, negative) marker
genes, placed in the broad -> coarse -> fine hierarchy of :mod:`dask_annot.ontology`.

Scoring, for a query of raw counts (every step per cell, so the result does not depend on
chunking, workers or scheduler; the one query-wide quantity is an exact integer sum):

1. **Poisson residual per marker gene.** A gene's query-wide rate is
   ``r_g = sum of its counts / sum of all counts`` (integers, so exact); a cell of depth
   ``n`` (its total UMIs) expects ``mu = n r_g`` counts and scores
   ``z = (x - mu) / sqrt(mu)``, clipped to ``[-CLIP, CLIP]``. On sparse cells (a few hundred
   UMIs) a single marker count is strong evidence when ``mu`` is small, and a zero costs
   little (``-sqrt(mu)``): the score is depth-aware where a rank or a log-normalised
   z-score is not.
2. **Stouffer per type.** ``S_t = sum_g sign_g z_g / sqrt(m_t)`` over the type's ``m_t``
   markers measured in the query (a gene with no count anywhere in the query is not
   evidence). A type is a candidate only when at least :data:`MIN_MEASURED` of its markers,
   and at least :data:`MIN_MEASURED_GENES`, are measured: a type cannot be judged on the
   one or two of its markers it shares with others (endothelial cells on HLA class II
   genes alone called B cells). A type also carries the markers of its Cell Ontology
   ancestors that two or more organ tables agree on (:func:`inherit_markers`).
3. **Pooling over the query's own neighbour graph** (the 15-NN graph of
   :func:`dask_annot.consensus.query_graph`): ``S <- mean of S over the cell and its
   neighbours``, :data:`POOL_ROUNDS` times (a cell's neighbours share its type, so their
   markers are more evidence; measured in ``benchmarks/markers.py``).
4. **Top-down decision.** A group's score is its best type's score. The broad group is the
   best-scoring broad group; then the best coarse group inside it; then the best type
   inside that. At each level ``p`` is the softmax (temperature :data:`TEMPERATURE`) of the
   sibling groups' scores; the call goes down to the deepest level whose ``p`` exceeds
   :data:`CONFIDENT_P` (broad is always reported for an assigned cell). ``Unassigned``: the
   best type's pooled score is below :data:`UNASSIGNED_Z` (no type's markers are
   expressed above what the cell's depth explains).

``final_level_softmax_prob`` is the ``p`` of the reported final level: a softmax of
pooled Stouffer scores among that level's siblings. It ranks calls (see the calibration
table in ``benchmarks/results/markers.md``); it is not a calibrated probability.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import dask
import numpy as np
import scipy.sparse as sp

from . import store
from .errors import ConfigError, GeneOverlapError, InputFormatError, InputNotFoundError
from .ontology import Levels, levels_for
from .outputs import DEPTH_BROAD, DEPTH_COARSE, DEPTH_FINE, DEPTH_NONE, calls_from
from .reference import read_artifact

CLIP = 10.0
POOL_ROUNDS = 2
TEMPERATURE = 1.0
CONFIDENT_P = 0.5
UNASSIGNED_Z = 1.0
MIN_SHARED_GENES = 5
MIN_MEASURED = 0.5
MIN_MEASURED_GENES = 2


def parameters() -> dict:
    return {"residual": "Poisson (x - n r_g) / sqrt(n r_g)", "clip": CLIP, "combine": "Stouffer, signed",
            "pool_rounds": POOL_ROUNDS, "temperature": TEMPERATURE, "confident_p": CONFIDENT_P, "unassigned_z": UNASSIGNED_Z}


# ----------------------------------------------------------------------------- the marker table


@dataclass(frozen=True)
class MarkerTable:
    """Parsed marker table: one entry per (type, gene) with its sign (+1 / -1)."""

    types: list[tuple[str, str | None]]  # (cell_type label, CL id or None), sorted
    genes: list[str]
    type_idx: np.ndarray
    gene_idx: np.ndarray
    sign: np.ndarray
    organs: dict[int, list[str]]
    support: np.ndarray  # per entry: how many organs' tables list the marker (at least 1)


def read_marker_table(path: str | os.PathLike) -> MarkerTable:
    """Read a marker CSV (columns ``cell_type,ontology_id,gene`` and optionally ``sign``
    (``+``/``-``) and ``organ``; ``;``-separated organs allowed). A type is keyed by its
    ontology id when it has one, else by its name; a gene positive for a type wins over the
    same gene negative."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: marker table not found; pass a CSV with columns cell_type,ontology_id,gene[,sign,organ]")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        if not {"cell_type", "ontology_id", "gene"} <= cols:
            raise InputFormatError(f"{p}: a marker table needs the columns cell_type,ontology_id,gene (optional sign,organ); found {sorted(cols)}")
        entries: dict[tuple, dict[str, int]] = {}
        organs: dict[tuple, set[str]] = {}
        gene_organs: dict[tuple, set[str]] = {}
        names: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            name, term, gene = (row.get("cell_type") or "").strip(), (row.get("ontology_id") or "").strip(), (row.get("gene") or "").strip()
            sign_txt = (row.get("sign") or "+").strip() or "+"
            if not gene or not (name or term):
                raise InputFormatError(f"{p}:{line}: needs a gene and a cell_type or ontology_id; fill the row in or remove it")
            if sign_txt not in ("+", "-"):
                raise InputFormatError(f"{p}:{line}: sign '{sign_txt}' must be + or -")
            key = term or name
            names.setdefault(key, name or term)
            g = entries.setdefault(key, {})
            s = 1 if sign_txt == "+" else -1
            g[gene] = max(g.get(gene, s), s)
            listed = {o.strip() for o in (row.get("organ") or "").split(";") if o.strip()}
            organs.setdefault(key, set()).update(listed)
            gene_organs.setdefault((key, gene), set()).update(listed)
    if not entries:
        raise InputFormatError(f"{p}: no marker rows; a marker table needs at least one cell type with marker genes")
    keys = sorted(entries)
    genes = sorted({g for e in entries.values() for g in e})
    gcode = {g: i for i, g in enumerate(genes)}
    ti, gi, sg, su = [], [], [], []
    for t, key in enumerate(keys):
        for g, s in sorted(entries[key].items()):
            ti.append(t), gi.append(gcode[g]), sg.append(s), su.append(max(1, len(gene_organs.get((key, g), ()))))
    types = [(names[k], k if k.startswith("CL:") else None) for k in keys]
    return MarkerTable(types=types, genes=genes, type_idx=np.array(ti, np.int32), gene_idx=np.array(gi, np.int32),
                       sign=np.array(sg, np.int8), organs={t: sorted(organs[k]) for t, k in enumerate(keys)},
                       support=np.array(su, np.int32))


INHERIT_MIN_ORGANS = 2


def inherit_markers(table: MarkerTable) -> MarkerTable:
    """Each type also carries the markers of its Cell Ontology ancestors (types of the same
    table) on which at least :data:`INHERIT_MIN_ORGANS` organ tables agree: a CD8 T cell is a
    T cell, so the T cell markers the atlas agrees on are evidence for it. One organ's list
    for a broad type can be particular to that organ (ASCT+B's lymph-node "B cell" lists
    cycling genes), so single-organ markers are not passed down. A type's own sign wins."""
    from .ontology import cell_ontology

    cl = cell_ontology()
    tcode = {term: t for t, (_, term) in enumerate(table.types) if term}
    own: dict[int, dict[int, tuple[int, int]]] = {}
    for t, g, s, n in zip(table.type_idx.tolist(), table.gene_idx.tolist(), table.sign.tolist(), table.support.tolist()):
        own.setdefault(t, {})[g] = (s, n)
    ti, gi, sg, su = [], [], [], []
    for t, (_, term) in enumerate(table.types):
        merged = dict(own.get(t, {}))
        if term and term in cl:
            for anc, _dist in sorted(cl[term]["ancestors"].items(), key=lambda x: (x[1], x[0])):
                for g, (s, n) in sorted(own.get(tcode.get(anc, -1), {}).items()):
                    if n >= INHERIT_MIN_ORGANS:
                        merged.setdefault(g, (s, n))
        for g, (s, n) in sorted(merged.items()):
            ti.append(t), gi.append(g), sg.append(s), su.append(n)
    return MarkerTable(types=table.types, genes=table.genes, type_idx=np.array(ti, np.int32), gene_idx=np.array(gi, np.int32),
                       sign=np.array(sg, np.int8), organs=table.organs, support=np.array(su, np.int32))


def marker_artifact(table: MarkerTable, *, name: str, species: str, version: str, source: dict) -> tuple[dict, dict]:
    """Arrays and metadata of a marker model (written by :func:`dask_annot.build.build_marker_reference`)."""
    levels = [levels_for(label, term) for label, term in table.types]
    labels = [lv.fine for lv in levels]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"marker table: the cell type name(s) {sorted(dup)[:3]} appear under more than one id; give each type one ontology_id")
    df = np.bincount(table.gene_idx[table.sign > 0], minlength=len(table.genes))  # before inheritance
    table = inherit_markers(table)
    n_pos = np.bincount(table.type_idx[table.sign > 0], minlength=len(labels))
    if np.any(n_pos == 0):
        bad = [labels[i] for i in np.flatnonzero(n_pos == 0)][:3]
        raise ConfigError(f"marker table: cell type(s) {bad} have no positive marker; give every type at least one positive marker gene")
    arrays = {"genes": np.array(table.genes, dtype=str), "type_idx": table.type_idx, "gene_idx": table.gene_idx, "sign": table.sign,
              "gene_types": np.maximum(df, 1).astype(np.int32),
              "support": table.support}
    organs = sorted({o for v in table.organs.values() for o in v})
    meta = {
        "kind": "markers", "name": name, "version": version, "species": species, "source": source,
        "labels": labels, "levels": [vars(lv) | {} for lv in levels], "n_types": len(labels), "n_genes": len(table.genes),
        "n_markers": int(table.sign.size), "n_negative_markers": int(np.count_nonzero(table.sign < 0)),
        "organs": organs, "type_organs": {labels[t]: v for t, v in table.organs.items() if v},
        "scoring": parameters(),
    }
    return arrays, meta


# ----------------------------------------------------------------------------- the loaded model


@dataclass(frozen=True, eq=False)
class MarkerModel:
    name: str
    version: str
    species: str
    path: str
    genes: np.ndarray
    type_idx: np.ndarray
    gene_idx: np.ndarray
    sign: np.ndarray
    gene_types: np.ndarray
    labels: tuple[str, ...]
    levels: tuple[Levels, ...]
    meta: dict = field(repr=False)

    kind = "markers"
    n_cells = 0  # no reference cells

    @property
    def organs(self) -> list[str]:
        return list(self.meta.get("organs", []))

    @cached_property
    def hierarchy(self) -> "Hierarchy":
        return Hierarchy.of(self.levels)


def load_marker_model(path: str | os.PathLike) -> MarkerModel:
    p = Path(path)
    meta, arrays = read_artifact(p, kind="markers")
    return MarkerModel(
        name=meta["name"], version=str(meta["version"]), species=meta.get("species", "unknown"), path=str(p.resolve()),
        genes=arrays["genes"].astype(object), type_idx=arrays["type_idx"].astype(np.int64), gene_idx=arrays["gene_idx"].astype(np.int64),
        sign=arrays["sign"].astype(np.float64), gene_types=arrays["gene_types"].astype(np.int64), labels=tuple(meta["labels"]), levels=tuple(Levels(**lv) for lv in meta["levels"]), meta=meta,
    )


@dataclass(frozen=True)
class Hierarchy:
    """Types grouped broad -> coarse: ``broad_of`` / ``coarse_of`` give each type's group codes."""

    broad_of: np.ndarray
    coarse_of: np.ndarray
    coarse_parent: np.ndarray  # coarse group -> broad group
    n_broad: int
    n_coarse: int

    @classmethod
    def of(cls, levels) -> "Hierarchy":
        broads = sorted({lv.broad for lv in levels})
        coarses = sorted({(lv.broad, lv.coarse) for lv in levels})
        bcode = {b: i for i, b in enumerate(broads)}
        ccode = {c: i for i, c in enumerate(coarses)}
        return cls(broad_of=np.array([bcode[lv.broad] for lv in levels]), coarse_of=np.array([ccode[(lv.broad, lv.coarse)] for lv in levels]),
                   coarse_parent=np.array([bcode[b] for b, _ in coarses]), n_broad=len(broads), n_coarse=len(coarses))


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class GenePlan:
    """The model's genes found in the query: query columns and the model gene each is."""

    query_cols: np.ndarray
    model_genes: np.ndarray
    n_model_genes: int
    scorable: np.ndarray  # per type: a candidate (enough of its markers measured in the query, and of the --organ organs)
    organs: tuple = ()  # --organ: only the types of these organs are candidates (empty: every type)
    organ_types: int = 0  # types of those organs (before the measured-marker rule)

    def record(self) -> dict:
        rec = {"model_genes": self.n_model_genes, "shared_genes": int(self.query_cols.size), "matched_by": "symbol, case-insensitive",
               "cell_types_scorable": int(self.scorable.sum()), "cell_types": int(self.scorable.size),
               "scorable_rule": f"at least {MIN_MEASURED:.0%} of a type's markers, and at least {MIN_MEASURED_GENES}, in the matrix"}
        if self.organs:
            rec.update(organs=list(self.organs), cell_types_of_organs=self.organ_types)
        return rec


def organ_candidates(model: MarkerModel, organs) -> np.ndarray:
    """Per type: is it a candidate when the user names the sample's organs (``--organ``)?
    A type is when any organ table that lists it is among ``organs``; no organs = every type.
    An organ the model does not know is a :class:`ConfigError` naming the ones it does."""
    wanted = [o.strip().lower() for o in (organs or ()) if o and o.strip()]
    if not wanted:
        return np.ones(len(model.labels), bool)
    known = set(model.organs)
    if not known:
        raise ConfigError(f"--organ: model '{model.name}' lists no organs (its marker table has no organ column); "
                          "leave --organ out, or rebuild the model from a table with an organ column")
    bad = [o for o in wanted if o not in known]
    if bad:
        raise ConfigError(f"--organ {','.join(bad)}: not an organ of model '{model.name}'; choose from {', '.join(sorted(known))}")
    type_organs = model.meta.get("type_organs", {})
    return np.array([bool(set(type_organs.get(lab, ())) & set(wanted)) for lab in model.labels])


def align_markers(model: MarkerModel, feature_names: np.ndarray, *, source: str, organs=()) -> GenePlan:
    """Match the model's marker genes to the query's gene symbols (case-insensitive, first
    occurrence). With ``organs`` only the types of those organs are candidates
    (:func:`organ_candidates`)."""
    first: dict[str, int] = {}
    for i, n in enumerate(np.asarray(feature_names, dtype=str)):
        first.setdefault(n.upper(), i)
    q, m = [], []
    for j, g in enumerate(model.genes):
        i = first.get(str(g).upper())
        if i is not None:
            q.append(i), m.append(j)
    measured = np.zeros(len(model.genes), bool)
    measured[np.array(m, np.int64)] = True
    n_all = np.bincount(model.type_idx, minlength=len(model.labels))
    n_meas = np.bincount(model.type_idx, weights=measured[model.gene_idx], minlength=len(model.labels))
    scorable = (n_meas >= MIN_MEASURED * n_all) & (n_meas >= MIN_MEASURED_GENES)
    in_organs = organ_candidates(model, organs)
    organs_used = sorted({o.strip().lower() for o in (organs or ()) if o and o.strip()})
    if organs_used and not (scorable & in_organs).any():
        raise GeneOverlapError(f"{source}: no cell type of organ(s) {', '.join(organs_used)} in model '{model.name}' has enough of its "
                               "marker genes in the matrix; check --organ and the species")
    scorable = scorable & in_organs
    if len(q) < MIN_SHARED_GENES or not scorable.any():
        raise GeneOverlapError(
            f"{source}: only {len(q)} of the {len(model.genes)} marker genes of model '{model.name}' ({model.species}) are in the matrix; "
            "check the species, or that the matrix has gene symbols"
        )
    return GenePlan(query_cols=np.array(q, np.int64), model_genes=np.array(m, np.int64), n_model_genes=len(model.genes), scorable=scorable,
                    organs=tuple(organs_used), organ_types=int(in_organs.sum()))


def block_gene_sums(path: str, start: int, stop: int, n_features: int, cols: np.ndarray) -> np.ndarray:
    """Integer counts of the marker genes over cells ``start:stop`` (exact, so order-free)."""
    x = store.read_block(path, start, stop, n_features)[:, cols]
    return np.asarray(x.sum(axis=0, dtype=np.int64)).ravel()


def gene_rates(sums: list, total_umi: int) -> np.ndarray:
    return np.sum(np.vstack(sums), axis=0, dtype=np.int64) / max(int(total_umi), 1)


def type_weights(model: MarkerModel, plan: GenePlan, rates: np.ndarray) -> sp.csr_matrix:
    """types x shared genes: ``sign / sqrt(m_t)``, ``m_t`` the type's number of markers measured
    in the query (a type with too few of them is left out, see :func:`align_markers`); a marker
    with no count anywhere in the query is no evidence (z = 0)."""
    col_of = np.full(len(model.genes), -1, np.int64)
    col_of[plan.model_genes] = np.arange(plan.model_genes.size)
    cols = col_of[model.gene_idx]
    ok = cols >= 0
    ok[ok] &= rates[cols[ok]] > 0
    t, c, s = model.type_idx[ok], cols[ok], model.sign[ok]
    m = np.bincount(model.type_idx, weights=(cols >= 0), minlength=len(model.labels)).astype(np.float64)
    m[m == 0] = 1.0
    w = s / np.sqrt(m[t])
    return sp.csr_matrix((w, (t, c)), shape=(len(model.labels), plan.query_cols.size))


def residuals(x: sp.csr_matrix, umi: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Clipped Poisson residuals (cells x genes, float64); 0 for genes absent from the query."""
    mu = np.asarray(umi, np.float64)[:, None] * rates[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x.toarray().astype(np.float64) - mu) / np.sqrt(mu)
    z[:, rates <= 0] = 0.0
    z[~np.isfinite(z)] = 0.0  # cells with no UMIs
    return np.clip(z, -CLIP, CLIP)


def block_scores(path: str, start: int, stop: int, n_features: int, cols: np.ndarray, umi: np.ndarray,
                 rates: np.ndarray, weights: sp.csr_matrix) -> np.ndarray:
    """Stouffer score of every type for cells ``start:stop`` (cells x types, float32). The
    sparse-times-dense product sums each cell's genes in a fixed order: per-cell results."""
    x = store.read_block(path, start, stop, n_features)[:, cols]
    z = residuals(x, umi, rates)
    return np.ascontiguousarray((weights @ z.T).T, dtype=np.float32)  # float32: cells x types is the run's largest array


def lazy_scores(st: store.StoreInfo, model: MarkerModel, plan: GenePlan, *, chunk_cells: int):
    """Lazy (Delayed): per-cell type scores (cells x types) and the gene rates."""
    cols = plan.query_cols
    umi = np.asarray(st.umi_count)
    bounds = np.cumsum((0,) + store.cell_chunks(st.n_cells, chunk_cells))
    spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    sums = [dask.delayed(block_gene_sums, pure=True)(st.path, a, b, st.n_features, cols) for a, b in spans]
    rates = dask.delayed(gene_rates, pure=True)(sums, int(np.sum(umi, dtype=np.int64)))
    model_d = dask.delayed(model, pure=True, traverse=False)
    weights = dask.delayed(type_weights, pure=True)(model_d, plan, rates)
    parts = [dask.delayed(block_scores, pure=True)(st.path, a, b, st.n_features, cols, umi[a:b], rates, weights) for a, b in spans]
    return dask.delayed(_concat_scores, pure=True)(parts, len(model.labels)), rates


def _concat_scores(parts: list, n_types: int) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, n_types), np.float32)


def _pool_matrix(nbr: np.ndarray) -> sp.csr_matrix:
    """The row-stochastic "mean of the cell and its neighbours" matrix (``nbr``: cells x k, -1 = none)."""
    n, k = nbr.shape
    valid = nbr >= 0
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), k)[valid.ravel()]])
    cols = np.concatenate([np.arange(n), nbr.ravel()[valid.ravel()]])
    m = 1.0 + valid.sum(axis=1)
    return sp.csr_matrix((1.0 / m[rows], (rows, cols)), shape=(n, n))


def pool_weights_norm(nbr: np.ndarray | None, n: int, rounds: int | None = None, block: int = 16_384) -> np.ndarray:
    """Per cell, ``sqrt(sum_j w_ij^2)`` of the pooling weights (the rows of ``P^rounds``, ``P``
    the row-stochastic "self and neighbours" matrix): the standard deviation of a pooled score
    when the raw scores are independent with unit variance, so ``pooled / norm`` is a z-score."""
    rounds = POOL_ROUNDS if rounds is None else rounds
    if nbr is None or rounds <= 0 or n == 0:
        return np.ones(n)
    P = _pool_matrix(nbr)
    out = np.empty(n)
    for a in range(0, n, block):
        W = P[a:min(a + block, n)]
        for _ in range(rounds - 1):
            W = W @ P
        out[a:a + W.shape[0]] = np.sqrt(np.asarray(W.multiply(W).sum(axis=1)).ravel())
    return out


def pool(scores: np.ndarray, nbr: np.ndarray | None, rounds: int | None = None) -> np.ndarray:
    """Mean of each cell's scores with its neighbours' (``nbr``: cells x k, -1 = none), ``rounds``
    (default :data:`POOL_ROUNDS`) times, as sparse products: each row sums its own entries in a
    fixed order, so the result does not depend on chunking or workers."""
    rounds = POOL_ROUNDS if rounds is None else rounds
    if nbr is None or rounds <= 0 or scores.shape[0] == 0:
        return scores
    P = _pool_matrix(nbr).astype(scores.dtype)
    s = np.ascontiguousarray(scores)
    for _ in range(rounds):
        s = P @ s
    return s


def _softmax_pick(scores: np.ndarray, groups: np.ndarray | None = None):
    """Per row: the best column (ties to the lower index) and its softmax share."""
    best = np.argmax(scores, axis=1)
    mx = scores[np.arange(len(scores)), best]
    e = np.exp((scores - mx[:, None]) / TEMPERATURE)
    e[~np.isfinite(scores)] = 0.0
    return best, 1.0 / e.sum(axis=1)


def _group_max(scores: np.ndarray, of: np.ndarray, n: int) -> np.ndarray:
    out = np.full((scores.shape[0], n), -np.inf)
    for g in range(n):
        cols = np.flatnonzero(of == g)
        if cols.size:
            out[:, g] = scores[:, cols].max(axis=1)
    return out


def walk(scores: np.ndarray, model: MarkerModel) -> np.ndarray:
    """Top-down calls (``CALL_DTYPE``) from pooled type scores (cells x types)."""
    h = model.hierarchy
    n = scores.shape[0]
    code = np.zeros(n, np.int32)
    depth = np.full(n, DEPTH_BROAD, np.int8)
    prob = np.zeros(n, np.float64)
    if n == 0:
        return calls_from(code, prob=prob, depth=depth)
    bscore = _group_max(scores, h.broad_of, h.n_broad)
    b, pb = _softmax_pick(bscore)
    pc = np.zeros(n)
    pf = np.zeros(n)
    for bi in np.unique(b):
        rows = np.flatnonzero(b == bi)
        cgroups = np.flatnonzero(h.coarse_parent == bi)
        cs = _group_max(scores[rows], h.coarse_of, h.n_coarse)[:, cgroups]
        ci, pci = _softmax_pick(cs)
        pc[rows] = pci
        chosen = cgroups[ci]
        for cg in np.unique(chosen):
            r2 = rows[chosen == cg]
            types = np.flatnonzero(h.coarse_of == cg)
            ti, pti = _softmax_pick(scores[np.ix_(r2, types)])
            code[r2] = types[ti]
            pf[r2] = pti
    coarse_ok = pc > CONFIDENT_P
    fine_ok = coarse_ok & (pf > CONFIDENT_P)
    depth[coarse_ok] = DEPTH_COARSE
    depth[fine_ok] = DEPTH_FINE
    prob = np.where(fine_ok, pf, np.where(coarse_ok, pc, pb))
    unassigned = scores.max(axis=1) < UNASSIGNED_Z
    depth[unassigned] = DEPTH_NONE
    prob[unassigned] = 0.0
    return calls_from(code, prob=prob.astype(np.float32), depth=depth)


def annotate_scores(raw_scores: np.ndarray, graph: dict | None, model: MarkerModel, plan: GenePlan) -> tuple[np.ndarray, dict]:
    """Pool the raw type scores over the query graph (when there is one), as z-scores; types
    the query cannot judge (too few of their markers measured) are left out; walk the hierarchy."""
    nbr = graph.get("nbr") if graph else None
    pooled = pool(raw_scores, nbr)
    pooled /= pool_weights_norm(nbr, raw_scores.shape[0]).astype(pooled.dtype)[:, None]
    pooled[:, ~plan.scorable] = -np.inf
    calls = walk(pooled, model)
    rec = {**parameters(), "pooled": nbr is not None and POOL_ROUNDS > 0, "graph": (graph or {}).get("how")}
    return calls, rec


# ----------------------------------------------------------------------------- dot-plot data


def block_marker_stats(path: str, start: int, stop: int, n_features: int, cols: np.ndarray, umi: np.ndarray,
                       codes: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (assigned type, shared marker gene) over cells ``start:stop``: cells expressing
    (integer) and the sum of log1p(counts per 10k)."""
    x = store.read_block(path, start, stop, n_features)[:, cols].tocsr().astype(np.float64)
    scale = 1e4 / np.maximum(np.asarray(umi, np.float64), 1.0)
    logn = sp.diags(scale) @ x
    logn.data = np.log1p(logn.data)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_types, len(codes)))
    expr = (onehot @ (x > 0).astype(np.int64)).toarray().astype(np.int64)
    return expr, (onehot @ logn).toarray()


def dot_plot_table(model: MarkerModel, plan: GenePlan, calls: np.ndarray, stats: list, *, max_genes: int = 8) -> list[dict]:
    """Per assigned type (cells called at least to it): its positive markers' fraction of
    cells expressing and mean log1p(CP10k), the ``max_genes`` most expressed markers first."""
    expr = np.sum(np.stack([s[0] for s in stats]), axis=0) if stats else np.zeros((len(model.labels), plan.query_cols.size), np.int64)
    total = np.sum(np.stack([s[1] for s in stats]), axis=0) if stats else np.zeros(expr.shape)
    assigned = calls["depth"] > DEPTH_NONE
    n_cells = np.bincount(calls["code"][assigned], minlength=len(model.labels))
    qcol = {int(mg): i for i, mg in enumerate(plan.model_genes)}
    out = []
    for t in np.flatnonzero(n_cells):
        genes = [int(g) for g, s, ty in zip(model.gene_idx, model.sign, model.type_idx) if ty == t and s > 0 and int(g) in qcol]
        rows = [{"gene": str(model.genes[g]), "fraction_expressing": float(expr[t, qcol[g]] / n_cells[t]),
                 "mean_log_cp10k": float(total[t, qcol[g]] / n_cells[t])} for g in genes]
        rows.sort(key=lambda r: (-r["fraction_expressing"], r["gene"]))
        out.append({"cell_type": model.labels[t], "cells": int(n_cells[t]), "markers": rows[:max_genes]})
    return out


STATS_BLOCK_CELLS = 16_384  # fixed, so the float sums (and their digits) never depend on --chunk-cells


def lazy_marker_stats(st: store.StoreInfo, model: MarkerModel, plan: GenePlan, calls: np.ndarray) -> list:
    """Lazy per-block dot-plot sums over blocks of :data:`STATS_BLOCK_CELLS` cells (summed in
    block order by :func:`dot_plot_table`)."""
    umi = np.asarray(st.umi_count)
    codes = np.where(calls["depth"] > DEPTH_NONE, calls["code"], len(model.labels)).astype(np.int64)
    bounds = np.cumsum((0,) + store.cell_chunks(st.n_cells, STATS_BLOCK_CELLS))
    return [dask.delayed(_stats_drop_unassigned, pure=True)(st.path, a, b, st.n_features, plan.query_cols, umi[a:b], codes[a:b], len(model.labels))
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _stats_drop_unassigned(path, start, stop, n_features, cols, umi, codes, n_types):
    expr, total = block_marker_stats(path, start, stop, n_features, cols, umi, codes, n_types + 1)
    return expr[:n_types], total[:n_types]
