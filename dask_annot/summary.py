"""The web summary: one self-contained ``web_summary.html`` per model directory.

What 10x's web summary gives, for a dask-annot run: the cell type composition
(coarse and fine), how the neighbour vote supported each label, the query cells
in the reference PCA space, marker genes from the DE table, the gene overlap with
the reference, the low-UMI fraction and the run's parameters and timings.

The page is built here as one string: plots are inline SVG drawn in Python, a few
lines of inline JavaScript switch tabs and highlight a type, and nothing is
fetched, so it opens from a file on a machine without network. Its size does not
grow with the cell count beyond a bound: the scatter draws at most
:data:`MAX_POINTS` cells (a fixed, seeded subsample) and every distribution is binned.

Rebuild the page of a finished run with ``dask-annot summary MODEL_DIR``.
"""
from __future__ import annotations

import html
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

MAX_POINTS = 20_000
MAX_FINE_ROWS = 60  # fine types drawn one by one (confidence rows, legend); the rest are summed up
MARKERS_PER_TYPE = 10
MARKER_MAX_ADJ_P = 0.10
MARKER_MIN_MEAN = 1.0  # counts per cell (at the median depth) in the type, for a gene to rank first
LOW_UMI = "Low UMI Barcode"
FILENAME = "web_summary.html"

# Distinct, colour-blind-aware hues, in the order types are ranked by size.
_PALETTE = (
    "#3b6fb6", "#e0882b", "#3f9e57", "#c9423f", "#8a63b8", "#8c5a45", "#d36aa8", "#6f7780",
    "#a9a834", "#2fa7b8", "#90b5e0", "#f2b877", "#93cf8f", "#ef9a97", "#c3acdb", "#c49d8c",
    "#f1b4d3", "#bdbdbd", "#d7d88a", "#98d5de",
)
_LOW_UMI_COLOUR = "#b8b8b8"
_OTHER_COLOUR = "#d0d0d0"


# ----------------------------------------------------------------------------- public


def write_web_summary(path: str | os.PathLike, *, record: dict, cell_types: Any, embedding2d: np.ndarray | None = None,
                      de: Any = None) -> None:
    """Write the run's ``web_summary.html`` (whole or not at all).

    Parameters
    ----------
    path
        The file to write, normally ``<model_dir>/web_summary.html``.
    record
        The run record (the content of ``run.json``).
    cell_types
        ``cell_types.csv`` as a ``pandas.DataFrame`` (either layout), rows in matrix order.
    embedding2d
        The first two reference PCs of each query cell (n x 2, matrix order), or ``None``:
        the page then says the embedding was not passed.
    de
        The DE table in Cell Ranger's layout (``Feature ID, Feature Name, <type> Mean Counts,
        <type> Log2 fold change, <type> Adjusted p value, ...``), or ``None``.
    """
    from .outputs import atomic_write

    atomic_write(Path(path), render_web_summary(record=record, cell_types=cell_types, embedding2d=embedding2d, de=de))


def render_web_summary(*, record: dict, cell_types: Any, embedding2d: np.ndarray | None = None, de: Any = None) -> str:
    """The page as one HTML string; pure, and the same for the same inputs."""
    data = _Data.from_inputs(record, cell_types, embedding2d)
    sections = [
        _section_overview(data),
        _section_composition(data),
        _section_embedding(data),
        _section_confidence(data),
        _section_markers(data, de),
        _section_quality(data),
        _section_run(data),
    ]
    title = f"dask-annot · {record.get('run_id', '')} · {data.model_name}"
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name in _NAV)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><div class="wrap"><div class="brand">dask-annot <span>web summary</span></div>'
        f'<h1>{_e(record.get("run_id", ""))} <small>· {_e(data.model_name)} v{_e(str(data.ref.get("version", "?")))}</small></h1>'
        f"<nav>{nav}</nav></div></header>"
        f'<main class="wrap">{"".join(sections)}</main>'
        f'<footer class="wrap">Written by dask-annot {_e(str(record.get("versions", {}).get("dask-annot", "")))}. '
        "Self-contained: this page loads nothing from the network.</footer>"
        f"<script>{_JS}</script></body></html>\n"
    )


