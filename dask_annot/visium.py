"""Visium HD inputs: Space Ranger's ``outs/`` tree, bins refused, cell positions.

Layout facts (Space Ranger 4): the cell-segmented matrix is
``outs/segmented_outputs/filtered_feature_cell_matrix.h5`` (barcodes ``cellid_000000023-1``);
binned matrices are ``outs/binned_outputs/square_{002,008,016}um/filtered_feature_bc_matrix.h5``
(barcodes ``s_008um_00301_00321-1``). Each cell's outline is a polygon in
``segmented_outputs/cell_segmentations.geojson`` (property ``cell_id``, the bare integer;
coordinates in full-resolution tissue-image pixels, x = column, y = row), and
``segmented_outputs/spatial/`` holds ``scalefactors_json.json`` and
``tissue_lowres_image.png``.

Annotation models are trained on single cells: a binned matrix is refused with a
line naming the bin size and the segmented file expected, unless ``allow_bins``.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputFormatError, InputNotFoundError

SEGMENTED = "segmented_outputs"
BINNED = "binned_outputs"
CELL_MATRIX = "filtered_feature_cell_matrix"
BIN_MATRIX = "filtered_feature_bc_matrix"
GEOMETRY = "cell_segmentations.geojson"
BIN_RE = re.compile(r"^s_(\d{3})um_\d+_\d+(-\d+)?$")
CELL_RE = re.compile(r"^cellid_(\d+)(-\d+)?$")
ALLOW_BINS_BIN = "square_008um"  # the bin size --allow-bins annotates from an outs/ without cells
BIN_WARNING = ("annotated {what}: the models were trained on single cells and will not perform as intended on bins "
               "(10x); labels are per bin, not per cell (--allow-bins)")


@dataclass
class VisiumInput:
    """What ``--matrix`` resolved to, and where the cells' geometry and images are."""

    given: Path
    matrix: Path
    geometry: Path | None = None
    spatial_dir: Path | None = None
    bin_size_um: int | None = None
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """For ``run.json`` (input.visium)."""
        return {"given": str(self.given), "matrix": str(self.matrix),
                "cell_geometry": str(self.geometry) if self.geometry else None,
                "spatial_dir": str(self.spatial_dir) if self.spatial_dir else None,
                "bins": f"square_{self.bin_size_um:03d}um" if self.bin_size_um else None}


def _matrix_in(d: Path, stem: str) -> Path | None:
    """``<stem>.h5`` in ``d``, else the MEX directory ``<stem>/``."""
    if (d / f"{stem}.h5").is_file():
        return d / f"{stem}.h5"
    if (d / stem).is_dir():
        return d / stem
    return None


def _bin_dirs(outs: Path) -> list[Path]:
    b = outs / BINNED
    return sorted(p for p in b.iterdir() if p.is_dir() and p.name.startswith("square_")) if b.is_dir() else []


def _is_outs(d: Path) -> bool:
    return (d / SEGMENTED).is_dir() or (d / BINNED).is_dir()


def _is_segmented(d: Path) -> bool:
    return d.name == SEGMENTED or ((d / GEOMETRY).is_file() and _matrix_in(d, CELL_MATRIX) is not None)


