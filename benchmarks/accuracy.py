#!/usr/bin/env python
"""Accuracy benchmark: dask-annot vs scanpy ``ingest`` vs CellTypist on real labelled PBMCs.

One command (from the repository root)::

    python benchmarks/accuracy.py

Two directions, every method in the same run:

* ``sorted->pbmc4k``: reference = FACS-sorted PBMC (Zheng 2017, 3,500 cells, ``trueLabel``),
  query = pbmc4k (SoupX subsample, 2,170 cells, ``Annotation``; ``?`` cells not scored).
* ``pbmc4k->sorted``: reference = pbmc4k without its ``?`` cells, query = sorted PBMC.

Methods:

* ``dask-annot``: ``python -m dask_annot build-reference`` on the reference h5ad, then
  ``annotate`` on the query written as a Cell Ranger v3 HDF5; ``fine_cell_type`` is read.
* ``scanpy-ingest``: intersect genes, normalize_total(1e4)+log1p on both, PCA (50 PCs) and
  ``sc.pp.neighbors`` on the reference, ``sc.tl.ingest(query, ref, obs=label)``.
* ``celltypist`` / ``celltypist+mv``: intersect genes, normalize_total(1e4)+log1p on both,
  ``celltypist.train(ref, feature_selection=True)`` (the documented custom-model recipe), then
  ``celltypist.annotate`` without / with ``majority_voting=True`` (CellTypist's own
  over-clustering: its canonical scanpy pipeline + Leiden, resolution 5 below 5k cells).

The peers run in ``benchmarks/.peers-venv`` (made by ``benchmarks/setup_peers.sh``) through
``python benchmarks/accuracy.py --peer ...`` in a subprocess; data go through h5ad/CSV files
in a work directory. This file therefore imports only numpy/pandas/anndata at module level.

Scoring is at the level both label sets share (B, CD4 T, CD8 T, NK, mononuclear phagocyte):
each label is mapped to a Cell Ontology term (``dask_annot/data/maps/*.csv``, or a CL label
text / id as dask-annot writes it) and then to the first category among
CL:0000236, CL:0000624, CL:0000625, CL:0000623, CL:0000113 that is the term or one of its
ancestors in ``dask_annot/data/cl-2026-03-26-slim.json.gz``. Predictions outside the five
categories (e.g. a bare "T cell", "Unassigned", a cell missing from the output) count as wrong.
Reported: accuracy and macro-F1 over the five categories, and wall time per method.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("DASK_ANNOT_SHARED_DATA", "/work/shared/data"))
SEED = 0

DATASETS = {
    "sorted": dict(
        name="pbmc_sorted_zheng2017",
        path=DATA / "pbmc_sorted_zheng2017" / "pbmc_sorted_3500.h5ad",
        label="trueLabel",
        exclude=None,
    ),
    "pbmc4k": dict(
        name="pbmc4k_soupx",
        path=DATA / "pbmc4k_soupx" / "pbmc4k_2170cells_soupx_labels.h5ad",
        label="Annotation",
        exclude="?",
    ),
}
DIRECTIONS = [("sorted", "pbmc4k"), ("pbmc4k", "sorted")]
METHODS = ["dask-annot", "scanpy-ingest", "celltypist", "celltypist+mv"]
# job (a process) -> the method column(s) it produces
PRODUCES = {"dask-annot": ["dask-annot"], "ingest": ["scanpy-ingest"], "celltypist": ["celltypist"], "celltypist-mv": ["celltypist+mv"]}

CATEGORIES = [
    ("CL:0000236", "B"),
    ("CL:0000624", "CD4 T"),
    ("CL:0000625", "CD8 T"),
    ("CL:0000623", "NK"),
    ("CL:0000113", "MNP"),
]
OTHER = "other"  # a prediction outside the five scored categories (always wrong)
ONTOLOGY = REPO / "dask_annot" / "data" / "cl-2026-03-26-slim.json.gz"
MAPS = REPO / "dask_annot" / "data" / "maps"

# Category a reference label's *name* implies; used only to cross-check the ontology
# (and as the documented fallback if an ancestor chain misses the expected category).
NAME_CATEGORY = {
    "B": "B",
    "CD4TCM": "CD4 T",
    "CD4TN": "CD4 T",
    "CD4Treg": "CD4 T",
    "CD8TN": "CD8 T",
    "Monocyte": "MNP",
    "NK": "NK",
    "MNP": "MNP",
    "T_CD4": "CD4 T",
    "T_CD8": "CD8 T",
}


# --------------------------------------------------------------------------------------
# Ontology scoring
# --------------------------------------------------------------------------------------
class Scorer:
    """Map any label (dataset label, CL label text or CL id) to one of the five categories."""

    def __init__(self) -> None:
        with gzip.open(ONTOLOGY, "rt") as fh:
            self.cl = json.load(fh)
        self.by_label: dict[str, str] = {}
        for cid, entry in self.cl.items():
            if entry.get("label"):
                self.by_label.setdefault(entry["label"], cid)
        self.maps: dict[str, dict[str, str]] = {}
        for key, ds in DATASETS.items():
            m = pd.read_csv(MAPS / f"{ds['name']}.csv", dtype=str)
            self.maps[key] = dict(zip(m["label"], m["ontology_id"]))
        self.issues: list[str] = []
        self.fallbacks: dict[str, str] = {}
        self._check_maps()

    def category_of_id(self, cid: str | None) -> str:
        if cid is None or cid not in self.cl:
            return OTHER
        anc = self.cl[cid].get("ancestors", {})
        for cat_id, cat in CATEGORIES:
            if cid == cat_id or cat_id in anc:
                return cat
        return OTHER

    def _check_maps(self) -> None:
        """Check every dataset label's ontology category against what its name says."""
        for key, mapping in self.maps.items():
            for label, cid in mapping.items():
                by_onto = self.category_of_id(cid)
                by_name = NAME_CATEGORY.get(label)
                if by_name is None or by_onto == by_name:
                    continue
                term = self.cl.get(cid, {}).get("label", "NOT IN ONTOLOGY")
                self.issues.append(
                    f"{DATASETS[key]['name']}: label {label!r} -> {cid} ({term}) falls in "
                    f"category {by_onto!r} by its CL ancestors, but its name says {by_name!r}; "
                    f"scored as {by_name!r} (name-based fallback)"
                )
                self.fallbacks[f"{key}:{label}"] = by_name

    def category(self, label, dataset: str | None = None) -> str:
        """Category of one label. ``dataset`` selects the label->CL map for dataset labels."""
        if label is None or (isinstance(label, float) and np.isnan(label)):
            return OTHER
        label = str(label)
        if dataset is not None and label in self.maps[dataset]:
            fb = self.fallbacks.get(f"{dataset}:{label}")
            return fb if fb is not None else self.category_of_id(self.maps[dataset][label])
        if label in self.cl:  # a CL id
            return self.category_of_id(label)
        if label in self.by_label:  # a CL label text (dask-annot's fine_cell_type)
            return self.category_of_id(self.by_label[label])
        return OTHER

    def describe_maps(self) -> list[dict]:
        rows = []
        for key, mapping in self.maps.items():
            for label, cid in mapping.items():
                rows.append(
                    dict(
                        dataset=DATASETS[key]["name"],
                        label=label,
                        ontology_id=cid,
                        ontology_label=self.cl.get(cid, {}).get("label"),
                        category=self.category(label, key),
                    )
                )
        return rows


