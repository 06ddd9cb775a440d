"""Write the small Visium HD example tree tests/data/visium_hd_tiny/ (used by docs/visium-hd.md).

    python scripts/make_visium_hd_example.py

Counts: the first 400 cells of the package's example (10x pbmc4k, real). Cell outlines,
positions, the tissue image and the scale factors are synthetic (tests/visium_tree.py
says how); only segmented_outputs/ is written (no binned_outputs/), Space Ranger 4 names.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import visium_tree  # noqa: E402

DEST = ROOT / "tests" / "data" / "visium_hd_tiny"


def main() -> None:
    if DEST.exists():
        shutil.rmtree(DEST)
    visium_tree.write_outs(DEST, n=400, binned=False, extra_raw_cells=25, seed=7)
    (DEST / "SOURCE.txt").write_text(
        "Written by scripts/make_visium_hd_example.py.\n"
        "Counts: the first 400 cells of dask_annot/data/example/pbmc4k_800cells.h5 (10x Genomics pbmc4k, CC BY 4.0), real.\n"
        "Synthetic: cell ids/barcodes (cellid_000000001-1 ...), the square cell outlines and their positions in\n"
        "cell_segmentations.geojson, tissue_lowres_image.png (a drawn ellipse) and scalefactors_json.json (typical values).\n"
        "Layout: Space Ranger 4 outs/segmented_outputs/ as described in ../shared/VISIUM_HD.md.\n")
    total = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"{DEST}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
