"""The tissue map: every cell at its position, coloured by type, rasterised on the server.

A million SVG or canvas points would make the page tens of megabytes and slow to
open; instead each cell is painted as a small square into a fixed-size raster
(:data:`MAX_SIDE` pixels on the longer side) over the low-resolution tissue image
(faded, quantised to :data:`BG_COLOURS` colours), and the raster is inlined as a
palette PNG (one byte per pixel before compression). The page's size then depends on the picture, not
on the cell count. Where cells share a pixel, the smaller type wins (so rare types stay
visible); this is decided with ``np.maximum.at``, so the picture does not depend on
cell order.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from markupsafe import Markup

from .data import MAX_FINE_ROWS, OTHER_COLOUR, SummaryData, legend_items

MAX_SIDE = 1000


def _rgb(colour: str) -> tuple[int, int, int]:
    """'#rrggbb' or 'hsl(h,s%,l%)' -> (r, g, b)."""
    import colorsys

    if colour.startswith("#"):
        return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
    h, s, light = (float(v.strip().rstrip("%")) for v in colour[4:-1].split(","))
    r, g, b = colorsys.hls_to_rgb(h / 360.0, light / 100.0, s / 100.0)
    return round(r * 255), round(g * 255), round(b * 255)


def frame(d: SummaryData) -> dict:
    """Where the raster sits in full-resolution pixels, its size and each cell's pixel."""
    sp = d.spatial
    assert sp is not None
    xy = sp.xy
    ok = np.isfinite(xy).all(axis=1)
    if sp.image is not None and sp.lowres_scale:
        h_img, w_img = sp.image.shape[:2]
        x0, y0, x1, y1 = 0.0, 0.0, w_img / sp.lowres_scale, h_img / sp.lowres_scale
    elif ok.any():
        lo, hi = xy[ok].min(axis=0), xy[ok].max(axis=0)
        span = np.maximum(hi - lo, 1.0)
        x0, y0 = lo - 0.03 * span
        x1, y1 = hi + 0.03 * span
    else:
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    scale = MAX_SIDE / max(x1 - x0, y1 - y0)
    width, height = max(1, int(round((x1 - x0) * scale))), max(1, int(round((y1 - y0) * scale)))
    px = np.floor((xy[:, 0] - x0) * scale).astype(np.float64)
    py = np.floor((xy[:, 1] - y0) * scale).astype(np.float64)
    ok &= (px >= 0) & (px < width) & (py >= 0) & (py < height)
    placed = int(ok.sum())
    # a cell's square: about the spacing of the cells (the area per placed cell), 1 to 6 px
    if placed:
        lo, hi = np.array([px[ok].min(), py[ok].min()]), np.array([px[ok].max(), py[ok].max()])
        area = float(np.prod(np.maximum(hi - lo + 1, 1.0)))
        side = int(np.clip(round(0.9 * np.sqrt(area / placed)), 1, 6))
    else:
        side = 1
    return {"x0": x0, "y0": y0, "scale": scale, "width": width, "height": height, "ok": ok,
            "px": px, "py": py, "side": side, "placed": placed}


BG_COLOURS = 190  # palette entries for the (faded) tissue image; the rest are the types' colours


def background(d: SummaryData, fr: dict) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The faded tissue image at the raster's size as palette indices (uint8) and its palette; or white."""
    sp = d.spatial
    if sp is None or sp.image is None:
        return np.zeros((fr["height"], fr["width"]), dtype=np.uint8), [(255, 255, 255)]
    from PIL import Image

    img = np.asarray(sp.image)
    if img.dtype != np.uint8:  # 16-bit or float images: to 8 bits
        top = float(img.max()) or 1.0
        img = np.clip(np.asarray(img, dtype=np.float64) / top * 255.0, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    im = Image.fromarray(np.ascontiguousarray(img[:, :, :3])).resize((fr["width"], fr["height"]), Image.Resampling.BILINEAR)
    # fade the tissue so the cells' colours read against it
    faded = (np.asarray(im, dtype=np.float64) * 0.55 + 255 * 0.45).round().astype(np.uint8)
    q = Image.fromarray(faded).quantize(colors=BG_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pal = q.getpalette()[: 3 * BG_COLOURS]
    return np.asarray(q, dtype=np.uint8), [tuple(pal[i:i + 3]) for i in range(0, len(pal), 3)]


def raster(d: SummaryData, fr: dict, codes: np.ndarray, names: list[str], colour: dict[str, str],
           base: tuple[np.ndarray, list]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The picture of the cells coloured by ``codes`` (rank codes: 0 = largest type), as palette indices and palette."""
    w, h, s = fr["width"], fr["height"], fr["side"]
    ok = fr["ok"]
    n_named = min(len(names), MAX_FINE_ROWS)
    grp = np.minimum(codes[ok], n_named).astype(np.int32)  # n_named = "other"
    # priority: smaller types (higher rank) on top; "other" below every named type
    prio = np.where(grp == n_named, 0, grp + 1).astype(np.int32)
    px, py = fr["px"][ok].astype(np.int64), fr["py"][ok].astype(np.int64)
    top = np.full(h * w, -1, dtype=np.int32)
    half = (s - 1) // 2
    for dy in range(-half, s - half):
        for dx in range(-half, s - half):
            x, y = px + dx, py + dy
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            np.maximum.at(top, y[inside] * w + x[inside], prio[inside])
    bg_idx, bg_pal = base
    first = len(bg_pal)  # type colours follow the background's palette entries
    palette = list(bg_pal) + [_rgb(OTHER_COLOUR)] + [_rgb(colour[names[g]]) for g in range(n_named)]
    out = bg_idx.reshape(-1).copy()
    hit = top >= 0
    out[hit] = (first + top[hit]).astype(np.uint8)
    return out.reshape(h, w), palette


def png_data_uri(picture: tuple[np.ndarray, list[tuple[int, int, int]]]) -> str:
    """A palette PNG of the picture as a data: URI (deterministic bytes: no timestamp is written)."""
    from PIL import Image

    idx, palette = picture
    im = Image.fromarray(idx)  # mode L; putpalette makes it P with these indices
    flat = [c for rgb in palette for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=9)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def context(d: SummaryData) -> dict:
    """The tissue section's template context: two PNGs (coarse, fine) and their legends."""
    sp = d.spatial
    assert sp is not None
    fr = frame(d)
    base = background(d, fr)
    maps = []
    for title, codes, names, colour, counts in (
            ("Coarse", d.coarse_codes, d.coarse_names, d.coarse_colour, d.coarse_counts),
            ("Fine", d.fine_codes, d.fine_names, d.fine_colour, d.fine_counts)):
        uri = png_data_uri(raster(d, fr, codes, names, colour, base))
        img = Markup('<img class="tissue" alt="cells on the tissue coloured by {} type" width="{}" height="{}" src="{}">').format(
            title.lower(), fr["width"], fr["height"], uri)
        maps.append((title, img, legend_items(names, counts, colour)))
    um_per_canvas_px = (sp.microns_per_pixel / fr["scale"]) if sp.microns_per_pixel else None
    return {"maps": maps, "placed": fr["placed"], "side": fr["side"], "width": fr["width"], "height": fr["height"],
            "with_image": sp.image is not None and bool(sp.lowres_scale), "source": sp.source, "notes": sp.notes,
            "um_per_px": um_per_canvas_px}