def score(truth: pd.Series, pred: pd.Series) -> dict:
    """Accuracy and macro-F1 over the categories present in ``truth`` (OTHER never is)."""
    truth = truth.astype(str)
    pred = pred.reindex(truth.index).fillna(OTHER).astype(str)
    present = [c for _, c in CATEGORIES if (truth == c).any()]
    per_class = {}
    for c in present:
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = dict(precision=round(prec, 4), recall=round(rec, 4), f1=round(f1, 4), n=tp + fn)
    confusion = pd.crosstab(truth, pred).to_dict(orient="index")
    return dict(
        n_scored=int(len(truth)),
        accuracy=round(float((pred == truth).mean()), 4),
        macro_f1=round(float(np.mean([v["f1"] for v in per_class.values()])), 4),
        n_predicted_other=int((pred == OTHER).sum()),
        per_class=per_class,
        confusion={t: {p: int(n) for p, n in row.items() if n} for t, row in confusion.items()},  # truth -> predicted -> cells
    )


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def load_dataset(key: str):
    import anndata as ad
    import scipy.sparse as sp

    ds = DATASETS[key]
    a = ad.read_h5ad(ds["path"])
    X = sp.csr_matrix(a.X)
    if X.nnz and not np.allclose(X.data, np.round(X.data)):
        raise SystemExit(f"{ds['path']}: X is not raw integer counts")
    a.X = X
    labels = a.obs[ds["label"]].astype(str)
    out = ad.AnnData(X=a.X, obs=pd.DataFrame({"label": labels.values}, index=a.obs_names.astype(str)))
    out.var_names = a.var_names.astype(str)
    return out


