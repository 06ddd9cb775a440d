"""The Visium HD tissue map at scale: page size, build time and render time in headless Chromium.

    python benchmarks/visium_map.py --cells 2000 1200000 [--geojson 1200000]

Data (synthetic, as no real Visium HD run can be downloaded here): a cell_types table
shaped like a real run's (27 fine types in 6 coarse types, UMIs log-normal), cells at
uniform random places in an ellipse of tissue 6000 x 4400 full-resolution px, a plain
600 x 440 px low-res image. The page is written by dask_annot.summary exactly as a run
writes it, then opened from a file in Debian's chromium (headless, DevTools protocol on a
pipe, the test suite's driver); "render" is the navigation's load event end
(``performance.getEntriesByType('navigation')[0].loadEventEnd``, images decoded by then)
plus two animation frames, median of 3 loads.

``--geojson N`` also writes a cell_segmentations.geojson of N square cells in Space
Ranger's one-line layout and times dask_annot.visium.read_centroids on it (streamed with
ijson), in a child process so its peak RSS is its own.

Results go to benchmarks/results/visium_map.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dask_annot import summary  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def table(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    fine_names = np.array([f"fine type {i}" for i in range(27)], dtype=object)
    coarse_of = np.array([f"coarse {i % 6}" for i in range(fine_names.size)], dtype=object)
    fine = rng.integers(0, fine_names.size, n)
    umi = rng.lognormal(6.0, 1.0, n).astype(np.int64)
    coarse = np.where(umi < 100, "Low UMI Barcode", coarse_of[fine])
    df = pd.DataFrame({"barcode": [f"cellid_{i + 1:09d}-1" for i in range(n)], "coarse_cell_type": coarse,
                       "fine_cell_type": fine_names[fine], "cell_count_in_model": rng.integers(1, 501, n),
                       "coarse_cell_type_unfiltered": coarse_of[fine], "umi_count": umi})
    emb = (rng.normal(size=(n, 2)) + fine[:, None] * 0.3).astype(np.float32)
    record = {"run_id": f"bench_{n}", "reference": {"name": "atlas", "version": "1", "species": "human", "cells": 1_000_000,
              "genes": 2000, "pcs": 30}, "parameters": {"k_used": 500, "k_requested": 500, "vote": "plurality (10x)",
              "low_umi_threshold": 100}, "versions": {"dask-annot": "bench"}, "input": {"path": "segmented_outputs/filtered_feature_cell_matrix.h5"}}
    t = rng.uniform(0, 2 * np.pi, n)
    r = np.sqrt(rng.uniform(0, 1, n))
    xy = np.c_[3000 + 2300 * r * np.cos(t), 2200 + 1600 * r * np.sin(t)]
    img = np.full((440, 600, 3), (230, 190, 210), dtype=np.uint8)
    sp = summary.Spatial(xy=xy, image=img, lowres_scale=0.1, microns_per_pixel=0.2738, source="cell_segmentations.geojson")
    return df, record, emb, sp


def render_in_chromium(page: Path, loads: int = 3) -> dict:
    from tests.test_summary import CHROMIUM, Browser

    if not CHROMIUM.exists():
        return {"error": f"{CHROMIUM} missing: run scripts/test-prereqs.sh"}
    times, wall = [], []
    with tempfile.TemporaryDirectory() as prof:
        b = Browser(Path(prof))
        try:
            for _ in range(loads):
                b.events.clear()
                t0 = time.perf_counter()
                b.open(page, timeout=300)
                wall.append(time.perf_counter() - t0)
                times.append(b.eval("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000.0)
                b.call("Page.navigate", {"url": "about:blank"}, session=True)
                time.sleep(0.5)
            problems = b.problems()
            ok = b.eval("1") == 1
        finally:
            b.close()
    return {"load_event_s_median": round(statistics.median(times), 3), "open_wall_s_median": round(statistics.median(wall), 3),
            "loads": loads, "console_problems": problems, "ok": ok}


def bench_page(n: int, out: Path) -> dict:
    df, record, emb, sp = table(n)
    t0 = time.perf_counter()
    page = out / f"web_summary_{n}.html"
    summary.write_web_summary(page, record=record, cell_types=df, embedding2d=emb, spatial=sp)
    build = time.perf_counter() - t0
    res = {"cells": n, "page_bytes": page.stat().st_size, "page_mb": round(page.stat().st_size / 1e6, 3),
           "build_s": round(build, 2)}
    res.update(render_in_chromium(page))
    return res


GEOJSON_CHILD = r"""
import json, resource, sys, time
import numpy as np
from dask_annot import visium
n = int(sys.argv[2])
t0 = time.perf_counter()
c = visium.read_centroids(sys.argv[1], np.array([f"cellid_{i + 1:09d}-1" for i in range(n)]))
dt = time.perf_counter() - t0
print(json.dumps({"read_s": round(dt, 2), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
                  "matched": c["matched"], "polygons": c["polygons"]}))
