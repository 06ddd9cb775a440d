"""What the web summary shows, as plain arrays and tables: no HTML here.

:func:`prepare` turns a run's record, ``cell_types.csv`` table, embedding, DE table
and (Visium HD) cell positions into one :class:`SummaryData`; the sections in
:mod:`.render` only read it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_POINTS = 20_000
MAX_FINE_ROWS = 60  # fine types drawn one by one (confidence rows, legend); the rest are summed up
MARKERS_PER_TYPE = 10
MARKER_MAX_ADJ_P = 0.10
MARKER_MIN_MEAN = 1.0  # counts per cell (at the median depth) in the type, for a gene to rank first
LOW_UMI = "Low UMI Barcode"

# Distinct, colour-blind-aware hues, in the order types are ranked by size.
PALETTE = (
    "#3b6fb6", "#e0882b", "#3f9e57", "#c9423f", "#8a63b8", "#8c5a45", "#d36aa8", "#6f7780",
    "#a9a834", "#2fa7b8", "#90b5e0", "#f2b877", "#93cf8f", "#ef9a97", "#c3acdb", "#c49d8c",
    "#f1b4d3", "#bdbdbd", "#d7d88a", "#98d5de",
)
LOW_UMI_COLOUR = "#b8b8b8"
OTHER_COLOUR = "#d0d0d0"


@dataclass
class Spatial:
    """Cell positions on the tissue, for the tissue map.

    ``xy`` is full-resolution tissue-image pixels (x = column, y = row), NaN for a cell
    without a polygon; ``image`` the low-resolution tissue image (H x W x 3 or 4, uint8)
    or ``None``; ``lowres_scale`` maps full-resolution pixels to it.
    """

    xy: np.ndarray
    image: np.ndarray | None = None
    lowres_scale: float | None = None
    microns_per_pixel: float | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class SummaryData:
    """Everything the sections draw, computed once with vectorised NumPy."""

    record: dict
    ref: dict
    params: dict
    model_name: str
    n: int
    layout: str
    coarse: np.ndarray
    fine: np.ndarray
    coarse_unf: np.ndarray
    umi: np.ndarray
    conf: np.ndarray
    conf_max: float
    conf_name: str
    coarse_names: list[str]
    coarse_codes: np.ndarray
    coarse_counts: np.ndarray
    fine_names: list[str]
    fine_codes: np.ndarray
    fine_counts: np.ndarray
    coarse_colour: dict[str, str]
    fine_colour: dict[str, str]
    fine_parent: list[str]
    emb: np.ndarray | None
    de: Any = None
    spatial: Spatial | None = None
    warnings: list[str] = field(default_factory=list)


def prepare(record: dict, cell_types: Any, embedding2d: np.ndarray | None = None, de: Any = None,
            spatial: Spatial | None = None) -> SummaryData:
    """Check the inputs and compute what the page shows (pure; same inputs, same result)."""
    import pandas as pd

    ct = cell_types
    ref = record.get("reference", {}) or {}
    params = record.get("parameters", {}) or {}
    cols = set(ct.columns)
    for need in ("coarse_cell_type", "fine_cell_type", "umi_count"):
        if need not in cols:
            raise ValueError(f"cell_types has no column '{need}' (columns: {', '.join(map(str, ct.columns))}); pass cell_types.csv as read by pandas")
    n = int(len(ct))
    layout = "hierarchical" if "final_level_softmax_prob" in cols else "cloud"
    coarse = ct["coarse_cell_type"].astype(str).to_numpy()
    fine = ct["fine_cell_type"].astype(str).to_numpy()
    coarse_unf = ct["coarse_cell_type_unfiltered"].astype(str).to_numpy() if "coarse_cell_type_unfiltered" in cols else coarse
    umi = pd.to_numeric(ct["umi_count"], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    if layout == "cloud":
        conf = pd.to_numeric(ct["cell_count_in_model"], errors="coerce").to_numpy(dtype=np.float64)
        k = params.get("k_used") or (int(np.nanmax(conf)) if n and np.isfinite(conf).any() else 1)
        conf_max, conf_name = float(max(1, int(k))), "cell_count_in_model"
    else:
        conf = pd.to_numeric(ct["final_level_softmax_prob"], errors="coerce").to_numpy(dtype=np.float64)
        conf_max, conf_name = 1.0, "final_level_softmax_prob"
    # types ranked by size (ties by name), so colours and rows are stable
    coarse_names, coarse_codes, coarse_counts = ranked(coarse)
    fine_names, fine_codes, fine_counts = ranked(fine)
    # the coarse type (unfiltered) most fine cells of each fine type belong to
    cu_names, cu_codes, _ = ranked(coarse_unf)
    nf, nc = len(fine_names), max(len(cu_names), 1)
    pair = np.bincount(fine_codes * nc + cu_codes, minlength=nf * nc).reshape(nf, nc) if n else np.zeros((0, 1), int)
    fine_parent = [cu_names[int(pair[i].argmax())] if cu_names else "" for i in range(nf)]
    emb = None
    if embedding2d is not None:
        e = np.asarray(embedding2d, dtype=np.float64)
        if e.ndim != 2 or e.shape[0] != n or e.shape[1] < 2:
            raise ValueError(f"embedding2d has shape {e.shape}; expected ({n}, 2): the first two reference PCs of each cell, in matrix order")
        emb = e[:, :2]
    if spatial is not None:
        xy = np.asarray(spatial.xy, dtype=np.float64)
        if xy.shape != (n, 2):
            raise ValueError(f"spatial positions have shape {xy.shape}; expected ({n}, 2): one (x, y) per cell in matrix order")
        spatial.xy = xy
    warnings = [str(w) for w in (record.get("warnings") or [])]
    return SummaryData(
        record=record, ref=ref, params=params, model_name=str(ref.get("name", "model")), n=n, layout=layout,
        coarse=coarse, fine=fine, coarse_unf=coarse_unf, umi=umi, conf=conf, conf_max=conf_max, conf_name=conf_name,
        coarse_names=coarse_names, coarse_codes=coarse_codes, coarse_counts=coarse_counts,
        fine_names=fine_names, fine_codes=fine_codes, fine_counts=fine_counts,
        coarse_colour=colours(coarse_names), fine_colour=colours(fine_names), fine_parent=fine_parent,
        emb=emb, de=de, spatial=spatial, warnings=warnings,
    )


def ranked(values: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique values by count (desc, then name) with each row's rank code and the counts.

    Hash-based (pandas.factorize, then a sort of the few unique names), so a million
    labels take well under a second; the result does not depend on the row order.
    """
    import pandas as pd

    codes, uniques = pd.factorize(np.asarray(values, dtype=object), sort=False)
    names = np.asarray([str(u) for u in uniques], dtype=object)
    counts = np.bincount(codes, minlength=names.size) if names.size else np.zeros(0, np.int64)
    order = np.lexsort((names.astype(str), -counts)) if names.size else np.zeros(0, np.int64)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return [str(x) for x in names[order]], rank[codes].astype(np.int64), counts[order]


def colours(names: list[str]) -> dict[str, str]:
    """A colour per type name, in rank order; Low UMI Barcode is always grey."""
    out, i = {}, 0
    for name in names:
        if name == LOW_UMI:
            out[name] = LOW_UMI_COLOUR
            continue
        if i < len(PALETTE):
            out[name] = PALETTE[i]
        else:  # golden-angle hues beyond the palette
            h = (i * 137.508) % 360
            out[name] = f"hsl({h:.0f},55%,{52 + 8 * (i % 3)}%)"
        i += 1
    return out


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


def legend_items(names: list[str], counts: np.ndarray, colour: dict[str, str]) -> list[dict]:
    """Legend rows of a per-type picture: the MAX_FINE_ROWS largest types, then the rest summed up."""
    n_named = min(len(names), MAX_FINE_ROWS)
    out = [{"key": n, "colour": colour[n], "label": n, "count": int(counts[i])} for i, n in enumerate(names[:n_named])]
    if len(names) > n_named:
        out.append({"key": "other", "colour": OTHER_COLOUR, "label": f"{len(names) - n_named} smaller types",
                    "count": int(counts[n_named:].sum())})
    return out
