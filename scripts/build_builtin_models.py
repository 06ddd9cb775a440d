"""Rebuild the built-in models and the bundled example from the real data in ../shared.

    python scripts/build_builtin_models.py [--shared ../shared] [--only knn|pan|example]

Writes dask_annot/data/models/{human_pbmc_v1,mouse_immune_v1,pan_human_v1,pan_mouse_v1}/ and
dask_annot/data/example/pbmc4k_800cells.h5. The package never reads ../shared
at run time: this script is how what it ships was made.

Sources (see ../shared/data/README.md):
- human_pbmc_v1: Zheng et al. 2017 FACS-sorted PBMC, 3,500 cells, 7 sorted types
  (via scMINER, Apache-2.0); labels mapped to Cell Ontology terms.
- mouse_immune_v1: ACTINN's mouse immune training set, 1,000 cells, 5 types.
- pan_human_v1 / pan_mouse_v1: marker models from the HuBMAP ASCT+B tables (CC BY 4.0)
  by scripts/asctb_markers.py; mouse symbols by case mapping, kept where the symbol is a
  gene of the shared mouse data sets (the union of their gene lists: a vocabulary only,
  no labels are read).
- example: 800 cells (seeded sample) of 10x Genomics' pbmc4k as filtered by SoupX's
  PBMC data, written as a Cell Ranger v3 HDF5 (features: the 33,694 GRCh38 symbols).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dask_annot"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--only", default=None, choices=["knn", "pan", "example"], help="rebuild only these")
    a = ap.parse_args()
    shared = Path(a.shared) / "data"
    from dask_annot import h5
    from dask_annot.build import build_reference

    models = PKG / "data" / "models"
    models.mkdir(parents=True, exist_ok=True)
    if a.only in (None, "pan"):
        build_pan_models(Path(a.shared), models)
    if a.only == "pan":
        return
    specs = [
        ("human_pbmc_v1", shared / "pbmc_sorted_zheng2017" / "pbmc_sorted_3500.h5ad", "trueLabel", "pbmc_sorted_zheng2017.csv", "human", ()),
        ("mouse_immune_v1", shared / "mouse_immune_actinn" / "actinn_train_1000cells.h5ad", "cell_type", "mouse_immune_actinn.csv", "mouse", ()),
    ]
    # Ensembl ids for the models' symbols, so real 10x files match by id: the GRCh38 (2020-A)
    # feature table of a real Cell Ranger 6.0 file. No mouse table with Ensembl ids is at hand
    # (the Space Ranger mouse file is a 1,000-probe panel), so the mouse model keeps symbols.
    id_tables = {"human": shared / "tenx_h5_format_tests" / "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5"}
    for name, path, col, mp, species, excl in specs if a.only in (None, "knn") else ():
        out = models / name
        if out.exists():
            shutil.rmtree(out)
        build_reference(path, label_column=col, name=name, output=out, ontology_map=PKG / "data" / "maps" / mp,
                        species=species, exclude_labels=excl, version="1", gene_id_table=id_tables.get(species))
        print("built", out)
    if a.only not in (None, "example"):
        return
    example = PKG / "data" / "example"
    example.mkdir(parents=True, exist_ok=True)
    info = h5.open_matrix(shared / "pbmc4k_soupx" / "pbmc4k_2170cells_soupx_labels.h5ad")
    X = h5.read_cells(info, 0, info.n_cells)
    rng = np.random.default_rng(4000)
    pick = np.sort(rng.choice(info.n_cells, size=800, replace=False))
    h5.write_10x_h5(example / "pbmc4k_800cells.h5", X[pick], barcodes=[f"{b}-1" for b in info.barcodes[pick]],
                    feature_ids=info.feature_ids, feature_names=info.feature_names, genome="GRCh38")
    print("wrote", example / "pbmc4k_800cells.h5")


MOUSE_VOCABULARY = ("mouse_immune_actinn/actinn_train_1000cells.h5ad", "mouse_tissue/zilionis_mouse_lung_immune_800cells.h5ad",
                    "mouse_tissue/bastidas_mouse_pancreas_e15_739cells.h5ad")


def build_pan_models(shared_root: Path, models: Path) -> None:
    """pan_human_v1 and pan_mouse_v1 from the ASCT+B tables (see scripts/asctb_markers.py)."""
    import importlib.util
    import tempfile

    from dask_annot import h5
    from dask_annot.build import build_marker_reference

    spec = importlib.util.spec_from_file_location("asctb_markers", ROOT / "scripts" / "asctb_markers.py")
    asctb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(asctb)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = set()
        for rel in MOUSE_VOCABULARY:
            info = h5.open_matrix(shared_root / "data" / rel)
            vocab.update(str(x) for x in info.feature_names)
        (tmp / "mouse_genes.txt").write_text("\n".join(sorted(vocab)) + "\n")
        asctb.main(["--shared", str(shared_root), "--output", str(tmp / "human.csv")])
        asctb.main(["--shared", str(shared_root), "--output", str(tmp / "mouse.csv"), "--species", "mouse",
                    "--mouse-genes", str(tmp / "mouse_genes.txt")])
        for name, table, species in (("pan_human_v1", "human.csv", "human"), ("pan_mouse_v1", "mouse.csv", "mouse")):
            out = models / name
            if out.exists():
                shutil.rmtree(out)
            build_marker_reference(tmp / table, name=name, output=out, species=species, version="1")
            print("built", out)


if __name__ == "__main__":
    main()