"""


def bench_geojson(n: int, out: Path) -> dict:
    rng = np.random.default_rng(1)
    path = out / "cell_segmentations.geojson"
    half = 18.3
    with open(path, "w") as fh:  # Space Ranger's layout, written in pieces
        fh.write('{"type": "FeatureCollection", "features": [')
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            c = np.round(rng.uniform([200, 200], [5800, 4200], size=(m, 2)), 1)
            parts = []
            for j, (x, y) in enumerate(c.tolist()):
                x0, y0, x1, y1 = round(x - half, 1), round(y - half, 1), round(x + half, 1), round(y + half, 1)
                parts.append('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[%s, %s], [%s, %s], [%s, %s], '
                             '[%s, %s], [%s, %s]]]}, "properties": {"cell_id": %d}}' % (x0, y0, x1, y0, x1, y1, x0, y1, x0, y0, start + j + 1))
            fh.write((", " if start else "") + ", ".join(parts))
        fh.write("]}")
    size = path.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", GEOJSON_CHILD, str(path), str(n)], capture_output=True, text=True, env=env, check=True)
    res = {"cells": n, "geojson_mb": round(size / 1e6, 1), **json.loads(r.stdout)}
    path.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[2000, 1_200_000])
    ap.add_argument("--geojson", type=int, default=None, help="also time read_centroids on a GeoJSON of this many cells")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "pages": [], "geojson": None}
    prev = RESULTS / "visium_map.json"
    if not a.geojson and prev.is_file():  # keep the last GeoJSON measurement when only pages are rerun
        out["geojson"] = json.loads(prev.read_text()).get("geojson")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.cells:
            r = bench_page(n, Path(tmp))
            print(json.dumps(r), flush=True)
            out["pages"].append(r)
        if a.geojson:
            out["geojson"] = bench_geojson(a.geojson, Path(tmp))
            print(json.dumps(out["geojson"]), flush=True)
    (RESULTS / "visium_map.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Visium HD tissue map: page size and render time", "",
             "`python benchmarks/visium_map.py " + " ".join(sys.argv[1:]) + "` (synthetic positions and labels; see the script).", "",
             "| cells | page | build (Python) | load event in Chromium (median of 3) | console |", "|---|---|---|---|---|"]
    for r in out["pages"]:
        lines.append(f"| {r['cells']:,} | {r['page_mb']} MB | {r['build_s']} s | {r.get('load_event_s_median', '–')} s | "
                     f"{'clean' if not r.get('console_problems') else r.get('console_problems')} |")
    if out["geojson"]:
        g = out["geojson"]
        lines += ["", f"cell_segmentations.geojson of {g['cells']:,} cells ({g['geojson_mb']} MB): read_centroids (ijson, streamed) "
                  f"{g['read_s']} s, peak RSS of the reading process {g['peak_rss_gb']} GB."]
    (RESULTS / "visium_map.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
