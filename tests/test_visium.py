"""Visium HD: Space Ranger outs/ as input, bins refused, cell geometry, the tissue map, scanpy.

The outs/ trees are written by ``tests/visium_tree.py`` from the package's real example
counts; the cells' positions, outlines and tissue image there are synthetic (see that file).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_annot import summary, visium
from dask_annot.cli import main
from dask_annot.errors import InputFormatError, InputNotFoundError

from . import visium_tree
from .test_summary import _synthetic, keep_screenshot
from .test_summary import browser, chromium  # noqa: F401  (fixtures)

N = 800  # the example's cells


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("visium")
    return {"full": visium_tree.write_outs(base / "full"), "binned": visium_tree.write_outs(base / "binned", segmented=False)}


@pytest.fixture(scope="module")
def outs_run(trees, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["annotate", "--id", "s", "--matrix", str(trees["full"]), "--output-dir", str(out), "--quiet"]) == 0
    mdir = out / "s/outs/segmented_outs/cell_types/human_pbmc_v1"
    return mdir, json.loads((mdir / "run.json").read_text())


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# ----------------------------------------------------------------------------- resolving --matrix


def test_outs_tree_is_annotated_from_the_segmented_cell_matrix(outs_run, trees):
    mdir, rec = outs_run
    seg = trees["full"] / "segmented_outputs"
    assert rec["input"]["path"] == str((seg / "filtered_feature_cell_matrix.h5").resolve())
    v = rec["input"]["visium"]
    assert v["given"] == str(trees["full"]) and v["bins"] is None
    assert v["cell_geometry"] == str(seg / "cell_segmentations.geojson")
    assert (v["polygons"], v["cells_placed"], v["cells"]) == (N + 40, N, N)  # raw cells beyond the filtered ones are skipped
    assert v["scalefactors"]["tissue_lowres_scalef"] == visium_tree.LOWRES_SCALEF and v["lowres_image"] is True
    ct = pd.read_csv(mdir / "cell_types.csv")
    assert len(ct) == N and ct["barcode"].iloc[0] == "cellid_000000001-1"
    assert "warnings" not in rec
    page = (mdir / "web_summary.html").read_text()
    assert '<section id="tissue">' in page and page.count('src="data:image/png;base64,') == 2
    assert f"{N:,} of {N:,} cells at the centroid" in page and "low-resolution tissue image" in page


def test_run_dir_segmented_dir_and_matrix_file_resolve_to_the_same_cells(trees):
    seg = trees["full"] / "segmented_outputs"
    m = seg / "filtered_feature_cell_matrix.h5"
    for given in (trees["full"].parent, trees["full"], seg, m):
        vis = visium.resolve(given)
        assert vis.matrix == m, given
        assert vis.geometry == seg / "cell_segmentations.geojson" and vis.spatial_dir == seg / "spatial"
    plain = visium.resolve(visium_tree.example_path())
    assert plain.matrix == plain.given and plain.geometry is None and plain.spatial_dir is None


def test_binned_only_tree_is_refused_naming_bin_and_expected_file(trees, tmp_path, capsys):
    code = main(["annotate", "--id", "s", "--matrix", str(trees["binned"]), "--output-dir", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == InputFormatError.exit_code == 4
    assert len(err) == 1 and err[0].startswith("dask-annot: error: ")
    assert "square_008um" in err[0] and "segmented_outputs/filtered_feature_cell_matrix.h5" in err[0] and "--allow-bins" in err[0]
    assert _files(tmp_path / "o") == []  # nothing written


def test_binned_h5_passed_directly_is_refused(trees, tmp_path, capsys):
    h5 = trees["full"] / "binned_outputs/square_008um/filtered_feature_bc_matrix.h5"
    code = main(["annotate", "--id", "s", "--matrix", str(h5), "--output-dir", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 4
    assert "s_008um_00000_00000-1" in err and "8 µm bins" in err and "square_008um" in err
    assert "segmented_outputs/filtered_feature_cell_matrix.h5" in err and "--allow-bins" in err
    assert _files(tmp_path / "o") == []


def test_allow_bins_runs_and_warns_in_run_json_and_summary(trees, tmp_path, capsys):
    code = main(["annotate", "--id", "s", "--matrix", str(trees["binned"]), "--allow-bins", "--output-dir", str(tmp_path), "--quiet"])
    assert code == 0
    assert "warning: annotated 8 µm bins" in capsys.readouterr().err
    mdir = tmp_path / "s/outs/segmented_outs/cell_types/human_pbmc_v1"
    rec = json.loads((mdir / "run.json").read_text())
    assert len(rec["warnings"]) == 1 and "will not perform as intended on bins" in rec["warnings"][0]
    assert rec["input"]["visium"]["bins"] == "square_008um"
    assert rec["input"]["path"].endswith("binned_outputs/square_008um/filtered_feature_bc_matrix.h5")
    page = (mdir / "web_summary.html").read_text()
    assert 'class="warnbox"' in page and "will not perform as intended on bins" in page
    assert pd.read_csv(mdir / "cell_types.csv")["barcode"].iloc[0].startswith("s_008um_")


def test_missing_cell_geometry_is_a_clear_error(trees, tmp_path, capsys):
    code = main(["annotate", "--id", "s", "--matrix", str(trees["full"]), "--cell-geometry", str(tmp_path / "nope.geojson"),
                 "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert code == InputNotFoundError.exit_code
    assert "nope.geojson: no such file; --cell-geometry" in capsys.readouterr().err
    assert _files(tmp_path / "o") == []


# ----------------------------------------------------------------------------- geometry


def test_centroids_join_by_cell_id_in_matrix_order(trees):
    geo = trees["full"] / "segmented_outputs/cell_segmentations.geojson"
    text = geo.read_text()
    assert text.startswith('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon"')
    assert "\n" not in text.strip()
    # the matrix in a shuffled order: centroids follow the barcodes, not the file
    order = np.random.default_rng(1).permutation(N)
    barcodes = np.array([f"cellid_{i + 1:09d}-1" for i in order])
    c = visium.read_centroids(geo, barcodes)
    expected = visium_tree.expected_centroids(N)[order]
    assert c["polygons"] == N + 40 and c["matched"] == N
    np.testing.assert_allclose(c["xy"], expected, atol=0.06)  # squares' corners are rounded to 0.1 px
    side = 2 * round(5.0 / visium_tree.MICRONS_PER_PIXEL, 1)
    np.testing.assert_allclose(c["area"], side ** 2, rtol=0.01)
    # barcodes without a polygon get NaN; a cell_id is the bare integer of the barcode
    extra = np.append(barcodes[:3], "cellid_000999999-1")
    c2 = visium.read_centroids(geo, extra)
    assert np.isnan(c2["xy"][3]).all() and np.isfinite(c2["xy"][:3]).all()


def test_centroid_of_an_l_shaped_manhattan_outline():
    ring = [[0, 0], [4, 0], [4, 2], [2, 2], [2, 4], [0, 4], [0, 0]]
    cx, cy, area = visium.ring_centroid(ring)
    assert area == pytest.approx(12.0)
    assert (cx, cy) == pytest.approx((5 / 3, 5 / 3))  # not the vertex mean (1.71, 1.71)


def test_geometry_of_another_run_or_not_geojson_is_refused(tmp_path):
    other = tmp_path / "other.geojson"
    other.write_text(visium_tree.geojson_text(np.array([5_000_001, 5_000_002]), np.array([[1.0, 1.0], [9.0, 9.0]]), 2.0))
    with pytest.raises(InputFormatError, match="none of its 2 polygons' cell_id matches a barcode"):
        visium.read_centroids(other, np.array(["cellid_000000001-1"]))
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coord')
    with pytest.raises(InputFormatError, match="not a readable GeoJSON FeatureCollection"):
        visium.read_centroids(broken, np.array(["cellid_000000001-1"]))


# ----------------------------------------------------------------------------- the tissue map in a browser


def _spatial_table(n: int, seed: int = 0):
    """A run's tables for n cells with positions in a tissue ellipse and a low-res image (synthetic)."""
    from PIL import Image

    df, record, emb, de = _synthetic(n, seed=seed)
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, n)
    r = np.sqrt(rng.uniform(0, 1, n))
    xy = np.c_[3000 + 2300 * r * np.cos(t), 2200 + 1600 * r * np.sin(t)]
    img = Image.new("RGB", (600, 440), (230, 190, 210))
    sp = summary.Spatial(xy=xy, image=np.asarray(img), lowres_scale=0.1, microns_per_pixel=0.2738, source="cell_segmentations.geojson")
    return df, record, emb, de, sp