def resolve(path: str | Path, *, allow_bins: bool = False, cell_geometry: str | Path | None = None) -> VisiumInput:
    """Resolve ``--matrix`` (and ``--cell-geometry``) for a Space Ranger output or any matrix.

    A directory that is a Space Ranger ``outs/`` (or the run directory holding it, or
    ``segmented_outputs/``) resolves to the cell-segmented filtered matrix; other paths
    are taken as they are. Binned matrices are refused unless ``allow_bins``.
    """
    given = Path(path)
    geometry = Path(cell_geometry) if cell_geometry is not None else None
    if geometry is not None and not geometry.is_file():
        raise InputNotFoundError(f"{geometry}: no such file; --cell-geometry takes Space Ranger's "
                                 f"segmented_outputs/{GEOMETRY}")
    if given.is_dir() and not _is_outs(given) and (given / "outs").is_dir() and _is_outs(given / "outs"):
        given_outs = given / "outs"
    else:
        given_outs = given
    vis: VisiumInput
    if given_outs.is_dir() and _is_outs(given_outs):
        seg = given_outs / SEGMENTED
        m = _matrix_in(seg, CELL_MATRIX) if seg.is_dir() else None
        if m is not None:
            vis = VisiumInput(given=given, matrix=m, spatial_dir=seg / "spatial")
            vis.geometry = geometry or (seg / GEOMETRY if (seg / GEOMETRY).is_file() else None)
        else:
            bins = _bin_dirs(given_outs)
            sizes = ", ".join(b.name for b in bins) or "none"
            if not allow_bins:
                raise InputFormatError(
                    f"{given}: Space Ranger outs/ holds only binned outputs ({sizes}) and no {SEGMENTED}/{CELL_MATRIX}.h5; "
                    "the models were trained on single cells and will not perform as intended on bins: run Space Ranger 4 "
                    f"with cell segmentation and pass its outs/ (or {SEGMENTED}/{CELL_MATRIX}.h5), or add --allow-bins "
                    f"to annotate the {ALLOW_BINS_BIN} bins anyway")
            pick = next((b for b in bins if b.name == ALLOW_BINS_BIN), bins[0] if bins else None)
            bm = _matrix_in(pick, BIN_MATRIX) if pick is not None else None
            if bm is None:
                raise InputNotFoundError(f"{given}: no {SEGMENTED}/{CELL_MATRIX}.h5 and no binned {BIN_MATRIX}.h5 in "
                                         f"{BINNED}/; pass the matrix file itself")
            size = int(pick.name[len("square_"):-2])
            vis = VisiumInput(given=given, matrix=bm, spatial_dir=pick / "spatial", bin_size_um=size)
            vis.warnings.append(BIN_WARNING.format(what=f"{size} µm bins ({pick.name}) of a Space Ranger outs/ without cell segmentation"))
            vis.geometry = geometry
    elif given.is_dir() and _is_segmented(given):
        m = _matrix_in(given, CELL_MATRIX)
        if m is None:
            raise InputNotFoundError(f"{given}: a {SEGMENTED}/ directory without {CELL_MATRIX}.h5 (or {CELL_MATRIX}/); "
                                     "pass the Space Ranger outs/ or the matrix file")
        vis = VisiumInput(given=given, matrix=m, spatial_dir=given / "spatial")
        vis.geometry = geometry or (given / GEOMETRY if (given / GEOMETRY).is_file() else None)
    else:
        vis = VisiumInput(given=given, matrix=given, geometry=geometry)
        if given.is_file() and given.parent.name == SEGMENTED:  # the matrix itself, inside its tree
            vis.spatial_dir = given.parent / "spatial"
            if geometry is None and (given.parent / GEOMETRY).is_file():
                vis.geometry = given.parent / GEOMETRY
    if vis.spatial_dir is not None and not vis.spatial_dir.is_dir():
        vis.spatial_dir = None
    return vis


def check_barcodes(vis: VisiumInput, barcodes: np.ndarray, *, allow_bins: bool = False) -> None:
    """Refuse (or, with ``allow_bins``, warn about) a matrix whose barcodes are Visium HD bins."""
    head = [str(b) for b in np.asarray(barcodes[:200]).tolist()]
    hits = [BIN_RE.match(b) for b in head]
    if not head or sum(h is not None for h in hits) * 2 <= len(head):
        return
    size = int(next(h for h in hits if h is not None).group(1))
    if vis.bin_size_um is not None:  # already resolved (and warned about) from an outs/ tree
        return
    vis.bin_size_um = size
    if not allow_bins:
        raise InputFormatError(
            f"{vis.given}: barcodes like '{head[0]}' are {size} µm bins of a Visium HD run (square_{size:03d}um), not cells; "
            f"the models were trained on single cells and will not perform as intended on bins: pass Space Ranger 4's "
            f"{SEGMENTED}/{CELL_MATRIX}.h5 (or its outs/ directory), or add --allow-bins to annotate the bins anyway")
    vis.warnings.append(BIN_WARNING.format(what=f"{size} µm bins (barcodes like '{head[0]}')"))


# ----------------------------------------------------------------------------- geometry


