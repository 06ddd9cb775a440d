"""Accuracy of the built-in marker models (issue 12's bars) on labelled real data.

    PYTHONPATH=. python benchmarks/markers.py [--shared ../shared] [--out benchmarks/results/markers.md]
                                             [--datasets pbmc4k,sorted,...] [--no-pool]

Each dataset is annotated by ``pipeline.run`` with the built-in marker model of its
species (no training on these data: the models are built from the ASCT+B tables only),
hierarchical layout, and the calls are compared with the dataset's own labels at a shared
level. A call counts at the shared level when it is confident at least to the coarse level
and its Cell Ontology term descends from the level's term (e.g. any T cell subtype is "T").
``NCA`` = the fraction of cells ``Unassigned`` or ``Coarse Not Confidently Annotated``;
accuracy is over ALL cells (an NCA cell counts as wrong) and, in brackets, over confident cells.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# shared level: name -> CL terms whose descendants (themselves included) count as it
GROUPS = {
    "B": ["CL:0000236", "CL:0000945"], "T": ["CL:0000084"], "NK": ["CL:0000623"],
    "monocyte": ["CL:0000113", "CL:0000576"], "neutrophil": ["CL:0000775"], "granulocyte": ["CL:0000094"],
    "endocrine": ["CL:0000163", "CL:0008024"], "alpha": ["CL:0000171"], "beta": ["CL:0000169"], "delta": ["CL:0000173"],
    "epsilon": ["CL:0005019"], "ductal": ["CL:0002079", "CL:0000068"],
}
DATASETS = {
    "pbmc4k": ("pbmc4k_soupx/pbmc4k_2170cells_soupx_labels.h5ad", "Annotation", "human",
               {"T_CD4": "T", "T_CD8": "T", "B": "B", "NK": "NK", "MNP": "monocyte"}, "tuning set (constants chosen on it)"),
    "sorted": ("pbmc_sorted_zheng2017/pbmc_sorted_3500.h5ad", "trueLabel", "human",
               {"B": "B", "CD4TCM": "T", "CD4TN": "T", "CD4Treg": "T", "CD8TN": "T", "Monocyte": "monocyte", "NK": "NK"}, "held out"),
    "zilionis": ("mouse_tissue/zilionis_mouse_lung_immune_800cells.h5ad", "celltypes", "mouse",
                 {"B cells": "B", "T cells": "T", "NK cells": "NK", "Neutrophils": "neutrophil"}, "held out"),
    "actinn": ("mouse_immune_actinn/actinn_train_1000cells.h5ad", "cell_type", "mouse",
               {"B cell": "B", "T cell": "T", "NK cell": "NK", "Monocyte": "monocyte", "Granulocyte": "granulocyte"}, "held out"),
    "bastidas_coarse": ("mouse_tissue/bastidas_mouse_pancreas_e15_739cells.h5ad", "clusters", "mouse",
                        {"Alpha": "endocrine", "Beta": "endocrine", "Delta": "endocrine", "Epsilon": "endocrine", "Ductal": "ductal"}, "held out"),
    "bastidas_fine": ("mouse_tissue/bastidas_mouse_pancreas_e15_739cells.h5ad", "clusters", "mouse",
                      {"Alpha": "alpha", "Beta": "beta", "Delta": "delta", "Epsilon": "epsilon", "Ductal": "ductal"}, "held out"),
}
MODEL = {"human": "pan_human_v1", "mouse": "pan_mouse_v1"}


def shared_group(term: str | None, depth: int, wanted: set[str]) -> str | None:
    from dask_annot.ontology import cell_ontology

    if term is None or depth < 2:
        return None
    anc = set(cell_ontology()[term]["ancestors"]) | {term}
    for g in sorted(wanted):
        if anc & set(GROUPS[g]):
            return g
    return None


def evaluate(name: str, shared: Path, work: Path) -> dict:
    import anndata as ad

    from dask_annot import pipeline
    from dask_annot.config import resolve

    rel, col, species, mapping, role = DATASETS[name]
    path = shared / "data" / rel
    obs = ad.read_h5ad(path, backed="r").obs
    truth = obs[col].astype(str).map(mapping).to_numpy()
    settings = resolve(layout="hierarchical")
    res = pipeline.run(f"bench_{name}", path, models=[MODEL[species]], output_dir=work, settings=settings, log=lambda m: None)[0]
    ct = pd.read_csv(res.model_dir / "cell_types.csv", keep_default_na=False)
    rec = json.loads((res.model_dir / "run.json").read_text())
    model = pipeline.resolve_model(MODEL[species])
    term_of = {lv.fine: lv.ontology_id for lv in model.levels}
    wanted = set(mapping.values())
    pred = []
    for coarse, fine, path_txt in zip(ct["coarse_cell_type_unfiltered"], ct["fine_cell_type"], ct["full_hierarchical_labels"]):
        if coarse in ("Unassigned", "Coarse Not Confidently Annotated"):
            pred.append(None)
            continue
        # the deepest CL term named in the path (fine if confident, else the coarse display node's term)
        last = fine if fine in term_of else None
        if last is None:
            from dask_annot.ontology import display_nodes
            coarse_term = {n: t for t, n in display_nodes()["coarse"]}.get(coarse)
            pred.append(shared_group(coarse_term, 2, wanted) if coarse_term else None)
        else:
            pred.append(shared_group(term_of[last], 2, wanted))
    keep = pd.notna(truth)
    t = truth[keep]
    p = np.array(pred, dtype=object)[keep]
    conf = np.array([x is not None for x in p])
    nca = float(np.mean(~conf))
    acc = float(np.mean(p == t))
    acc_conf = float(np.mean(p[conf] == t[conf])) if conf.any() else float("nan")
    per_class = {c: float(np.mean(p[t == c] == c)) for c in sorted(set(t))}
    confusion = pd.crosstab(pd.Series(t, name="truth"), pd.Series([x or "NCA/other" for x in p], name="called")).to_dict()
    prob = ct["final_level_softmax_prob"].to_numpy()[keep]
    return {"dataset": name, "role": role, "model": MODEL[species], "cells": int(keep.sum()), "accuracy": round(acc, 3),
            "accuracy_confident": round(acc_conf, 3), "nca": round(nca, 3),
            "per_class": {k: round(v, 3) for k, v in per_class.items()}, "min_class": round(min(per_class.values()), 3),
            "confusion": confusion, "prob_right": round(float(np.mean(prob[p == t])), 3) if (p == t).any() else None,
            "prob_wrong": round(float(np.mean(prob[(p != t) & conf])), 3) if ((p != t) & conf).any() else None,
            "seconds": rec["timings_s"]["total"], "scoring": rec["parameters"].get("scoring")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.datasets.split(","):
            r = evaluate(name, Path(a.shared), Path(tmp))
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("confusion", "scoring")}))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