def write_inputs(work: Path, ref_key: str, query_key: str) -> dict:
    """Write ref.h5ad (labelled, excluded label dropped), query.h5ad and query.h5 (10x v3)."""
    sys.path.insert(0, str(REPO))
    from dask_annot.h5 import write_10x_h5

    work.mkdir(parents=True, exist_ok=True)
    ref = load_dataset(ref_key)
    excl = DATASETS[ref_key]["exclude"]
    if excl is not None:
        ref = ref[ref.obs["label"] != excl].copy()
    query = load_dataset(query_key)
    paths = dict(ref=work / "ref.h5ad", query=work / "query.h5ad", query_h5=work / "query.h5")
    ref.write_h5ad(paths["ref"])
    # the query goes to the peers without its truth labels
    unlabelled = query.copy()
    unlabelled.obs = pd.DataFrame(index=query.obs_names)
    unlabelled.write_h5ad(paths["query"])
    write_10x_h5(
        paths["query_h5"],
        query.X.astype(np.int32),
        barcodes=list(query.obs_names),
        # the h5ad files carry gene symbols only; they serve as both id and name
        feature_ids=list(query.var_names),
        feature_names=list(query.var_names),
    )
    return dict(paths=paths, ref_cells=ref.n_obs, ref_genes=ref.n_vars, query=query)


# --------------------------------------------------------------------------------------
# Peers (run inside benchmarks/.peers-venv)
# --------------------------------------------------------------------------------------
def _peer_prepare(ref_path: str, query_path: str, hvg: int = 0):
    import anndata as ad
    import scanpy as sc

    ref = ad.read_h5ad(ref_path)
    query = ad.read_h5ad(query_path)
    genes = ref.var_names.intersection(query.var_names, sort=False)
    ref = ref[:, genes].copy()
    query = query[:, genes].copy()
    for a in (ref, query):
        a.X = a.X.astype(np.float32)
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    if hvg:
        sc.pp.highly_variable_genes(ref, n_top_genes=hvg)
        ref = ref[:, ref.var["highly_variable"].values].copy()
        query = query[:, ref.var_names].copy()
    return ref, query