def ring_centroid(ring: list) -> tuple[float, float, float]:
    """Area-weighted centroid and absolute area of a closed ring (vertex mean if degenerate)."""
    a = np.asarray(ring, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < 2:
        return float("nan"), float("nan"), 0.0
    x, y = a[:, 0], a[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area2 = float(cross.sum())
    if abs(area2) < 1e-12:
        return float(x.mean()), float(y.mean()), 0.0
    cx = float(((x + xn) * cross).sum() / (3.0 * area2))
    cy = float(((y + yn) * cross).sum() / (3.0 * area2))
    return cx, cy, abs(area2) / 2.0


def _feature_centroid(geom: dict) -> tuple[float, float, float]:
    kind = geom.get("type")
    if kind == "Polygon":
        return ring_centroid(geom["coordinates"][0])
    if kind == "MultiPolygon":  # the largest part
        parts = [ring_centroid(p[0]) for p in geom["coordinates"] if p]
        return max(parts, key=lambda t: t[2]) if parts else (float("nan"), float("nan"), 0.0)
    if kind == "Point":
        c = geom["coordinates"]
        return float(c[0]), float(c[1]), 0.0
    raise ValueError(f"geometry type {kind!r}")


def cell_barcode(cell_id) -> str:
    """The matrix barcode of a GeoJSON ``cell_id`` (``cellid_{id:09d}-1``)."""
    return f"cellid_{int(cell_id):09d}-1"


def read_centroids(path: str | Path, barcodes: np.ndarray) -> dict:
    """Each matrix cell's polygon centroid and area from ``cell_segmentations.geojson``, streamed.

    Returns ``{"xy": (n, 2) float64 (NaN: no polygon), "area": (n,) float64, "polygons": int,
    "matched": int}``; rows in the matrix's barcode order. The file is read with ijson one
    feature at a time, so memory does not grow with the number of cells beyond the output.
    """
    import ijson

    p = Path(path)
    index: dict[str, int] = {}
    for i, b in enumerate(np.asarray(barcodes).tolist()):
        m = CELL_RE.match(str(b))
        if m:
            index[f"cellid_{int(m.group(1)):09d}-1"] = i
    n = len(barcodes)
    xy = np.full((n, 2), np.nan)
    area = np.full(n, np.nan)
    polygons = matched = 0
    try:
        with open(p, "rb") as fh:
            for feat in ijson.items(fh, "features.item", use_float=True):
                polygons += 1
                props = feat.get("properties") or {}
                cid = props.get("cell_id", feat.get("id"))
                if cid is None:
                    raise InputFormatError(f"{p}: feature {polygons} has no properties.cell_id; pass Space Ranger's "
                                           f"{SEGMENTED}/{GEOMETRY}")
                try:
                    bc = cell_barcode(cid)
                except (TypeError, ValueError):
                    m = CELL_RE.match(str(cid))
                    if not m:
                        raise InputFormatError(f"{p}: feature {polygons} has cell_id {cid!r}, not a cell number; pass "
                                               f"Space Ranger's {SEGMENTED}/{GEOMETRY}") from None
                    bc = f"cellid_{int(m.group(1)):09d}-1"
                row = index.get(bc)
                if row is None:
                    continue  # a segmented cell that did not pass filtering
                cx, cy, ar = _feature_centroid(feat.get("geometry") or {})
                xy[row] = (cx, cy)
                area[row] = ar
                matched += 1
    except OSError as exc:
        raise InputNotFoundError(f"{p}: cannot read ({exc.strerror or exc}); check --cell-geometry") from exc
    except (ijson.JSONError, ValueError, KeyError, IndexError, TypeError) as exc:
        if isinstance(exc, InputFormatError):
            raise
        raise InputFormatError(f"{p}: not a readable GeoJSON FeatureCollection of cell polygons ({exc}); pass Space "
                               f"Ranger's {SEGMENTED}/{GEOMETRY}") from exc
    if polygons and not matched:
        raise InputFormatError(f"{p}: none of its {polygons} polygons' cell_id matches a barcode of the matrix "
                               f"(expected barcodes like {cell_barcode(1)}); pass the geometry of the same run")
    return {"xy": xy, "area": area, "polygons": polygons, "matched": matched}


def read_spatial_dir(d: str | Path | None) -> dict:
    """``scalefactors_json.json`` and ``tissue_lowres_image.png`` of a spatial folder, when there."""
    out: dict = {"scalefactors": {}, "lowres": None}
    if d is None:
        return out
    d = Path(d)
    sf = d / "scalefactors_json.json"
    if sf.is_file():
        try:
            out["scalefactors"] = {k: float(v) for k, v in json.loads(sf.read_text()).items() if isinstance(v, (int, float))}
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputFormatError(f"{sf}: not valid JSON ({exc}); restore Space Ranger's scalefactors_json.json") from exc
    img = d / "tissue_lowres_image.png"
    if img.is_file() and out["scalefactors"].get("tissue_lowres_scalef"):
        from PIL import Image

        try:
            with Image.open(img) as im:
                out["lowres"] = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise InputFormatError(f"{img}: not a readable PNG ({exc}); restore Space Ranger's tissue_lowres_image.png") from exc
    return out


@dataclass
class Positions:
    """Cell positions of one run, for the summary's tissue map and ``obsm["spatial"]``."""

    xy: np.ndarray  # (n, 2) full-resolution pixels, NaN where unknown
    scalefactors: dict
    lowres: np.ndarray | None
    source: str
    record: dict

    def summary_spatial(self):
        """As :class:`dask_annot.summary.Spatial`."""
        from .summary import Spatial

        notes = []
        missing = int((~np.isfinite(self.xy).all(axis=1)).sum())
        if missing:
            notes.append(f"{missing:,} cells have no polygon in the geometry file and are not drawn.")
        return Spatial(xy=self.xy, image=self.lowres, lowres_scale=self.scalefactors.get("tissue_lowres_scalef"),
                       microns_per_pixel=self.scalefactors.get("microns_per_pixel"), source=self.source, notes=notes)


def positions(vis: VisiumInput, barcodes: np.ndarray, *, cache_dir: Path | None = None) -> Positions | None:
    """The cells' centroids (from the geometry) and the spatial folder's image, or None without geometry.

    With ``cache_dir``, the centroids are kept in ``cell_positions-<sha>.npz`` keyed on the
    geometry file's size and modification time and the barcodes, so a rerun or a summary
    rebuild does not parse the GeoJSON again.
    """
    if vis.geometry is None:
        return None
    geo = vis.geometry
    st = geo.stat()
    bc = np.asarray(barcodes).astype(str)
    key = hashlib.sha256(json.dumps([str(geo.resolve()), st.st_size, st.st_mtime_ns, len(bc)]).encode()
                         + "\n".join(bc.tolist()).encode()).hexdigest()[:16]
    cache = cache_dir / f"cell_positions-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            c = {"xy": z["xy"], "area": z["area"], "polygons": int(z["polygons"]), "matched": int(z["matched"])}
    else:
        c = read_centroids(geo, bc)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, xy=c["xy"], area=c["area"], polygons=c["polygons"], matched=c["matched"])
            tmp.replace(cache)
    sp = read_spatial_dir(vis.spatial_dir)
    sf = dict(sp["scalefactors"])
    # sc.pl.spatial needs a spot size; segmented outputs have none: a typical cell's diameter (median polygon area)
    areas = c["area"][np.isfinite(c["area"]) & (c["area"] > 0)]
    if "spot_diameter_fullres" not in sf and areas.size:
        sf["spot_diameter_fullres"] = float(2.0 * np.sqrt(np.median(areas) / np.pi))
    rec = {"cell_geometry": str(geo), "polygons": c["polygons"], "cells_placed": c["matched"], "cells": len(bc),
           "spatial_dir": str(vis.spatial_dir) if vis.spatial_dir else None, "lowres_image": sp["lowres"] is not None,
           "scalefactors": sf}
    return Positions(xy=c["xy"], scalefactors=sf, lowres=sp["lowres"], source=geo.name, record=rec)


def positions_for_record(record: dict, barcodes: np.ndarray, *, cache_dir: Path | None = None) -> Positions | None:
    """The positions of a finished run again (``run.json``'s ``input.visium``), or None.

    Used when the summary is rebuilt; a geometry file that has gone since the run
    leaves the map out rather than failing the rebuild.
    """
    v = (record.get("input") or {}).get("visium") or {}
    geo = v.get("cell_geometry")
    if not geo or not Path(geo).is_file():
        return None
    vis = VisiumInput(given=Path(v.get("given") or geo), matrix=Path(v.get("matrix") or geo), geometry=Path(geo),
                      spatial_dir=Path(v["spatial_dir"]) if v.get("spatial_dir") and Path(v["spatial_dir"]).is_dir() else None)
    return positions(vis, barcodes, cache_dir=cache_dir)