def _check_tissue_map(browser, page: Path, tmp_path: Path, shot: str) -> float:
    import time

    t0 = time.perf_counter()
    browser.open(page)
    opened = time.perf_counter() - t0
    assert browser.problems() == []
    assert browser.eval("document.querySelectorAll('main > section').length") == 8
    assert browser.eval("document.querySelector('main > section:nth-of-type(2)').id") == "tissue"
    # both PNGs decoded at their full size; the fine one shows after its tab is clicked
    assert browser.eval("[...document.querySelectorAll('img.tissue')].every(i => i.complete && i.naturalWidth === 1000)") is True
    assert browser.eval("document.querySelector('#tis-0 img.tissue').getBoundingClientRect().width") > 300
    assert browser.eval("document.getElementById('tis-1').hidden") is True
    browser.eval("document.querySelector('[data-tab=\"tis-1\"]').click()")
    assert browser.eval("document.getElementById('tis-1').hidden") is False
    assert browser.eval("document.querySelector('#tis-1 img.tissue').getBoundingClientRect().width") > 300
    browser.eval("document.querySelector('[data-tab=\"tis-0\"]').click()")
    browser.eval("document.getElementById('tissue').scrollIntoView()")
    assert browser.problems() == []
    path = browser.screenshot(tmp_path / shot)
    keep_screenshot(path, shot)
    return opened


