"""Sections of the web summary: a registry of (context function, Jinja2 template) pairs.

A section is one function that reads :class:`.data.SummaryData` and returns the
template's context (or ``None`` to leave the section out of this page), registered
with :func:`section`; its template is ``templates/sections/<id>.html.j2``. The page
(``templates/page.html.j2``) inlines ``static/summary.css`` and ``static/summary.js``,
so the file stays self-contained. Autoescaping is on: values are escaped unless they
are ``Markup`` (the SVG/PNG from :mod:`.plots` and :mod:`.tissue`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from markupsafe import Markup

from . import plots, tissue
from .data import (LOW_UMI, MARKER_MAX_ADJ_P, MARKER_MIN_MEAN, MARKERS_PER_TYPE, MAX_POINTS,
                   SummaryData, legend_items, top_markers)


@dataclass(frozen=True)
class Section:
    """One registered section: ``build(d)`` gives the template context, or None to skip it."""

    id: str
    title: str
    nav: str
    build: Callable[[SummaryData], dict | None]

    @property
    def template(self) -> str:
        return f"sections/{self.id}.html.j2"


SECTIONS: list[Section] = []


def section(sid: str, title: str, *, nav: str | None = None, after: str | None = None):
    """Register ``build`` as section ``sid`` (appended, or placed right after section ``after``)."""

    def deco(build: Callable[[SummaryData], dict | None]):
        s = Section(sid, title, nav or title, build)
        if any(x.id == sid for x in SECTIONS):
            raise ValueError(f"summary section '{sid}' is registered twice")
        pos = len(SECTIONS) if after is None else [x.id for x in SECTIONS].index(after) + 1
        SECTIONS.insert(pos, s)
        return build

    return deco


@lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment over the package's templates (autoescape, strict undefined)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("dask_annot.summary", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(int=plots.fmt_int, pct=plots.fmt_pct, p=plots.fmt_p, kv=kv_table)
    return env


def static(name: str) -> Markup:
    """A CSS/JS file of the package, to inline."""
    return Markup(resources.files("dask_annot.summary").joinpath("static", name).read_text(encoding="utf-8"))


def render_page(d: SummaryData) -> str:
    """The whole page: every registered section whose build does not return None, in order."""
    env = environment()
    shown = []
    for s in SECTIONS:
        ctx = s.build(d)
        if ctx is None:
            continue
        body = env.get_template(s.template).render(d=d, **ctx)
        shown.append((s, Markup(body)))
    return env.get_template("page.html.j2").render(
        d=d, record=d.record, sections=shown, css=static("summary.css"), js=static("summary.js"),
        title=f"dask-annot · {d.record.get('run_id', '')} · {d.model_name}",
    )


def kv_table(values: dict) -> Markup:
    """A two-column key/value table (floats short, lists joined, dicts as JSON)."""
    rows = []
    for k, v in (values or {}).items():
        if isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        rows.append(f"<tr><th>{plots.esc(k)}</th><td>{plots.esc('–' if v is None else v)}</td></tr>")
    return Markup(f'<table class="kv">{"".join(rows)}</table>')


def _bar_rows(names: list[str], counts: np.ndarray, total: int, colour: dict[str, str],
              extra: list[str] | None = None) -> list[dict]:
    top = float(counts.max()) if len(counts) else 1.0
    return [{"name": n, "count": int(c), "frac": c / total, "width": 100 * c / top, "colour": colour[n],
             "extra": extra[i] if extra is not None else None} for i, (n, c) in enumerate(zip(names, counts))]


# ----------------------------------------------------------------------------- the sections


@section("overview", "Overview")
def overview(d: SummaryData) -> dict:
    ov = d.record.get("gene_overlap", {}) or {}
    thr = d.params.get("low_umi_threshold", 100)
    low = int(np.count_nonzero(d.umi < thr))
    kr = f"{d.params.get('k_requested', '')} requested" if d.params.get("k_used") != d.params.get("k_requested") else ""
    cards = [
        ("Cells", plots.fmt_int(d.n), ""),
        ("Coarse types", plots.fmt_int(len([c for c in d.coarse_names if c != LOW_UMI])), f"{plots.fmt_int(len(d.fine_names))} fine"),
        ("Median UMIs per cell", plots.fmt_int(float(np.median(d.umi))) if d.n else "–", ""),
        ("Low-UMI barcodes", plots.fmt_pct(low / d.n) if d.n else "–", f"{plots.fmt_int(low)} cells with fewer than {thr} UMIs"),
        ("Reference genes found", plots.fmt_pct(ov.get("shared_fraction", 0.0)) if ov else "–",
         f"{plots.fmt_int(ov.get('shared_genes', 0))} of {plots.fmt_int(ov.get('reference_genes', 0))}, by "
         f"{str(ov.get('matched_by', '?')).replace('_', ' ')}" if ov else ""),
        ("Neighbours per cell", str(d.params.get("k_used", "–")), kr),
        ("Run time", f"{d.record.get('timings_s', {}).get('total', 0):.1f} s" if d.record.get("timings_s") else "–", ""),
    ]
    legend = [(n, d.coarse_colour[n], c / d.n) for n, c in zip(d.coarse_names, d.coarse_counts)] if d.n else []
    return {"cards": cards, "strip": plots.composition_strip(d), "legend": legend,
            "input_name": Path(str(d.record.get("input", {}).get("path", ""))).name}


@section("composition", "Cell type composition", nav="Composition")
def composition(d: SummaryData) -> dict:
    shown = min(len(d.fine_names), 300)
    return {
        "coarse": _bar_rows(d.coarse_names, d.coarse_counts, max(d.n, 1), d.coarse_colour),
        "fine": _bar_rows(d.fine_names[:shown], d.fine_counts[:shown], max(d.n, 1), d.fine_colour, d.fine_parent[:shown]),
        "fine_hidden": len(d.fine_names) - shown,
    }


@section("embedding", "Cells in the reference PCA space", nav="Embedding")
def embedding(d: SummaryData) -> dict:
    if d.emb is None:
        return {"plots": None}
    finite = np.flatnonzero(np.isfinite(d.emb).all(axis=1))
    if finite.size > MAX_POINTS:
        idx = finite[np.sort(np.random.default_rng(0).choice(finite.size, MAX_POINTS, replace=False))]
    else:
        idx = finite
    xy = d.emb[idx]
    plots_ = [
        ("Coarse", plots.scatter(xy, d.coarse_codes[idx], d.coarse_names, d.coarse_colour),
         legend_items(d.coarse_names, d.coarse_counts, d.coarse_colour)),
        ("Fine", plots.scatter(xy, d.fine_codes[idx], d.fine_names, d.fine_colour),
         legend_items(d.fine_names, d.fine_counts, d.fine_colour)),
    ]
    shown = (f"all {plots.fmt_int(idx.size)} cells" if idx.size == d.n
             else f"{plots.fmt_int(idx.size)} of {plots.fmt_int(d.n)} cells (a fixed random subsample)")
    return {"plots": plots_, "shown": shown}


@section("tissue", "Cell types on the tissue", nav="Tissue", after="overview")
def tissue_map(d: SummaryData) -> dict | None:
    if d.spatial is None:
        return None
    return tissue.context(d)


@section("confidence", "Vote support per cell type", nav="Vote support")
def confidence(d: SummaryData) -> dict:
    svg, n_rows = plots.confidence(d)
    cons = d.params.get("consensus") or {}
    return {"svg": svg, "n_rows": n_rows, "vote": str(d.params.get("vote", "")),
            "consensus": cons if isinstance(cons, dict) and cons.get("applied") else None}


@section("markers", "Top marker genes", nav="Markers")
def markers(d: SummaryData) -> dict:
    if d.de is None:
        reason = (d.record.get("differential_expression") or {}).get("reason", "no DE table was passed")
        return {"cards": None, "reason": str(reason)}
    cards = []
    for g, table in top_markers(d.de).items():
        n_cells = int(d.coarse_counts[d.coarse_names.index(g)]) if g in d.coarse_names else 0
        rows = list(zip(table["gene"], table["feature_id"], table["log2fc"], table["adj_p"], table["mean_counts"]))
        cards.append({"group": g, "colour": d.coarse_colour.get(g, "#888"), "n_cells": n_cells, "rows": rows})
    return {"cards": cards, "reason": "", "n": MARKERS_PER_TYPE, "max_p": MARKER_MAX_ADJ_P, "min_mean": MARKER_MIN_MEAN}


@section("quality", "Genes and UMIs", nav="Genes & UMIs")
def quality(d: SummaryData) -> dict:
    ov = d.record.get("gene_overlap", {}) or {}
    thr = float(d.params.get("low_umi_threshold", 100))
    by = d.ref.get("gene_overlap_by_model") or {}
    return {"ov": ov, "thr": thr, "low": int(np.count_nonzero(d.umi < thr)), "hist": plots.umi_hist(d.umi, thr),
            "by_model": sorted(by.items(), key=lambda kv: -float(kv[1]))}


@section("run", "Run")
def run(d: SummaryData) -> dict:
    r = d.record
    timings = {k: float(v) for k, v in (r.get("timings_s") or {}).items()}
    total = timings.pop("total", sum(timings.values()))
    tmax = max(max(timings.values()) if timings else 1.0, 1e-9)
    inp = r.get("input", {}) or {}
    blocks = [
        ("Parameters", r.get("parameters", {})),
        ("Input", {k: inp.get(k) for k in ("path", "layout", "size", "sha256", "store", "store_reused", "visium") if k in inp}),
        ("Reference", {k: d.ref.get(k) for k in ("name", "version", "species", "cells", "genes", "pcs", "path", "requested",
                                                 "reference_json_sha256") if k in d.ref}),
        ("Differential expression", r.get("differential_expression", {})),
        ("Versions", r.get("versions", {})),
    ]
    return {"timings": [(k, v, 100 * v / tmax) for k, v in timings.items()], "total": total, "blocks": blocks}

