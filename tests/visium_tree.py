"""Small Space Ranger 4 ``outs/`` trees (Visium HD) written from real counts, for the tests.

Real: the counts, genes and feature table are the package's example matrix (800 cells
of 10x's pbmc4k, Cell Ranger v3 HDF5). Synthetic, and only for layout: the cells'
positions and outlines (axis-aligned squares of about 10 µm, as Space Ranger's
"Manhattan" contours of 2 µm bins are, at random places in an ellipse of tissue), the
tissue image (a drawn pink ellipse, no real microscopy), the scale factors (typical
values of real Visium HD runs), and the binned matrices (the same real cells relabelled
as 8 µm bins). barcode_mappings.parquet, tissue_positions.parquet and feature_slice.h5
are not written (they need pyarrow, and dask-annot does not read them).

File names, barcode forms, GeoJSON content and scale factor keys follow
``../shared/VISIUM_HD.md`` (Space Ranger 4.0.1 sources).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dask_annot import h5
from dask_annot.cli import example_path

MICRONS_PER_PIXEL = 0.2738
FULLRES = (6000, 4400)  # width, height of the (imaginary) full-resolution microscope image, px
LOWRES_SCALEF = 600 / 6000
HIRES_SCALEF = 0.2


def example_counts(n: int | None = None):
    """The example's cells x genes counts (CSR), feature ids and names (real data)."""
    info = h5.open_matrix(example_path())
    X = h5.read_cells(info, 0, info.n_cells if n is None else min(n, info.n_cells))
    return X, np.asarray(info.feature_ids, dtype=str), np.asarray(info.feature_names, dtype=str)


def _layout_cells(n: int, seed: int) -> tuple[np.ndarray, float]:
    """Cell centres (full-res px) in an ellipse of tissue, and the square's half side."""
    rng = np.random.default_rng(seed)
    cx, cy, ax, ay = FULLRES[0] * 0.5, FULLRES[1] * 0.5, FULLRES[0] * 0.38, FULLRES[1] * 0.36
    pts = []
    while len(pts) < n:
        x, y = rng.uniform(-1, 1, 2)
        if x * x + y * y <= 1:
            pts.append((cx + x * ax, cy + y * ay))
    half = 5.0 / MICRONS_PER_PIXEL  # 10 µm squares
    return np.round(np.asarray(pts), 1), half


def geojson_text(ids: np.ndarray, centres: np.ndarray, half: float) -> str:
    """A FeatureCollection as Space Ranger writes it (python geojson.dump: one line, no name/id/crs)."""
    feats = []
    for cid, (x, y) in zip(ids.tolist(), centres.tolist()):
        x0, y0, x1, y1 = round(x - half, 1), round(y - half, 1), round(x + half, 1), round(y + half, 1)
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"cell_id": int(cid)}})
    return json.dumps({"type": "FeatureCollection", "features": feats})


def _tissue_png(path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h = round(FULLRES[0] * LOWRES_SCALEF), round(FULLRES[1] * LOWRES_SCALEF)
    im = Image.new("RGB", (w, h), (246, 244, 247))
    d = ImageDraw.Draw(im)
    d.ellipse([w * 0.1, h * 0.12, w * 0.9, h * 0.88], fill=(226, 170, 196), outline=(190, 120, 160), width=3)
    d.ellipse([w * 0.3, h * 0.3, w * 0.55, h * 0.6], fill=(205, 140, 180))
    im.save(path)


def _scalefactors(binned_um: int | None = None) -> dict:
    sf = {"microns_per_pixel": MICRONS_PER_PIXEL, "tissue_lowres_scalef": LOWRES_SCALEF,
          "fiducial_diameter_fullres": 1248.6, "tissue_hires_scalef": HIRES_SCALEF, "regist_target_img_scalef": HIRES_SCALEF}
    if binned_um is not None:
        sf["spot_diameter_fullres"] = binned_um / MICRONS_PER_PIXEL
        sf["bin_size_um"] = float(binned_um)
    return sf


def _spatial(d: Path, binned_um: int | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "scalefactors_json.json").write_text(json.dumps(_scalefactors(binned_um), indent=4))
    _tissue_png(d / "tissue_lowres_image.png")


def write_outs(root: Path, *, n: int | None = None, segmented: bool = True, binned: bool = True,
               extra_raw_cells: int = 40, seed: int = 0) -> Path:
    """Write ``root/outs`` and return it.

    segmented: ``segmented_outputs/`` with the filtered cell matrix (ids 1..n, in order),
    ``cell_segmentations.geojson`` (those cells and ``extra_raw_cells`` more that did not
    pass filtering, as the real file holds every segmented cell) and ``spatial/``.
    binned: ``binned_outputs/square_002um|008um|016um/`` with the same counts as bins
    (only square_008um gets a matrix and spatial folder, to keep the tree small).
    """
    X, fids, fnames = example_counts(n)
    ncells = X.shape[0]
    outs = root / "outs"
    if segmented:
        seg = outs / "segmented_outputs"
        seg.mkdir(parents=True, exist_ok=True)
        ids = np.arange(1, ncells + 1)
        h5.write_10x_h5(seg / "filtered_feature_cell_matrix.h5", X, barcodes=[f"cellid_{i:09d}-1" for i in ids],
                        feature_ids=fids, feature_names=fnames, genome="GRCh38")
        centres, half = _layout_cells(ncells + extra_raw_cells, seed)
        # the raw cells that did not pass filtering take ids after the filtered ones, and come first in the file
        all_ids = np.concatenate([np.arange(ncells + 1, ncells + extra_raw_cells + 1), ids])
        all_c = np.concatenate([centres[ncells:], centres[:ncells]])
        (seg / "cell_segmentations.geojson").write_text(geojson_text(all_ids, all_c, half))
        _spatial(seg / "spatial")
    if binned:
        for size in (2, 8, 16):
            b = outs / "binned_outputs" / f"square_{size:03d}um"
            b.mkdir(parents=True, exist_ok=True)
            if size != 8:
                continue
            side = int(np.ceil(np.sqrt(ncells)))
            bcs = [f"s_008um_{i // side:05d}_{i % side:05d}-1" for i in range(ncells)]
            h5.write_10x_h5(b / "filtered_feature_bc_matrix.h5", X, barcodes=bcs, feature_ids=fids, feature_names=fnames,
                            genome="GRCh38")
            _spatial(b / "spatial", binned_um=size)
    return outs


def expected_centroids(n: int, *, extra_raw_cells: int = 40, seed: int = 0) -> np.ndarray:
    """The centroids :func:`write_outs` placed the filtered cells at (matrix order)."""
    centres, _ = _layout_cells(n + extra_raw_cells, seed)
    return centres[:n]
