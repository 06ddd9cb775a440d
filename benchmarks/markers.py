"""Accuracy of the built-in marker models (issue 12's bars) on labelled real data.

    PYTHONPATH=. python benchmarks/markers.py [--shared ../shared] [--out benchmarks/results/markers.md]
                                             [--datasets pbmc4k,sorted,...] [--ablation] [--organ]

Each dataset is annotated by ``pipeline.run`` with the built-in marker model of its
species (no training on these data: the models are built from the ASCT+B tables only),
hierarchical layout, and the calls are compared with the dataset's own labels at a shared
level. A call counts at the shared level when it is confident at least to the coarse level
and its Cell Ontology term descends from the level's term (e.g. any T cell subtype is "T").
``NCA`` = the fraction of cells ``Unassigned`` or ``Coarse Not Confidently Annotated``;
accuracy is over ALL cells (an NCA cell counts as wrong) and, in brackets, over confident cells.
``--organ`` also runs the data sets whose tissue is an ASCT+B organ with ``--organ`` set to it
(:data:`ORGAN`; the default run, without it, is what issue 12's bars are judged on).
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
               {"T_CD4": "T", "T_CD8": "T", "B": "B", "NK": "NK", "MNP": "monocyte"}, "tuning"),
    "sorted": ("pbmc_sorted_zheng2017/pbmc_sorted_3500.h5ad", "trueLabel", "human",
               {"B": "B", "CD4TCM": "T", "CD4TN": "T", "CD4Treg": "T", "CD8TN": "T", "Monocyte": "monocyte", "NK": "NK"}, "seen in design"),
    "zilionis": ("mouse_tissue/zilionis_mouse_lung_immune_800cells.h5ad", "celltypes", "mouse",
                 {"B cells": "B", "T cells": "T", "NK cells": "NK", "Neutrophils": "neutrophil"}, "seen in design"),
    "actinn": ("mouse_immune_actinn/actinn_train_1000cells.h5ad", "cell_type", "mouse",
               {"B cell": "B", "T cell": "T", "NK cell": "NK", "Monocyte": "monocyte", "Granulocyte": "granulocyte"}, "seen in design"),
    "bastidas_coarse": ("mouse_tissue/bastidas_mouse_pancreas_e15_739cells.h5ad", "clusters", "mouse",
                        {"Alpha": "endocrine", "Beta": "endocrine", "Delta": "endocrine", "Epsilon": "endocrine", "Ductal": "ductal"}, "seen in design"),
    "bastidas_fine": ("mouse_tissue/bastidas_mouse_pancreas_e15_739cells.h5ad", "clusters", "mouse",
                      {"Alpha": "alpha", "Beta": "beta", "Delta": "delta", "Epsilon": "epsilon", "Ductal": "ductal"}, "seen in design"),
}
MODEL = {"human": "pan_human_v1", "mouse": "pan_mouse_v1"}
# the sample's tissue where it is an ASCT+B organ (PBMC and the ACTINN immune cells are blood: no organ table)
ORGAN = {"zilionis": "lung", "bastidas_coarse": "pancreas", "bastidas_fine": "pancreas"}


def shared_group(term: str | None, depth: int, wanted: set[str]) -> str | None:
    from dask_annot.ontology import cell_ontology

    if term is None or depth < 2:
        return None
    anc = set(cell_ontology()[term]["ancestors"]) | {term}
    for g in sorted(wanted):
        if anc & set(GROUPS[g]):
            return g
    return None


def evaluate(name: str, shared: Path, work: Path, organ: str | None = None) -> dict:
    import anndata as ad

    from dask_annot import pipeline
    from dask_annot.config import resolve

    rel, col, species, mapping, role = DATASETS[name]
    path = shared / "data" / rel
    obs = ad.read_h5ad(path, backed="r").obs
    truth = obs[col].astype(str).map(mapping).to_numpy()
    settings = resolve(layout="hierarchical", organs=organ)
    res = pipeline.run(f"bench_{name}", path, models=[MODEL[species]], output_dir=work, settings=settings, log=lambda m: None)[0]
    ct = pd.read_csv(res.model_dir / "cell_types.csv", keep_default_na=False)
    rec = json.loads((res.model_dir / "run.json").read_text())
    model = pipeline.resolve_model(MODEL[species])
    term_of = {lv.fine: lv.ontology_id for lv in model.levels}
    wanted = set(mapping.values())
    pred, nca_flags = [], []
    for coarse, fine, path_txt in zip(ct["coarse_cell_type_unfiltered"], ct["fine_cell_type"], ct["full_hierarchical_labels"]):
        nca_flags.append(coarse in ("Unassigned", "Coarse Not Confidently Annotated"))
        if nca_flags[-1]:
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
    conf = ~np.array(nca_flags)[keep]
    nca = float(np.mean(~conf))
    acc = float(np.mean(p == t))
    acc_conf = float(np.mean(p[conf] == t[conf])) if conf.any() else float("nan")
    per_class = {c: float(np.mean(p[t == c] == c)) for c in sorted(set(t))}
    called = [x or ("NCA" if not c else "other") for x, c in zip(p, conf)]
    confusion = {lab: dict(zip(*np.unique(np.array(called, dtype=str)[t == lab], return_counts=True))) for lab in sorted(set(t))}
    confusion = {lab: {k: int(v) for k, v in d.items()} for lab, d in confusion.items()}
    fine_calls = {lab: {str(k): int(v) for k, v in pd.Series(ct["fine_cell_type"].to_numpy()[keep][t == lab]).value_counts().head(4).items()}
                  for lab in sorted(set(t))}
    prob = ct["final_level_softmax_prob"].to_numpy()[keep]
    return {"dataset": name, "role": role, "model": MODEL[species], "cells": int(keep.sum()), "accuracy": round(acc, 3),
            "accuracy_confident": round(acc_conf, 3), "nca": round(nca, 3),
            "per_class": {k: round(v, 3) for k, v in per_class.items()}, "min_class": round(min(per_class.values()), 3),
            "confusion": confusion, "top_fine_calls": fine_calls, "prob_right": round(float(np.mean(prob[p == t])), 3) if (p == t).any() else None,
            "prob_wrong": round(float(np.mean(prob[(p != t) & conf])), 3) if ((p != t) & conf).any() else None,
            "seconds": rec["timings_s"]["total"], "scoring": rec["parameters"].get("scoring"), "organ": organ}


def run_all(names: list[str], shared: Path, pool_rounds: int | None = None, organs: bool = False) -> list[dict]:
    from dask_annot import markers

    saved = markers.POOL_ROUNDS
    if pool_rounds is not None:
        markers.POOL_ROUNDS = pool_rounds
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                if organs and name not in ORGAN:
                    continue
                r = evaluate(name, shared, Path(tmp), organ=ORGAN[name] if organs else None)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("confusion", "scoring", "top_fine_calls")}), flush=True)
    finally:
        markers.POOL_ROUNDS = saved
    return rows


def markdown(rows: list[dict], ablation: list[dict] | None, organ_rows: list[dict] | None = None) -> str:
    out = ["# Marker models: accuracy on labelled real data", "",
           "Produced by `PYTHONPATH=. python benchmarks/markers.py --shared ../shared --ablation --organ` "
           "(models built from the ASCT+B tables only; no label of these data sets was used to build them).", "",
           "Accuracy is over all cells of the listed classes; a cell counts as right when its call is confident at least to "
           "the coarse level and its Cell Ontology term descends from the class's term. `NCA`: `Unassigned` or "
           "`Coarse Not Confidently Annotated`. `prob right/wrong`: mean `final_level_softmax_prob` of right and of "
           "confidently wrong calls.", "",
           "Roles, honestly: the constants (clip 10, 2 pooling rounds, softmax temperature 1, p > 0.5, Unassigned below z 1, "
           "half the markers measured) were set on pbmc4k (`tuning`). The rules that followed (markers inherited only when two "
           "organ tables agree, HGNC-id resolution of gene names, the measured-marker rule) were each adopted after looking at "
           "the results on ALL these data sets (`seen in design`): none of them is a clean held-out set. So were the later "
           "ASCT+B reading rules (a chain term that is a CL ancestor of the term before it qualifies that type; names without "
           "an HGNC id resolved, e.g. NKP46 -> NCR1) and the mouse ortholog renames (CD8B -> Cd8b1, FCER2 -> Fcer2a, ...; LYZ "
           "left unmapped because Lyz1/Lyz2 measured harmful on zilionis and actinn). No constant was "
           "fitted per data set, and no label of these data sets is used by the models.", "",
           "| data set | role | model | cells | accuracy | accuracy (confident) | NCA | per class | prob right / wrong | s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{k} {v:.2f}" for k, v in r["per_class"].items())
        out.append(f"| {r['dataset']} | {r['role']} | {r['model']} | {r['cells']} | {r['accuracy']:.3f} | {r['accuracy_confident']:.3f} "
                   f"| {r['nca']:.3f} | {per} | {r['prob_right']} / {r['prob_wrong']} | {r['seconds']:.0f} |")
    if ablation:
        out += ["", "## Pooling over the query's own 15-NN graph (ablation)", "",
                "| data set | accuracy, pooled 2x | accuracy, not pooled | NCA pooled / not |", "|---|---|---|---|"]
        for r, q in zip(rows, ablation):
            out.append(f"| {r['dataset']} | {r['accuracy']:.3f} | {q['accuracy']:.3f} | {r['nca']:.3f} / {q['nca']:.3f} |")
    if organ_rows:
        base = {r["dataset"]: r for r in rows}
        out += ["", "## With the sample's organ (`--organ`)", "",
                "Only the types of that organ's ASCT+B table are candidates. The bars are judged on the default run above.", "",
                "| data set | organ | accuracy, --organ | accuracy, default | NCA --organ / default | per class, --organ |", "|---|---|---|---|---|---|"]
        for r in organ_rows:
            b = base.get(r["dataset"])
            per = ", ".join(f"{k} {v:.2f}" for k, v in r["per_class"].items())
            out.append(f"| {r['dataset']} | {r['organ']} | {r['accuracy']:.3f} | {b['accuracy'] if b else float('nan'):.3f} "
                       f"| {r['nca']:.3f} / {b['nca'] if b else float('nan'):.3f} | {per} |")
    out += ["", "## Where the calls went (shared level, then the most frequent fine labels)", ""]
    for r in rows + [dict(r, dataset=f"{r['dataset']} --organ {r['organ']}") for r in organ_rows or []]:
        out.append(f"**{r['dataset']}**")
        out.append("")
        for lab, d in r["confusion"].items():
            fine = "; ".join(f"{k} {v}" for k, v in r["top_fine_calls"][lab].items())
            out.append(f"- {lab}: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) + f" (fine: {fine})")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "markers.md"))
    ap.add_argument("--ablation", action="store_true", help="also run without pooling over the query graph")
    ap.add_argument("--organ", action="store_true", help="also run the data sets of an ASCT+B organ with --organ set to it")
    a = ap.parse_args(argv)
    names = a.datasets.split(",")
    rows = run_all(names, Path(a.shared))
    ablation = run_all(names, Path(a.shared), pool_rounds=0) if a.ablation else None
    organ_rows = run_all(names, Path(a.shared), organs=True) if a.organ else None
    out = Path(a.out)
    out.write_text(markdown(rows, ablation, organ_rows))
    out.with_suffix(".json").write_text(json.dumps({"pooled": rows, "not_pooled": ablation, "organ": organ_rows}, indent=1) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