def top_markers(de: Any, *, n: int = MARKERS_PER_TYPE, max_adj_p: float = MARKER_MAX_ADJ_P,
                min_mean: float = MARKER_MIN_MEAN) -> dict[str, Any]:
    """Per DE group, up to ``n`` marker genes: log2 fold change > 0 and adjusted p < ``max_adj_p``.

    Ranked by log2 fold change (largest first; ties: adjusted p, then name) among the
    genes with a ``Mean Counts`` of at least ``min_mean`` in the group (counts per cell at
    the median cell's depth), so that rarely detected genes, whose fold changes are large
    but carry little, do not crowd out the markers; when fewer than ``n`` genes are that
    expressed, the list is filled up with the others in the same order.
    Returns ``{group: DataFrame[gene, feature_id, log2fc, adj_p, mean_counts]}`` in the table's group order.
    """
    import pandas as pd

    out: dict[str, pd.DataFrame] = {}
    if de is None:
        return out
    suffix = " Log2 fold change"
    groups = [c[: -len(suffix)] for c in de.columns if c.endswith(suffix)]
    names = de["Feature Name"].astype(str).to_numpy() if "Feature Name" in de.columns else de.index.astype(str).to_numpy()
    ids = de["Feature ID"].astype(str).to_numpy() if "Feature ID" in de.columns else names
    for g in groups:
        l2 = pd.to_numeric(de[f"{g}{suffix}"], errors="coerce").to_numpy(dtype=np.float64)
        padj = pd.to_numeric(de[f"{g} Adjusted p value"], errors="coerce").to_numpy(dtype=np.float64)
        mean = (pd.to_numeric(de[f"{g} Mean Counts"], errors="coerce").to_numpy(dtype=np.float64)
                if f"{g} Mean Counts" in de.columns else np.full(l2.shape, np.inf))
        ok = np.flatnonzero(np.isfinite(l2) & (l2 > 0) & np.isfinite(padj) & (padj < max_adj_p))
        weak = ~(mean[ok] >= min_mean)
        order = ok[np.lexsort((names[ok], padj[ok], -l2[ok], weak))][:n]
        out[g] = pd.DataFrame({"gene": names[order], "feature_id": ids[order], "log2fc": l2[order],
                               "adj_p": padj[order], "mean_counts": mean[order]})
    return out


def read_cell_types(path: str | os.PathLike):
    """``cell_types.csv`` as written (labels as text, ``NA`` kept as a label), in file order."""
    import pandas as pd

    return pd.read_csv(path, dtype={"barcode": str}, keep_default_na=False, na_values=[])


# ----------------------------------------------------------------------------- data


