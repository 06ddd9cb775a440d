"""The page's pictures: hand-drawn inline SVG, and the tissue map as a server-side PNG.

Every function takes arrays from :class:`.data.SummaryData` and returns markup
(``markupsafe.Markup``) that the templates insert as it is; text inside is escaped here.
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
from markupsafe import Markup, escape

from .data import MAX_FINE_ROWS, OTHER_COLOUR, SummaryData


def esc(s: object) -> str:
    """HTML-escape any value (quotes too), as text."""
    return str(escape(str(s)))


def fmt_int(v: object) -> str:
    return f"{int(round(float(v))):,}"  # type: ignore[arg-type]


def fmt_pct(x: float) -> str:
    x = float(x)
    return f"{100 * x:.1f}%" if x >= 0.001 or x == 0 else f"{100 * x:.2f}%"


def fmt_p(p: float) -> str:
    return "0" if p == 0 else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def composition_strip(d: SummaryData) -> Markup:
    """One 100% bar of the coarse composition."""
    if not d.n:
        return Markup("")
    w, x, parts = 1000.0, 0.0, []
    for name, c in zip(d.coarse_names, d.coarse_counts):
        width = w * c / d.n
        parts.append(f'<rect x="{x:.2f}" y="0" width="{width:.2f}" height="28" fill="{d.coarse_colour[name]}">'
                     f"<title>{esc(name)}: {fmt_int(c)} cells ({fmt_pct(c / d.n)})</title></rect>")
        x += width
    return Markup(f'<svg viewBox="0 0 1000 28" preserveAspectRatio="none" width="100%" height="28" role="img" '
                  f'aria-label="coarse composition">{"".join(parts)}</svg>')


def scatter(xy: np.ndarray, codes: np.ndarray, names: list[str], colour: dict[str, str], *, label: str = "reference PC",
            aria: str = "query cells in the reference PCA space") -> Markup:
    """Points as zero-length round-capped path segments, one path per type (largest first)."""
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
    for g in range(n_named + 1):
        sel = np.flatnonzero(group == g)
        if sel.size == 0:
            continue
        dd = "".join(f"M{x:.1f} {y:.1f}h0" for x, y in zip(px[sel].tolist(), py[sel].tolist()))
        key = names[g] if g < n_named else "other"
        col = colour[names[g]] if g < n_named else OTHER_COLOUR
        paths.append(f'<path data-key="{esc(key)}" stroke="{col}" d="{dd}"/>')
    axes = (f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" class="frame"/>'
            f'<text x="{pad + inner / 2}" y="{size - 10}" class="axis" text-anchor="middle">{esc(label)}1</text>'
            f'<text x="14" y="{pad + inner / 2}" class="axis" text-anchor="middle" transform="rotate(-90 14 {pad + inner / 2})">{esc(label)}2</text>')
    return Markup(f'<svg class="scatter" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
                  f'aria-label="{esc(aria)}">{axes}<g class="pts">{"".join(paths)}</g></svg>')


def confidence(d: SummaryData) -> tuple[Markup, int]:
    """Histogram of the vote support per fine type (rows), with median and IQR; and the rows drawn."""
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
            f'<g><title>{esc(name)}: {fmt_int(cnt)} cells; {stats}</title>'
            f'<text x="{label_w - 8}" y="{y0 + row_h / 2 + 4}" text-anchor="end" class="lab{" b" if r == 0 else ""}">{esc(label)}</text>'
            f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{y0 + row_h - 4}" y2="{y0 + row_h - 4}" class="base"/>'
            f"{bars}{med}"
            f'<text x="{label_w + plot_w + 8}" y="{y0 + row_h / 2 + 4}" class="stat">{esc(stats)}</text></g>'
        )
    y_axis = 20 + row_h * len(rows) + 4
    ticks = []
    tick_values = np.unique(np.round(np.linspace(0, d.conf_max, 6))) if d.layout == "cloud" else np.linspace(0, 1, 6)
    for t in tick_values:
        x = label_w + plot_w * (t - bins[0]) / (bins[-1] - bins[0])
        ticks.append(f'<text x="{x:.1f}" y="{y_axis + 10}" text-anchor="middle" class="tick">{fmt(t)}</text>')
    ticks.append(f'<text x="{label_w + plot_w / 2}" y="{y_axis + 26}" text-anchor="middle" class="axis">{esc(xlabel)}</text>')
    svg = (f'<svg class="conf" viewBox="0 0 {label_w + plot_w + 240} {height}" width="100%" role="img" '
           f'aria-label="vote support per fine type">{"".join(parts)}{"".join(ticks)}</svg>')
    return Markup(svg), n_rows


def umi_hist(umi: np.ndarray, thr: float) -> Markup:
    """UMIs per cell on a log axis, the bins under the low-UMI threshold in red."""
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
    return Markup(f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="UMIs per cell">{bars}'
                  f'<line x1="{pad}" x2="{w - pad}" y1="{h - pad}" y2="{h - pad}" class="base"/>'
                  f'<line x1="{xt:.1f}" x2="{xt:.1f}" y1="{pad - 10}" y2="{h - pad}" class="thr"/>'
                  f'<text x="{xt + 4:.1f}" y="{pad - 2}" class="tick">{thr:.0f} UMIs</text>{ticks}'
                  f'<text x="{w / 2}" y="{h - 2}" text-anchor="middle" class="axis">UMIs per cell (log scale)</text></svg>')