@pytest.mark.browser
def test_tissue_map_of_the_outs_run_renders_in_chromium(browser, outs_run, tmp_path):
    mdir, _ = outs_run
    _check_tissue_map(browser, mdir / "web_summary.html", tmp_path, "visium_tissue_map.png")


@pytest.mark.browser
def test_tissue_map_of_2000_cells_renders_in_chromium(browser, tmp_path):
    df, record, emb, de, sp = _spatial_table(2000)
    page = tmp_path / "web_summary.html"
    summary.write_web_summary(page, record=record, cell_types=df, embedding2d=emb, de=de, spatial=sp)
    assert page.stat().st_size < 600_000
    _check_tissue_map(browser, page, tmp_path, "visium_tissue_map_2k.png")


def test_tissue_map_is_deterministic_and_pixels_hold_the_types_colours():
    from PIL import Image
    import base64
    import io
    import re

    df, record, emb, de, sp = _spatial_table(3000, seed=3)
    a = summary.render_web_summary(record=record, cell_types=df, embedding2d=emb, de=de, spatial=sp)
    order = np.random.default_rng(0).permutation(len(df))  # same cells, other order: same picture
    sp2 = summary.Spatial(xy=sp.xy[order], image=sp.image, lowres_scale=0.1, microns_per_pixel=0.2738, source=sp.source)
    b = summary.render_web_summary(record=record, cell_types=df.iloc[order].reset_index(drop=True), embedding2d=emb[order],
                                   de=de, spatial=sp2)
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', a)
    assert pngs == re.findall(r'src="data:image/png;base64,([^"]+)"', b) and len(pngs) == 2
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[0]))).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(img, axis=0).tolist()}
    d = summary.prepare(record, df, emb, de, sp)
    for name in d.coarse_names:  # every coarse type's colour is on the map (cells at 90% over the faded tissue)
        rgb = np.array([int(d.coarse_colour[name][i:i + 2], 16) for i in (1, 3, 5)])
        assert any(np.abs(np.array(c) - rgb).max() <= 26 for c in colours), name


