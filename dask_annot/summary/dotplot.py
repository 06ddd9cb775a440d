"""The dot plot of a marker model's calls: per assigned type, its marker genes' expression.

Drawn from run.json's ``marker_expression`` (written by :func:`dask_annot.markers.dot_plot_table`;
nothing is recomputed here): one row per assigned cell type, largest first, and in it a dot
per marker gene, its area the fraction of the type's cells expressing the gene and its
colour the mean log1p(counts per 10k) in those cells, on one colour scale for the page.
A user judges a call by whether its markers are expressed by most of its cells.
The rows are capped at :data:`MAX_DOT_TYPES` so the page stays small for a 400-type model.
"""
from __future__ import annotations

import math

from markupsafe import Markup

from .plots import esc, fmt_int, fmt_pct

MAX_DOT_TYPES = 40  # rows drawn; the rest are in run.json's marker_expression
MAX_DOT_GENES = 8  # dots per row (the table holds at most this many, most expressed first)

# A perceptually ordered sequential scale (light to dark), interpolated linearly in RGB.
_STOPS = ((0.0, (253, 231, 37)), (0.25, (94, 201, 98)), (0.5, (33, 145, 140)), (0.75, (59, 82, 139)), (1.0, (68, 1, 84)))


def colour(x: float) -> str:
    """The scale's colour at ``x`` in [0, 1] (clipped), as ``#rrggbb``."""
    x = min(max(float(x), 0.0), 1.0) if math.isfinite(x) else 0.0
    for (x0, c0), (x1, c1) in zip(_STOPS[:-1], _STOPS[1:]):
        if x <= x1:
            t = (x - x0) / (x1 - x0)
            return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(c0, c1))
    return "#" + "".join(f"{v:02x}" for v in _STOPS[-1][1])


def ordered(entries: list[dict]) -> list[dict]:
    """The table's types by cell count (largest first; ties by name), so the page is stable."""
    return sorted(entries, key=lambda e: (-int(e.get("cells", 0)), str(e.get("cell_type", ""))))


def dot_plot(entries: list[dict], *, max_types: int = MAX_DOT_TYPES, max_genes: int = MAX_DOT_GENES) -> tuple[Markup, int, float]:
    """The SVG of the first ``max_types`` entries (already ordered), the rows drawn and the colour scale's top.

    Each row is ``<g class="dotrow" data-type=...>`` with one ``<circle>`` per gene (its
    ``<title>`` gives the numbers) and the gene's name under it.
    """
    rows = entries[:max_types]
    means = [float(m["mean_log_cp10k"]) for e in rows for m in e.get("markers", [])[:max_genes]]
    top = max([v for v in means if math.isfinite(v)] + [1.0])
    label_w, slot_w, row_h, rmax, head = 330, 92, 46, 15.0, 8
    width = label_w + slot_w * max_genes + 10
    parts = []
    for r, e in enumerate(rows):
        y0 = head + r * row_h
        cy = y0 + 19
        name, cells = str(e.get("cell_type", "")), int(e.get("cells", 0))
        label = name if len(name) <= 46 else name[:44] + "…"
        dots = []
        markers = e.get("markers", [])[:max_genes]
        for j, m in enumerate(markers):
            cx = label_w + slot_w * j + slot_w / 2
            frac, mean, gene = float(m["fraction_expressing"]), float(m["mean_log_cp10k"]), str(m["gene"])
            rad = rmax * math.sqrt(min(max(frac, 0.0), 1.0))
            tip = f"{gene} in {name}: {fmt_pct(frac)} of {fmt_int(cells)} cells expressing, mean log1p(CP10k) {mean:.2f}"
            dots.append(
                f'<g class="dot" data-gene="{esc(gene)}"><title>{esc(tip)}</title>'
                f'<circle cx="{cx:.1f}" cy="{cy}" r="{max(rad, 0.8):.2f}" fill="{colour(mean / top)}" '
                f'stroke="{"#999" if frac == 0 else "#333"}" stroke-width="0.6"/>'
                f'<text x="{cx:.1f}" y="{y0 + row_h - 4}" text-anchor="middle" class="tick">{esc(gene if len(gene) <= 12 else gene[:11] + "…")}</text></g>'
            )
        if not markers:
            dots.append(f'<text x="{label_w + 8}" y="{cy + 4}" class="stat">no positive marker gene of this type is in the matrix</text>')
        parts.append(
            f'<g class="dotrow" data-type="{esc(name)}"><title>{esc(name)}: {fmt_int(cells)} cell{"" if cells == 1 else "s"}</title>'
            f'<line x1="{label_w}" x2="{width - 10}" y1="{y0 + row_h}" y2="{y0 + row_h}" class="base"/>'
            f'<text x="{label_w - 10}" y="{cy - 2}" text-anchor="end" class="lab">{esc(label)}</text>'
            f'<text x="{label_w - 10}" y="{cy + 12}" text-anchor="end" class="stat">{fmt_int(cells)} cell{"" if cells == 1 else "s"}</text>'
            f'{"".join(dots)}</g>'
        )
    height = head + row_h * len(rows) + 8
    svg = (f'<svg class="dotplot" viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'aria-label="marker genes of each assigned cell type">{"".join(parts)}</svg>')
    return Markup(svg), len(rows), top


def keys(top: float) -> Markup:
    """The size key (fraction expressing) and the colour bar (mean log1p(CP10k), 0 to ``top``)."""
    rmax = 15.0
    size = "".join(
        f'<circle cx="{30 + 70 * i}" cy="24" r="{rmax * math.sqrt(f):.2f}" fill="#bbb" stroke="#333" stroke-width="0.6"/>'
        f'<text x="{30 + 70 * i}" y="56" text-anchor="middle" class="tick">{fmt_pct(f)}</text>'
        for i, f in enumerate((0.1, 0.25, 0.5, 1.0))
    )
    steps = 40
    bar = "".join(f'<rect x="{330 + 5 * i}" y="14" width="5.5" height="16" fill="{colour(i / (steps - 1))}"/>' for i in range(steps))
    return Markup(
        f'<svg class="dotkey" viewBox="0 0 620 78" width="620" role="img" aria-label="dot plot key">{size}'
        f'<text x="130" y="74" text-anchor="middle" class="axis">fraction of the type\'s cells expressing</text>{bar}'
        f'<text x="330" y="44" class="tick">0</text><text x="530" y="44" text-anchor="end" class="tick">{top:.2f}</text>'
        f'<text x="430" y="74" text-anchor="middle" class="axis">mean log1p(counts per 10k)</text></svg>'
    )