def peer_ingest(args) -> dict:
    import scanpy as sc

    steps = {}
    t0 = time.perf_counter()
    ref, query = _peer_prepare(args.ref, args.query, hvg=args.ingest_hvg)
    steps["prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc.pp.pca(ref, n_comps=50, random_state=args.seed)
    steps["pca_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc.pp.neighbors(ref, random_state=args.seed)
    steps["neighbors_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc.tl.ingest(query, ref, obs="label", embedding_method="pca")
    steps["ingest_s"] = time.perf_counter() - t0
    pd.DataFrame({"barcode": query.obs_names, "scanpy-ingest": query.obs["label"].astype(str).values}).to_csv(
        args.out, index=False
    )
    return {
        "scanpy-ingest": dict(
            compute_s=round(sum(steps.values()), 2), n_genes=int(ref.n_vars), **{k: round(v, 2) for k, v in steps.items()}
        )
    }


def peer_celltypist(args) -> dict:
    import celltypist

    mv = args.peer == "celltypist-mv"
    method = "celltypist+mv" if mv else "celltypist"
    steps = {}
    t0 = time.perf_counter()
    ref, query = _peer_prepare(args.ref, args.query)
    steps["prepare_s"] = time.perf_counter() - t0
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    model = celltypist.train(
        ref, labels="label", n_jobs=args.n_jobs, feature_selection=True, random_state=args.seed
    )
    steps["train_s"] = time.perf_counter() - t0
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    # over_clustering=None: CellTypist over-clusters the query itself (its documented default)
    result = celltypist.annotate(query, model=model, majority_voting=mv)
    steps["annotate_s"] = time.perf_counter() - t0
    column = "majority_voting" if mv else "predicted_labels"
    pd.DataFrame(
        {"barcode": query.obs_names, method: result.predicted_labels[column].astype(str).values}
    ).to_csv(args.out, index=False)
    return {
        method: dict(
            compute_s=round(sum(steps.values()), 2), n_genes=int(ref.n_vars), **{k: round(v, 2) for k, v in steps.items()}
        )
    }


def peer_main(args) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(args.out).parent / "numba-cache"))
    import scanpy as sc

    sc.settings.verbosity = 1
    sc.settings.n_jobs = args.n_jobs
    timings = {"ingest": peer_ingest, "celltypist": peer_celltypist, "celltypist-mv": peer_celltypist}[args.peer](args)
    versions = {}
    for mod in ("scanpy", "anndata", "celltypist", "sklearn", "pynndescent", "numpy", "scipy", "leidenalg", "igraph", "umap"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not reported
            pass
    Path(args.out).with_suffix(".json").write_text(json.dumps(dict(timings=timings, versions=versions), indent=1))


# --------------------------------------------------------------------------------------
# Orchestration (main environment)
# --------------------------------------------------------------------------------------
def peers_python(args) -> str:
    if args.peers_python:
        return os.path.abspath(args.peers_python)  # the peers run in their own work directories
    res = subprocess.run(["bash", str(HERE / "setup_peers.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit("benchmarks/setup_peers.sh failed")
    return res.stdout.strip().splitlines()[-1]


def run_peer(py: str, peer: str, inputs: dict, work: Path, args) -> tuple[pd.DataFrame, dict]:
    out = work / f"pred_{peer}.csv"
    env = dict(os.environ)
    # never let CellTypist touch ~/.celltypist or reach for its model index
    env["CELLTYPIST_FOLDER"] = str(work / "celltypist-home")
    env["PYTHONHASHSEED"] = str(args.seed)
    env.setdefault("OMP_NUM_THREADS", str(args.n_jobs))
    env["MPLCONFIGDIR"] = str(work / "mpl")
    cmd = [
        py, str(Path(__file__).resolve()), "--peer", peer,
        "--ref", str(inputs["paths"]["ref"]), "--query", str(inputs["paths"]["query"]),
        "--out", str(out), "--seed", str(args.seed), "--n-jobs", str(args.n_jobs),
        "--ingest-hvg", str(args.ingest_hvg),
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(work))
    wall = time.perf_counter() - t0
    (work / f"peer_{peer}.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"peer {peer} failed (exit {res.returncode}): {res.stderr[-2000:]}")
    info = json.loads(out.with_suffix(".json").read_text())
    info["process_wall_s"] = round(wall, 2)
    return pd.read_csv(out, dtype=str, keep_default_na=False).set_index("barcode"), info


DASK_ANNOT_CMD = [sys.executable, "-m", "dask_annot"]


def dask_annot_cmd() -> list[str]:
    return list(DASK_ANNOT_CMD)


def dask_annot_available() -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(dask_annot_cmd() + ["--help"], capture_output=True, text=True, cwd=str(REPO), env=env)
    text = res.stdout + res.stderr
    if res.returncode != 0 or "build-reference" not in text or "annotate" not in text:
        return False, (text.strip().splitlines() or ["no output"])[-1][:300]
    return True, ""


def run_dask_annot(ref_key: str, inputs: dict, work: Path, args) -> tuple[pd.DataFrame, dict]:
    ds = DATASETS[ref_key]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ref_dir = work / "dask-annot-ref"
    out_dir = work / "dask-annot-out"
    for d in (ref_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
    # the reference is built from the original labelled h5ad, as a user would
    build = dask_annot_cmd() + [
        "build-reference", "--input", str(ds["path"]), "--label-column", ds["label"],
        "--name", ds["name"], "--output", str(ref_dir),
        "--ontology-map", str(MAPS / f"{ds['name']}.csv"), "--seed", str(args.seed),
    ]
    if ds["exclude"] is not None:
        build += ["--exclude-label", ds["exclude"]]
    annotate = dask_annot_cmd() + [
        "annotate", "--id", "query", "--matrix", str(inputs["paths"]["query_h5"]),
        "--cell-annotation-model", str(ref_dir), "--output-dir", str(out_dir),
        "--scheduler", "threads",
    ]
    walls = {}
    log = []
    for step, cmd in (("build_reference_s", build), ("annotate_s", annotate)):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=env)
        walls[step] = round(time.perf_counter() - t0, 2)
        log.append("$ " + " ".join(cmd) + "\n" + res.stdout + "\n--- stderr ---\n" + res.stderr)
        (work / "dask-annot.log").write_text("\n\n".join(log))
        if res.returncode != 0:
            raise RuntimeError(f"dask-annot {step.removesuffix('_s').replace('_', '-')} failed (exit {res.returncode}): {res.stderr[-2000:]}")
    found = sorted(glob.glob(str(out_dir / "query" / "outs" / "segmented_outs" / "cell_types" / "*" / "cell_types.csv")))
    if not found:
        raise RuntimeError(f"dask-annot wrote no .../cell_types/<model>/cell_types.csv under {out_dir}")
    table = pd.read_csv(found[0], dtype=str, keep_default_na=False)
    if "fine_cell_type" not in table.columns:
        raise RuntimeError(f"{found[0]} has no fine_cell_type column: {list(table.columns)}")
    pred = table.set_index("barcode")[["fine_cell_type"]].rename(columns={"fine_cell_type": "dask-annot"})
    info = dict(
        process_wall_s=round(walls["build_reference_s"] + walls["annotate_s"], 2),
        build_reference_s=walls["build_reference_s"],
        annotate_s=walls["annotate_s"],
        cell_types_csv=os.path.relpath(found[0], work),
        n_cells_in_output=int(len(table)),
    )
    return pred, info


def fmt_table(rows: list[dict]) -> str:
    head = ["direction", "method", "accuracy", "macro-F1", "wall s", "compute s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("status") == "ok":
            cells = [
                r["direction"], r["method"], f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}",
                f"{r['process_wall_s']:.1f}",
                f"{r['compute_s']:.1f}" if r.get("compute_s") is not None else "-",
                r.get("note", ""),
            ]
        else:
            cells = [r["direction"], r["method"], "-", "-", "-", "-", f"NOT MEASURED: {r['status']}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main_run(args) -> int:
    scorer = Scorer()
    for issue in scorer.issues:
        print("ONTOLOGY MAPPING ISSUE:", issue, file=sys.stderr)
    methods = [m for m in METHODS if m in args.methods]
    jobs = [j for j, ms in PRODUCES.items() if set(ms) & set(methods)]
    peers_needed = [j for j in jobs if j != "dask-annot"]
    py = peers_python(args) if peers_needed else None
    da_ok, da_why = (dask_annot_available() if "dask-annot" in methods else (False, "not requested"))
    if "dask-annot" in methods and not da_ok:
        print(f"dask-annot CLI not available ({da_why}); its rows are NOT measured", file=sys.stderr)

    tmp = None
    if args.work_dir:
        base = Path(args.work_dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dask-annot-accuracy-")
        base = Path(tmp.name)

    rows: list[dict] = []
    peer_versions: dict = {}
    try:
        for ref_key, query_key in DIRECTIONS:
            direction = f"{ref_key}->{query_key}"
            print(f"== {direction}: reference {DATASETS[ref_key]['name']}, query {DATASETS[query_key]['name']}", file=sys.stderr)
            work = base / direction.replace("->", "_to_")
            inputs = write_inputs(work, ref_key, query_key)
            q = inputs["query"]
            truth_raw = q.obs["label"]
            excl = DATASETS[query_key]["exclude"]
            keep = truth_raw != excl if excl is not None else pd.Series(True, index=truth_raw.index)
            truth = truth_raw[keep].map(lambda s: scorer.category(s, query_key))
            common = dict(
                direction=direction,
                reference=DATASETS[ref_key]["name"],
                query=DATASETS[query_key]["name"],
                reference_cells=inputs["ref_cells"],
                query_cells=int(q.n_obs),
                query_cells_excluded=int((~keep).sum()),
            )
            preds: dict[str, tuple[pd.Series, dict]] = {}
            for name in jobs:
                print(f"   running {name} ...", file=sys.stderr, flush=True)
                try:
                    if name == "dask-annot":
                        if not da_ok:
                            raise LookupError(f"dask-annot CLI not available: {da_why}")
                        table, info = run_dask_annot(ref_key, inputs, work, args)
                    else:
                        table, info = run_peer(py, name, inputs, work, args)
                        peer_versions = info.get("versions", peer_versions)
                except Exception as exc:  # noqa: BLE001 - recorded as an unmeasured row, never a number
                    text = str(exc).strip()
                    msg = text if isinstance(exc, LookupError) else f"failed: {text.splitlines()[-1][:300] if text else type(exc).__name__}"
                    print(f"   {name}: {msg}", file=sys.stderr)
                    for m in PRODUCES[name]:
                        preds[m] = (None, dict(status=msg))
                    continue
                for col in table.columns:
                    if col not in methods:
                        continue
                    extra = dict(info.get("timings", {}).get(col, {}))
                    extra.update({k: v for k, v in info.items() if k not in ("timings", "versions")})
                    preds[col] = (table[col], extra)
            for m in methods:
                pred_raw, extra = preds.get(m, (None, dict(status="not run")))
                row = dict(common, method=m)
                if pred_raw is None:
                    row.update(extra)
                    rows.append(row)
                    continue
                pred_raw = pred_raw.reindex(truth.index)
                n_missing = int(pred_raw.isna().sum())
                pred = pred_raw.map(lambda s: OTHER if pd.isna(s) else scorer.category(s, ref_key))
                row.update(status="ok", **score(truth, pred), **extra)
                row["n_missing_from_output"] = n_missing
                row["predicted_labels"] = {str(k): int(v) for k, v in pred_raw.fillna("<missing>").value_counts().items()}
                unmapped = sorted({str(s) for s in pred_raw.dropna().unique() if scorer.category(s, ref_key) == OTHER})
                row["labels_outside_categories"] = unmapped
                notes = []
                if n_missing:
                    notes.append(f"{n_missing} cells missing from output")
                if row["n_predicted_other"] - n_missing > 0:
                    notes.append(f"{row['n_predicted_other'] - n_missing} predicted outside the 5 categories")
                row["note"] = "; ".join(notes)
                rows.append(row)
                print(f"   {m}: accuracy {row['accuracy']:.3f}, macro-F1 {row['macro_f1']:.3f}", file=sys.stderr)
    finally:
        if tmp is not None and not args.keep_work:
            tmp.cleanup()
        elif tmp is not None:
            print(f"work files kept in {base}", file=sys.stderr)

    table = fmt_table(rows)
    print(table)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(
        generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command="python benchmarks/accuracy.py " + " ".join(args.argv),
        seed=args.seed,
        n_jobs=args.n_jobs,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
        peer_versions=peer_versions,
        dask_annot_git=_git_rev(),
        # dask-annot runs from this working tree: list uncommitted changes to the package, if any
        dask_annot_uncommitted=_git_dirty("dask_annot"),
        ingest_recipe=dict(
            genes="intersection of reference and query",
            normalisation="normalize_total(target_sum=1e4) + log1p on both",
            hvg=(f"{args.ingest_hvg} highly variable genes of the reference (seurat flavour)" if args.ingest_hvg else "none: all shared genes"),
            pca="sc.pp.pca(ref, n_comps=50)", neighbors="sc.pp.neighbors(ref) defaults (15 neighbours)",
            ingest="sc.tl.ingest(query, ref, obs='label', embedding_method='pca')",
        ),
        celltypist_recipe=dict(
            genes="intersection of reference and query",
            normalisation="normalize_total(target_sum=1e4) + log1p on both (CellTypist's documented input)",
            train="celltypist.train(ref, labels, feature_selection=True, n_jobs, random_state=seed)",
            annotate="celltypist.annotate(query, model) and celltypist.annotate(query, model, majority_voting=True) "
            "with CellTypist's own over-clustering (Leiden, resolution 5 for < 5k cells)",
        ),
        scoring=dict(
            categories={c: cid for cid, c in CATEGORIES},
            rule="first category that is the label's CL term or one of its ancestors; anything else is 'other' (wrong)",
            macro_f1="mean F1 over the categories present in the query truth",
            excluded_query_labels=[d["exclude"] for d in DATASETS.values() if d["exclude"]],
            ontology=str(ONTOLOGY.relative_to(REPO)),
            label_maps=scorer.describe_maps(),
            mapping_issues=scorer.issues,
        ),
        wall_time_note="wall s = wall time of the method's own process(es), including imports and file I/O "
        "(dask-annot: build-reference + annotate); compute s = in-process prepare+fit+predict time (peers only)",
        results=rows,
    )
    (out_dir / "accuracy.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    md = [
        "# Accuracy benchmark",
        "",
        f"Generated {meta['generated']} by `{meta['command'].strip()}` (seed {args.seed}, {os.cpu_count()} CPUs).",
        "",
        "Scored at the shared level B / CD4 T / CD8 T / NK / mononuclear phagocyte via Cell Ontology ancestors; "
        "query cells labelled `?` are not scored; predictions outside these categories count as wrong.",
        "",
        table,
        "",
        "wall s: the method's own process(es) incl. imports and I/O (dask-annot: build-reference + annotate). "
        "compute s: in-process prepare + fit + predict (peers). Each method runs in a fresh process, so first-call "
        "numba JIT compilation is included (it dominates scanpy-ingest's neighbors + ingest steps; per-step times are in accuracy.json).",
        "",
        "Peer versions: " + ", ".join(f"{k} {v}" for k, v in sorted(peer_versions.items())),
        "",
        f"ingest HVG: {meta['ingest_recipe']['hvg']}.",
        "",
        "Ontology mapping issues: " + ("; ".join(scorer.issues) if scorer.issues else "none (every label's CL ancestors reach the category its name implies)"),
        "",
    ]
    (out_dir / "accuracy.md").write_text("\n".join(md))
    print(f"wrote {out_dir / 'accuracy.json'} and {out_dir / 'accuracy.md'}", file=sys.stderr)
    return 0


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=str(REPO)).stdout.strip() or None
    except OSError:
        return None


def _git_dirty(path: str) -> list[str] | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", path], capture_output=True, text=True, cwd=str(REPO)).stdout
    except OSError:
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to run (default: all)")
    p.add_argument("--peers-python", help="python of the peers' venv (default: run benchmarks/setup_peers.sh)")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where accuracy.json/.md go")
    p.add_argument("--work-dir", help="keep intermediate files here (default: a temp dir, removed)")
    p.add_argument("--keep-work", action="store_true", help="keep the temp work dir")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--n-jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--ingest-hvg", type=int, default=2000, help="ingest: restrict to the N most variable reference genes (0 = all shared genes); default 2000 (measured better than 0 in both directions)")
    # peer mode (internal; runs inside the peers' venv)
    p.add_argument("--peer", choices=["ingest", "celltypist", "celltypist-mv"], help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dask-annot-cmd", help="command that runs dask-annot (default: this python -m dask_annot, with the repo on PYTHONPATH)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.dask_annot_cmd:
        import shlex

        DASK_ANNOT_CMD[:] = shlex.split(args.dask_annot_cmd)
    if args.peer:
        peer_main(args)
        return 0
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