def test_positions_wrong_length_is_refused():
    df, record, emb, de, sp = _spatial_table(100)
    sp.xy = sp.xy[:50]
    with pytest.raises(ValueError, match=r"expected \(100, 2\)"):
        summary.render_web_summary(record=record, cell_types=df, spatial=sp)


# ----------------------------------------------------------------------------- the ecosystem: add_to_anndata, scanpy


def _annotated_adata(trees, tmp_path):
    import anndata

    import dask_annot

    labels = dask_annot.annotate(str(trees["full"]), quiet=True, output_dir=tmp_path / "api", run_id="hd")
    sp = labels.attrs["dask_annot"]["spatial"]
    assert sp["library_id"] == "hd" and sp["xy"].shape == (N, 2)
    obs = pd.DataFrame(index=labels.index[::-1].astype(str))  # another order: matched by barcode
    adata = anndata.AnnData(X=np.zeros((N, 1), np.float32), obs=obs)
    dask_annot.add_to_anndata(adata, labels)
    return adata, labels


def test_add_to_anndata_writes_spatial_in_scanpys_layout(trees, tmp_path):
    adata, labels = _annotated_adata(trees, tmp_path)
    expected = visium_tree.expected_centroids(N)[::-1]
    np.testing.assert_allclose(adata.obsm["spatial"], expected, atol=0.06)
    lib = adata.uns["spatial"]["hd"]
    assert lib["images"]["lowres"].shape == (440, 600, 3) and lib["images"]["lowres"].dtype == np.uint8
    sf = lib["scalefactors"]
    assert sf["tissue_lowres_scalef"] == visium_tree.LOWRES_SCALEF and sf["microns_per_pixel"] == visium_tree.MICRONS_PER_PIXEL
    assert sf["spot_diameter_fullres"] == pytest.approx(2 * np.sqrt((2 * 18.3) ** 2 / np.pi), rel=0.01)
    # the AnnData round-trips through .h5ad with it
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    import anndata

    back = anndata.io.read_h5ad(path)
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])


SCANPY_SCRIPT = r"""
import sys, anndata, matplotlib
matplotlib.use("Agg")
import numpy as np, scanpy as sc
a = anndata.io.read_h5ad(sys.argv[1])
ax = sc.pl.spatial(a, color="coarse_cell_type", library_id="hd", img_key="lowres", show=False, return_fig=False)
fig = (ax[0] if isinstance(ax, list) else ax).get_figure()
fig.savefig(sys.argv[2], dpi=80)
print("drawn", sc.__version__, len((ax[0] if isinstance(ax, list) else ax).collections))
"""


def _python_with_scanpy() -> str:
    """A Python that has scanpy: this one, or DASK_ANNOT_SCANPY_PYTHON (a venv, see the note); else skip."""
    for py in (sys.executable, os.environ.get("DASK_ANNOT_SCANPY_PYTHON")):
        if py and subprocess.run([py, "-c", "import scanpy"], capture_output=True).returncode == 0:
            return py
    pytest.skip("scanpy is not installed: `pip install 'dask-annot[spatial]'` (or point DASK_ANNOT_SCANPY_PYTHON at a "
                "Python that has it) to run the sc.pl.spatial check")


def test_scanpy_pl_spatial_draws_add_to_anndatas_result(trees, tmp_path):
    py = _python_with_scanpy()
    adata, _ = _annotated_adata(trees, tmp_path)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    script = tmp_path / "draw.py"
    script.write_text(SCANPY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = subprocess.run([py, str(script), str(path), str(tmp_path / "spatial.png")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("drawn")
    assert (tmp_path / "spatial.png").stat().st_size > 10_000
    keep_screenshot(tmp_path / "spatial.png", "visium_sc_pl_spatial.png")