class _Data:
    """Everything the sections draw, computed once with vectorised NumPy."""

    def __init__(self) -> None:
        self.n = 0

    @classmethod
    def from_inputs(cls, record: dict, ct: Any, embedding2d: np.ndarray | None) -> "_Data":
        import pandas as pd

        d = cls()
        d.record = record
        d.ref = record.get("reference", {}) or {}
        d.params = record.get("parameters", {}) or {}
        d.model_name = str(d.ref.get("name", "model"))
        cols = set(ct.columns)
        for need in ("coarse_cell_type", "fine_cell_type", "umi_count"):
            if need not in cols:
                raise ValueError(f"cell_types has no column '{need}' (columns: {', '.join(map(str, ct.columns))}); pass cell_types.csv as read by pandas")
        d.n = int(len(ct))
        d.layout = "hierarchical" if "final_level_softmax_prob" in cols else "cloud"
        d.coarse = ct["coarse_cell_type"].astype(str).to_numpy()
        d.fine = ct["fine_cell_type"].astype(str).to_numpy()
        d.coarse_unf = ct["coarse_cell_type_unfiltered"].astype(str).to_numpy() if "coarse_cell_type_unfiltered" in cols else d.coarse
        d.umi = pd.to_numeric(ct["umi_count"], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
        if d.layout == "cloud":
            d.conf = pd.to_numeric(ct["cell_count_in_model"], errors="coerce").to_numpy(dtype=np.float64)
            k = d.params.get("k_used") or (int(np.nanmax(d.conf)) if d.n and np.isfinite(d.conf).any() else 1)
            d.conf_max = float(max(1, int(k)))
            d.conf_name = "cell_count_in_model"
        else:
            d.conf = pd.to_numeric(ct["final_level_softmax_prob"], errors="coerce").to_numpy(dtype=np.float64)
            d.conf_max = 1.0
            d.conf_name = "final_level_softmax_prob"
        # types ranked by size (ties by name), so colours and rows are stable
        d.coarse_names, d.coarse_codes, d.coarse_counts = _ranked(d.coarse)
        d.fine_names, d.fine_codes, d.fine_counts = _ranked(d.fine)
        d.coarse_colour = _colours(d.coarse_names)
        d.fine_colour = _colours(d.fine_names)
        # the coarse type (unfiltered) most fine cells of each fine type belong to
        cu_names, cu_codes, _ = _ranked(d.coarse_unf)
        nf, nc = len(d.fine_names), len(cu_names)
        pair = np.bincount(d.fine_codes * max(nc, 1) + cu_codes, minlength=nf * max(nc, 1)).reshape(nf, max(nc, 1)) if d.n else np.zeros((0, 1), int)
        d.fine_parent = [cu_names[int(pair[i].argmax())] if nc else "" for i in range(nf)]
        d.emb = None
        if embedding2d is not None:
            emb = np.asarray(embedding2d, dtype=np.float64)
            if emb.ndim != 2 or emb.shape[0] != d.n or emb.shape[1] < 2:
                raise ValueError(f"embedding2d has shape {emb.shape}; expected ({d.n}, 2): the first two reference PCs of each cell, in matrix order")
            d.emb = emb[:, :2]
        return d


def _ranked(values: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique values by count (desc, then name) with each row's rank code and the counts."""
    names, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    order = np.lexsort((names, -counts))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return [str(x) for x in names[order]], rank[inverse.ravel()].astype(np.int64), counts[order]


def _colours(names: list[str]) -> dict[str, str]:
    out, i = {}, 0
    for name in names:
        if name == LOW_UMI:
            out[name] = _LOW_UMI_COLOUR
            continue
        if i < len(_PALETTE):
            out[name] = _PALETTE[i]
        else:  # golden-angle hues beyond the palette
            h = (i * 137.508) % 360
            out[name] = f"hsl({h:.0f},55%,{52 + 8 * (i % 3)}%)"
        i += 1
    return out


# ----------------------------------------------------------------------------- sections

_NAV = (("overview", "Overview"), ("composition", "Composition"), ("embedding", "Embedding"),
        ("confidence", "Vote support"), ("markers", "Markers"), ("quality", "Genes & UMIs"), ("run", "Run"))


def _section(sid: str, title: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{lead_html}{body}</section>'


def _section_overview(d: _Data) -> str:
    ov = d.record.get("gene_overlap", {}) or {}
    low = int(np.count_nonzero(d.umi < d.params.get("low_umi_threshold", 100)))
    cards = [
        ("Cells", _int(d.n), ""),
        ("Coarse types", _int(len([c for c in d.coarse_names if c != LOW_UMI])), f"{_int(len(d.fine_names))} fine"),
        ("Median UMIs per cell", _int(float(np.median(d.umi))) if d.n else "–", ""),
        ("Low-UMI barcodes", _pct(low / d.n) if d.n else "–", f"{_int(low)} cells with fewer than {d.params.get('low_umi_threshold', 100)} UMIs"),
        ("Reference genes found", _pct(ov.get("shared_fraction", 0.0)) if ov else "–",
         f"{_int(ov.get('shared_genes', 0))} of {_int(ov.get('reference_genes', 0))}, by {str(ov.get('matched_by', '?')).replace('_', ' ')}" if ov else ""),
        ("Neighbours per cell", str(d.params.get("k_used", "–")), f"{d.params.get('k_requested', '')} requested" if d.params.get("k_used") != d.params.get("k_requested") else ""),
        ("Run time", f"{d.record.get('timings_s', {}).get('total', 0):.1f} s" if d.record.get("timings_s") else "–", ""),
    ]
    html_cards = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="s">{_e(s)}</div></div>'
        for k, v, s in cards
    )
    ref = d.ref
    text = (f"{_int(d.n)} cells of <code>{_e(Path(str(d.record.get('input', {}).get('path', ''))).name)}</code> annotated against "
            f"<b>{_e(d.model_name)}</b> ({_e(str(ref.get('species', '')))}, {_int(ref.get('cells', 0))} reference cells, "
            f"{_int(ref.get('genes', 0))} genes, {ref.get('pcs', '?')} PCs).")
    return _section("overview", "Overview", f'<div class="cards">{html_cards}</div>{_composition_strip(d)}', text)


def _composition_strip(d: _Data) -> str:
    """One 100% bar of the coarse composition, under the cards."""
    if not d.n:
        return ""
    w, x, parts = 1000.0, 0.0, []
    for name, c in zip(d.coarse_names, d.coarse_counts):
        width = w * c / d.n
        parts.append(f'<rect x="{x:.2f}" y="0" width="{width:.2f}" height="28" fill="{d.coarse_colour[name]}">'
                     f"<title>{_e(name)}: {_int(c)} cells ({_pct(c / d.n)})</title></rect>")
        x += width
    legend = "".join(f'<span class="sw"><i style="background:{d.coarse_colour[n]}"></i>{_e(n)} {_pct(c / d.n)}</span>'
                     for n, c in zip(d.coarse_names, d.coarse_counts))
    return (f'<div class="strip"><svg viewBox="0 0 1000 28" preserveAspectRatio="none" width="100%" height="28" role="img" '
            f'aria-label="coarse composition">{"".join(parts)}</svg><div class="legend-inline">{legend}</div></div>')


def _bar_rows(names: list[str], counts: np.ndarray, total: int, colour: dict[str, str], *, extra: list[str] | None = None,
              extra_head: str = "") -> str:
    """A table of types with a proportional bar per row (HTML, so long names wrap)."""
    top = float(counts.max()) if len(counts) else 1.0
    head = f"<th>{_e(extra_head)}</th>" if extra is not None else ""
    rows = []
    for i, (name, c) in enumerate(zip(names, counts)):
        ex = f'<td class="muted">{_e(extra[i])}</td>' if extra is not None else ""
        rows.append(
            f'<tr data-key="{_e(name)}"><td><i class="dot" style="background:{colour[name]}"></i>{_e(name)}</td>{ex}'
            f'<td class="num">{_int(c)}</td><td class="num">{_pct(c / total)}</td>'
            f'<td class="barcell"><div class="bar" style="width:{100 * c / top:.1f}%;background:{colour[name]}"></div></td></tr>'
        )
    return (f'<table class="types"><thead><tr><th>type</th>{head}<th class="num">cells</th><th class="num">fraction</th>'
            f'<th class="barcell"></th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _section_composition(d: _Data) -> str:
    coarse = _bar_rows(d.coarse_names, d.coarse_counts, max(d.n, 1), d.coarse_colour)
    shown = min(len(d.fine_names), 300)
    fine = _bar_rows(d.fine_names[:shown], d.fine_counts[:shown], max(d.n, 1), d.fine_colour,
                     extra=d.fine_parent[:shown], extra_head="coarse type (before the low-UMI rule)")
    if shown < len(d.fine_names):
        fine += f'<p class="note">The {len(d.fine_names) - shown} smallest fine types are not listed; all are in cell_types.csv.</p>'
    body = _tabs("comp", [("Coarse", coarse), ("Fine", fine)])
    lead = ("Cells per type. <code>coarse_cell_type</code> is the fine label's nearest display node in the reference's "
            "hierarchy; cells with fewer than 100 UMIs are set to <i>Low UMI Barcode</i> there (their fine type is kept).")
    return _section("composition", "Cell type composition", body, lead)


def _section_embedding(d: _Data) -> str:
    if d.emb is None:
        body = ('<p class="note">The embedding was not passed to this summary. Rebuild it with '
                "<code>python -m dask_annot.summary MODEL_DIR</code> to draw the cells in the reference PCA space.</p>")
        return _section("embedding", "Cells in the reference PCA space", body)
    finite = np.flatnonzero(np.isfinite(d.emb).all(axis=1))
    if finite.size > MAX_POINTS:
        pick = np.sort(np.random.default_rng(0).choice(finite.size, MAX_POINTS, replace=False))
        idx = finite[pick]
    else:
        idx = finite
    xy = d.emb[idx]
    plots = [
        ("Coarse", _scatter(xy, d.coarse_codes[idx], d.coarse_names, d.coarse_colour, d.coarse_counts)),
        ("Fine", _scatter(xy, d.fine_codes[idx], d.fine_names, d.fine_colour, d.fine_counts)),
    ]
    shown = (f"all {_int(idx.size)} cells" if idx.size == d.n
             else f"{_int(idx.size)} of {_int(d.n)} cells (a fixed random subsample)")
    lead = (f"Each query cell at its first two coordinates in the reference's PCA space (the space the neighbour "
            f"search uses), {shown}. Hover a type in the legend to pick it out.")
    return _section("embedding", "Cells in the reference PCA space", _tabs("emb", plots), lead)


def _scatter(xy: np.ndarray, codes: np.ndarray, names: list[str], colour: dict[str, str], counts: np.ndarray) -> str:
    size, pad = 560, 44
    inner = size - 2 * pad
    if xy.shape[0]:
        lo = np.percentile(xy, 0.5, axis=0)
        hi = np.percentile(xy, 99.5, axis=0)
    else:
        lo, hi = np.zeros(2), np.ones(2)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    lo, span = lo - 0.04 * span, span * 1.08
    px = np.clip(pad + (xy[:, 0] - lo[0]) / span[0] * inner, pad, pad + inner)
    py = np.clip(pad + inner - (xy[:, 1] - lo[1]) / span[1] * inner, pad, pad + inner)
    n_named = min(len(names), MAX_FINE_ROWS)
    group = np.minimum(codes, n_named)  # n_named = "other"
    paths = []
    # largest types first, so small ones stay visible on top
    for g in range(n_named + 1):
        sel = np.flatnonzero(group == g)
        if sel.size == 0:
            continue
        d = "".join(f"M{x:.1f} {y:.1f}h0" for x, y in zip(px[sel].tolist(), py[sel].tolist()))
        key = names[g] if g < n_named else "other"
        col = colour[names[g]] if g < n_named else _OTHER_COLOUR
        paths.append(f'<path data-key="{_e(key)}" stroke="{col}" d="{d}"/>')
    axes = (f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" class="frame"/>'
            f'<text x="{pad + inner / 2}" y="{size - 10}" class="axis" text-anchor="middle">reference PC1</text>'
            f'<text x="14" y="{pad + inner / 2}" class="axis" text-anchor="middle" transform="rotate(-90 14 {pad + inner / 2})">reference PC2</text>')
    legend = []
    for i, name in enumerate(names[:n_named]):
        legend.append(f'<li data-key="{_e(name)}"><i class="dot" style="background:{colour[name]}"></i>{_e(name)} '
                      f'<span class="muted">{_int(counts[i])}</span></li>')
    if len(names) > n_named:
        legend.append(f'<li data-key="other"><i class="dot" style="background:{_OTHER_COLOUR}"></i>'
                      f'{len(names) - n_named} smaller types <span class="muted">{_int(counts[n_named:].sum())}</span></li>')
    svg = (f'<svg class="scatter" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
           f'aria-label="query cells in the reference PCA space">{axes}<g class="pts">{"".join(paths)}</g></svg>')
    return f'<div class="scatterbox" data-hl>{svg}<ul class="legend">{"".join(legend)}</ul></div>'


def _section_confidence(d: _Data) -> str:
    vote = str(d.params.get("vote", ""))
    if d.layout == "cloud":
        k = int(d.conf_max)
        bins = np.arange(0, k + 2) - 0.5 if k <= 60 else np.linspace(0, k, 31)
        xlabel = f"neighbours carrying the fine label (of k = {k})"
        fmt = lambda v: f"{v:.3g}"  # noqa: E731
    else:
        bins = np.linspace(0, 1, 21)
        xlabel = "final_level_softmax_prob"
        fmt = lambda v: f"{v:.2f}"  # noqa: E731
    nb = bins.size - 1
    conf = d.conf
    ok = np.isfinite(conf)
    b = np.clip(np.searchsorted(bins, conf, side="right") - 1, 0, nb - 1)
    n_rows = min(len(d.fine_names), MAX_FINE_ROWS)
    hist = np.bincount(d.fine_codes[ok] * nb + b[ok], minlength=len(d.fine_names) * nb).reshape(len(d.fine_names), nb)
    overall = hist.sum(axis=0)
    # quartiles per fine type, from a sort by (type, value)
    order = np.lexsort((conf[ok], d.fine_codes[ok]))
    sorted_vals, sorted_codes = conf[ok][order], d.fine_codes[ok][order]
    starts = np.searchsorted(sorted_codes, np.arange(len(d.fine_names)))
    ends = np.searchsorted(sorted_codes, np.arange(len(d.fine_names)), side="right")

    def quart(i: int) -> tuple[float, float, float]:
        v = sorted_vals[starts[i]:ends[i]]
        return tuple(np.percentile(v, [25, 50, 75])) if v.size else (math.nan,) * 3  # type: ignore[return-value]

    rows = [("all cells", overall, tuple(np.percentile(conf[ok], [25, 50, 75])) if ok.any() else (math.nan,) * 3, "#555", int(ok.sum()))]
    for i in range(n_rows):
        name = d.fine_names[i]
        rows.append((name, hist[i], quart(i), d.coarse_colour.get(d.fine_parent[i], d.fine_colour[name]), int(d.fine_counts[i])))
    label_w, plot_w, row_h = 300, 420, 30
    height = 26 + row_h * len(rows) + 30
    parts = []
    for r, (name, h, (q1, q2, q3), col, cnt) in enumerate(rows):
        y0 = 20 + r * row_h
        top = max(1, int(h.max()))
        bw = plot_w / nb
        bars = "".join(
            f'<rect x="{label_w + j * bw:.1f}" y="{y0 + row_h - 4 - (row_h - 8) * v / top:.1f}" width="{max(bw - 0.6, 0.6):.1f}" '
            f'height="{(row_h - 8) * v / top:.1f}" fill="{col}"/>'
            for j, v in enumerate(h.tolist()) if v
        )
        med = ""
        if np.isfinite(q2):
            xm = label_w + plot_w * (q2 - bins[0]) / (bins[-1] - bins[0])
            x1 = label_w + plot_w * (q1 - bins[0]) / (bins[-1] - bins[0])
            x3 = label_w + plot_w * (q3 - bins[0]) / (bins[-1] - bins[0])
            med = (f'<line x1="{x1:.1f}" x2="{x3:.1f}" y1="{y0 + row_h - 2}" y2="{y0 + row_h - 2}" class="iqr"/>'
                   f'<line x1="{xm:.1f}" x2="{xm:.1f}" y1="{y0 + 3}" y2="{y0 + row_h - 1}" class="med"/>')
        label = name if len(name) <= 44 else name[:42] + "…"
        stats = f"median {fmt(q2)}, IQR {fmt(q1)}–{fmt(q3)}" if np.isfinite(q2) else "no value"
        parts.append(
            f'<g><title>{_e(name)}: {_int(cnt)} cells; {stats}</title>'
            f'<text x="{label_w - 8}" y="{y0 + row_h / 2 + 4}" text-anchor="end" class="lab{" b" if r == 0 else ""}">{_e(label)}</text>'
            f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{y0 + row_h - 4}" y2="{y0 + row_h - 4}" class="base"/>'
            f"{bars}{med}"
            f'<text x="{label_w + plot_w + 8}" y="{y0 + row_h / 2 + 4}" class="stat">{_e(stats)}</text></g>'
        )
    y_axis = 20 + row_h * len(rows) + 4
    ticks = []
    tick_values = np.unique(np.round(np.linspace(0, d.conf_max, 6))) if d.layout == "cloud" else np.linspace(0, 1, 6)
    for t in tick_values:
        x = label_w + plot_w * (t - bins[0]) / (bins[-1] - bins[0])
        ticks.append(f'<text x="{x:.1f}" y="{y_axis + 10}" text-anchor="middle" class="tick">{fmt(t)}</text>')
    ticks.append(f'<text x="{label_w + plot_w / 2}" y="{y_axis + 26}" text-anchor="middle" class="axis">{_e(xlabel)}</text>')
    svg = (f'<svg class="conf" viewBox="0 0 {label_w + plot_w + 240} {height}" width="100%" role="img" '
           f'aria-label="vote support per fine type">{"".join(parts)}{"".join(ticks)}</svg>')
    more = (f'<p class="note">Showing the {n_rows} largest of {len(d.fine_names)} fine types.</p>'
            if n_rows < len(d.fine_names) else "")
    if d.layout == "cloud":
        read = (
            "<p><b>How to read this.</b> <code>cell_count_in_model</code> is how many of the cell's k nearest reference "
            "cells carry its fine label. It measures <i>support for the fine label</i>, not the probability that the "
            "cell type is right, and 10x states that it should not be treated as a confidence metric and that no "
            "threshold on it is a reliable cutoff: when the neighbours are split among closely related fine types "
            "(say, two CD4 T cell subsets) the count is low although every neighbour agrees on the coarse type. "
            "Use it to compare cells of one type with each other and to find types whose calls deserve a look at "
            "their marker genes below.</p>"
        )
        if "balanced" in vote:
            read += ("<p><b>This run used the small-reference rule</b> (" + _e(vote) + "): each label's votes were "
                     "divided by its share of the reference before the plurality was taken, so the winning label can "
                     "hold fewer of the k neighbours than another label. The count shown is still the raw number of "
                     "neighbours carrying the winning label.</p>")
    else:
        read = (
            "<p><b>How to read this.</b> <code>final_level_softmax_prob</code> is the distance-weighted share of the "
            "cell's nearest reference cells that carry its fine label (near neighbours weigh more). It is an estimate "
            "of support for the fine label, not a calibrated probability; a low value with a clear coarse type often "
            "means the neighbours are split among related fine types. No single threshold separates right from "
            "wrong calls.</p>"
        )
    cons = d.params.get("consensus") or {}
    if isinstance(cons, dict) and cons.get("applied"):
        read += ("<p><b>Labels were smoothed over the sample's own neighbours</b> (label spreading over its "
                 f"{_e(str(cons.get('graph_k', '')))}-nearest-neighbour graph; {_int(cons.get('cells_relabelled', 0))} cells "
                 "took a label other than their own vote's). The support shown is still that of the reference "
                 "neighbours for the final label"
                 + (" (its spread share for final_level_softmax_prob)" if d.layout != "cloud" else "")
                 + ", so a relabelled cell can have low or zero support.</p>")
    lead = f"Distribution of <code>{d.conf_name}</code> per fine type (bars: cells per bin; black tick: median; grey bar: interquartile range)."
    return _section("confidence", "Vote support per cell type", f'<div class="explain">{read}</div>{svg}{more}', lead)


def _section_markers(d: _Data, de: Any) -> str:
    if de is None:
        reason = (d.record.get("differential_expression") or {}).get("reason", "no DE table was passed")
        return _section("markers", "Top marker genes", f'<p class="note">No differential expression table: {_e(str(reason))}.</p>')
    markers = top_markers(de)
    cards = []
    for g, table in markers.items():
        col = d.coarse_colour.get(g, "#888")
        n_cells = int(d.coarse_counts[d.coarse_names.index(g)]) if g in d.coarse_names else 0
        if len(table) == 0:
            rows = '<tr><td colspan="4" class="muted">no gene with log2 fold change &gt; 0 and adjusted p &lt; 0.10</td></tr>'
        else:
            rows = "".join(
                f'<tr><td title="{_e(fid)}">{_e(gene)}</td><td class="num">{l2:.2f}</td><td class="num">{_p(p)}</td><td class="num">{m:.2f}</td></tr>'
                for gene, fid, l2, p, m in zip(table["gene"], table["feature_id"], table["log2fc"], table["adj_p"], table["mean_counts"])
            )
        cards.append(
            f'<div class="mcard"><h3><i class="dot" style="background:{col}"></i>{_e(g)} <span class="muted">{_int(n_cells)} cells</span></h3>'
            f'<table class="markers"><thead><tr><th>gene</th><th class="num">log2 FC</th><th class="num">adj. p</th><th class="num" title="mean counts per cell in the type, at the median cell&#39;s depth">mean</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>"
        )
    lead = (f"Per coarse type, up to {MARKERS_PER_TYPE} genes up in the type (log2 fold change &gt; 0, adjusted p &lt; "
            f"{MARKER_MAX_ADJ_P:.2f}) in <code>cell_annotation_differential_expression.csv</code> (sSeq, one type against "
            f"all others), by log2 fold change, genes with a mean of at least {MARKER_MIN_MEAN:g} count per cell in the type "
            "first. Expected markers here are the best check that a type's label is right.")
    return _section("markers", "Top marker genes", f'<div class="mgrid">{"".join(cards)}</div>', lead)


def _section_quality(d: _Data) -> str:
    ov = d.record.get("gene_overlap", {}) or {}
    thr = float(d.params.get("low_umi_threshold", 100))
    parts = []
    if ov:
        frac = float(ov.get("shared_fraction", 0.0))
        parts.append(
            f'<div class="panel"><h3>Gene overlap with the reference</h3>'
            f'<div class="meter"><div style="width:{100 * frac:.1f}%"></div></div>'
            f"<p>{_int(ov.get('shared_genes', 0))} of the reference's {_int(ov.get('reference_genes', 0))} genes are in the matrix "
            f"({_pct(frac)}, matched by {_e(str(ov.get('matched_by', '?')).replace('_', ' '))}); the matrix has "
            f"{_int(ov.get('query_genes', 0))} Gene Expression features. Reference genes the matrix lacks are treated as "
            "unmeasured (the projection is fitted on the measured ones).</p>"
            + _overlap_by_model(d) + "</div>"
        )
    low = int(np.count_nonzero(d.umi < thr))
    parts.append(
        f'<div class="panel"><h3>UMIs per cell</h3>{_umi_hist(d.umi, thr)}'
        f"<p>{_int(low)} of {_int(d.n)} barcodes ({_pct(low / max(d.n, 1))}) have fewer than {thr:.0f} UMIs and are labelled "
        f"<i>Low UMI Barcode</i> in <code>coarse_cell_type</code>.</p></div>"
    )
    return _section("quality", "Genes and UMIs", f'<div class="two">{"".join(parts)}</div>')


def _overlap_by_model(d: _Data) -> str:
    by = d.ref.get("gene_overlap_by_model")
    if not by:
        return ""
    rows = "".join(f"<tr><td>{_e(k)}{' (chosen)' if k == d.model_name else ''}</td><td class='num'>{_pct(float(v))}</td></tr>"
                   for k, v in sorted(by.items(), key=lambda kv: -float(kv[1])))
    return f'<table class="kv small"><thead><tr><th>built-in model (auto)</th><th class="num">genes found</th></tr></thead><tbody>{rows}</tbody></table>'


def _umi_hist(umi: np.ndarray, thr: float) -> str:
    w, h, pad = 520, 170, 30
    v = np.log10(np.maximum(umi, 1))
    top = max(float(v.max()) if v.size else 1.0, math.log10(thr) + 0.5)
    bins = np.linspace(0, top, 41)
    counts, _ = np.histogram(v, bins=bins)
    cmax = max(1, int(counts.max()))
    bw = (w - 2 * pad) / counts.size
    bars = "".join(
        f'<rect x="{pad + i * bw:.1f}" y="{h - pad - (h - 2 * pad) * c / cmax:.1f}" width="{bw - 0.8:.1f}" '
        f'height="{(h - 2 * pad) * c / cmax:.1f}" fill="{"#c9423f" if bins[i + 1] <= math.log10(thr) else "#3b6fb6"}"/>'
        for i, c in enumerate(counts.tolist()) if c
    )
    xt = pad + (w - 2 * pad) * math.log10(thr) / top
    ticks = "".join(
        f'<text x="{pad + (w - 2 * pad) * e / top:.1f}" y="{h - pad + 14}" text-anchor="middle" class="tick">{10 ** e:,}</text>'
        for e in range(0, int(top) + 1)
    )
    return (f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="UMIs per cell">{bars}'
            f'<line x1="{pad}" x2="{w - pad}" y1="{h - pad}" y2="{h - pad}" class="base"/>'
            f'<line x1="{xt:.1f}" x2="{xt:.1f}" y1="{pad - 10}" y2="{h - pad}" class="thr"/>'
            f'<text x="{xt + 4:.1f}" y="{pad - 2}" class="tick">{thr:.0f} UMIs</text>{ticks}'
            f'<text x="{w / 2}" y="{h - 2}" text-anchor="middle" class="axis">UMIs per cell (log scale)</text></svg>')


def _section_run(d: _Data) -> str:
    r = d.record
    timings = {k: float(v) for k, v in (r.get("timings_s") or {}).items()}
    total = timings.pop("total", sum(timings.values()))
    tmax = max(timings.values()) if timings else 1.0
    trows = "".join(
        f'<tr><td>{_e(k)}</td><td class="num">{v:.2f} s</td><td class="barcell"><div class="bar" style="width:{100 * v / max(tmax, 1e-9):.1f}%"></div></td></tr>'
        for k, v in timings.items()
    ) + f'<tr class="total"><td>total</td><td class="num">{total:.2f} s</td><td></td></tr>'
    inp = r.get("input", {}) or {}
    ref = d.ref
    blocks = [
        ("Timings", f'<table class="kv">{trows}</table>'),
        ("Parameters", _kv(r.get("parameters", {}))),
        ("Input", _kv({k: inp.get(k) for k in ("path", "layout", "size", "sha256", "store", "store_reused") if k in inp})),
        ("Reference", _kv({k: ref.get(k) for k in ("name", "version", "species", "cells", "genes", "pcs", "path", "requested", "reference_json_sha256") if k in ref})),
        ("Differential expression", _kv(r.get("differential_expression", {}))),
        ("Versions", _kv(r.get("versions", {}))),
    ]
    body = "".join(f'<div class="panel"><h3>{_e(t)}</h3>{b}</div>' for t, b in blocks)
    lead = "Everything here is also in <code>run.json</code> beside this page."
    return _section("run", "Run", f'<div class="two">{body}</div>', lead)


# ----------------------------------------------------------------------------- helpers


def _kv(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        rows.append(f"<tr><th>{_e(str(k))}</th><td>{_e('–' if v is None else str(v))}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _tabs(name: str, tabs: list[tuple[str, str]]) -> str:
    buttons = "".join(
        f'<button type="button" role="tab" data-tab="{name}-{i}" aria-selected="{"true" if i == 0 else "false"}">{_e(t)}</button>'
        for i, (t, _) in enumerate(tabs)
    )
    panes = "".join(
        f'<div class="pane" role="tabpanel" id="{name}-{i}"{"" if i == 0 else " hidden"}>{body}</div>'
        for i, (_, body) in enumerate(tabs)
    )
    return f'<div class="tabs" data-tabs><div class="tabbar" role="tablist">{buttons}</div>{panes}</div>'


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _int(v: Any) -> str:
    return f"{int(round(float(v))):,}"


def _pct(x: float) -> str:
    x = float(x)
    return f"{100 * x:.1f}%" if x >= 0.001 or x == 0 else f"{100 * x:.2f}%"


def _p(p: float) -> str:
    return "0" if p == 0 else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


_CSS = """
:root{--fg:#1f2328;--muted:#6a737d;--line:#e3e6ea;--bg:#f6f7f9;--accent:#3b6fb6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
.wrap{max-width:1180px;margin:0 auto;padding:0 20px}
header{background:#1d2b3a;color:#fff;padding:14px 0 0;position:sticky;top:0;z-index:2}
header .brand{font-size:12px;letter-spacing:.06em;text-transform:uppercase;opacity:.75}
header .brand span{opacity:.7}
header h1{margin:2px 0 8px;font-size:22px;font-weight:600}
header h1 small{font-weight:400;opacity:.8;font-size:16px}
nav{display:flex;gap:2px;flex-wrap:wrap}
nav a{color:#cfe0f5;text-decoration:none;padding:6px 10px;border-radius:6px 6px 0 0;font-size:13px}
nav a:hover{background:#2c3e52;color:#fff}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px 20px;margin:18px 0;scroll-margin-top:110px}
h2{margin:0 0 6px;font-size:18px}
h3{margin:4px 0 8px;font-size:14px}
.lead{color:var(--muted);margin:0 0 12px;max-width:900px}
.note{color:var(--muted);font-style:italic}
.muted{color:var(--muted)}
code{font:12px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f1f3f5;padding:1px 4px;border-radius:3px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:#fbfcfd}
.card .k{font-size:12px;color:var(--muted)}
.card .v{font-size:22px;font-weight:600;margin-top:2px}
.card .s{font-size:11.5px;color:var(--muted)}
.strip{margin:16px 0 0}
.strip svg{display:block;border-radius:4px}
.legend-inline{margin-top:8px;display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12.5px}
.sw i,.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px;vertical-align:baseline}
table{border-collapse:collapse}
table.types{width:100%}
table.types td,table.types th{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:middle}
table.types th{font-size:12px;color:var(--muted);font-weight:500}
.num{text-align:right!important;font-variant-numeric:tabular-nums;white-space:nowrap}
.barcell{width:32%}
.bar{height:12px;border-radius:2px;background:var(--accent);min-width:1px}
.tabbar{display:flex;gap:4px;margin:4px 0 10px}
.tabbar button{font:inherit;border:1px solid var(--line);background:#f6f7f9;border-radius:6px;padding:4px 12px;cursor:pointer}
.tabbar button[aria-selected=true]{background:var(--accent);color:#fff;border-color:var(--accent)}
.scatterbox{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
svg.scatter .frame{fill:#fcfcfd;stroke:#d5d9de}
svg.scatter path{fill:none;stroke-width:3.2;stroke-linecap:round;stroke-opacity:.8}
.hl-on svg.scatter path{stroke-opacity:.08}
.hl-on svg.scatter path.hl{stroke-opacity:1}
ul.legend{list-style:none;margin:0;padding:0;font-size:12.5px;columns:1;max-height:560px;overflow:auto;min-width:260px}
ul.legend li{padding:2px 6px;border-radius:4px;cursor:default}
ul.legend li:hover,ul.legend li.hl{background:#eef3fa}
svg text{font-family:inherit}
svg .axis{font-size:12px;fill:#555}
svg .tick{font-size:10.5px;fill:#666}
svg .lab{font-size:12px;fill:#222}
svg .lab.b{font-weight:600}
svg .stat{font-size:11px;fill:#666}
svg .base{stroke:#d5d9de}
svg .med{stroke:#111;stroke-width:2}
svg .iqr{stroke:#888;stroke-width:3}
svg .thr{stroke:#c9423f;stroke-dasharray:4 3}
.explain{background:#fbf8ef;border:1px solid #eee2bf;border-radius:6px;padding:2px 14px;margin:0 0 12px;max-width:1000px}
.mgrid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.mcard{border:1px solid var(--line);border-radius:8px;padding:8px 12px}
table.markers{width:100%;font-size:12.5px}
table.markers td,table.markers th{padding:2px 4px;border-bottom:1px solid #f0f1f3;text-align:left}
table.markers th{color:var(--muted);font-weight:500}
.two{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
.panel{border:1px solid var(--line);border-radius:8px;padding:10px 14px;overflow-wrap:anywhere}
.meter{height:14px;background:#eceff3;border-radius:7px;overflow:hidden;margin:6px 0}
.meter div{height:100%;background:#3f9e57}
table.kv{width:100%;font-size:12.5px}
table.kv th,table.kv td{text-align:left;padding:3px 6px;border-bottom:1px solid #f0f1f3;vertical-align:top}
table.kv th{color:var(--muted);font-weight:500;width:38%}
table.kv .bar{background:#8a63b8}
table.kv tr.total td{font-weight:600}
table.small{margin-top:8px}
footer{color:var(--muted);font-size:12px;padding:8px 20px 30px}
"""

_JS = """
(function(){'use strict';
document.querySelectorAll('[data-tabs]').forEach(function(box){
  var buttons=box.querySelectorAll('.tabbar button');
  buttons.forEach(function(b){b.addEventListener('click',function(){
    buttons.forEach(function(o){o.setAttribute('aria-selected',o===b?'true':'false');
      var p=document.getElementById(o.getAttribute('data-tab'));if(p){p.hidden=(o!==b);}});
  });});
});
document.querySelectorAll('[data-hl]').forEach(function(box){
  function set(key){
    box.classList.toggle('hl-on',key!==null);
    box.querySelectorAll('[data-key]').forEach(function(el){el.classList.toggle('hl',key!==null&&el.getAttribute('data-key')===key);});
  }
  box.querySelectorAll('ul.legend li').forEach(function(li){
    li.addEventListener('mouseenter',function(){set(li.getAttribute('data-key'));});
    li.addEventListener('mouseleave',function(){set(null);});
  });
});
})();
"""

