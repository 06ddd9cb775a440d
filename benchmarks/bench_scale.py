#!/usr/bin/env python
"""Scale benchmark: dask-annot end to end on simulated 100k and 1.2M-cell samples, vs scanpy ingest.

One command (from the repository root)::

    nice python benchmarks/bench_scale.py [--sizes 100000,1200000] [--skip-ingest] [--skip-scaling]

What it does, printing a table for each part and writing ``benchmarks/results/scale.{json,md}``:

1. Simulates (``benchmarks/simulate.py``, cached under ``benchmarks/results/work/``) a
   100k-cell reference (seed 1) and one query per size (seed 2): same cell types,
   independent cells.
2. ``dask-annot build-reference`` on the reference (10x H5 + ``--labels`` CSV, the source's
   Cell Ontology map; >50k cells, so the pynndescent index is built), cached.
3. ``dask-annot annotate`` (default scheduler: threads, one per core) on each query, in a
   fresh output directory: wall time per stage (``run.json`` ``timings_s``), peak memory
   of all its processes together, accuracy of ``fine_cell_type`` against the simulator's
   truth (mapped to the reference's fine labels by ``input_labels`` in reference.json) and
   of ``coarse_cell_type`` (through the reference's levels).
4. scanpy ``ingest`` on the 100k query in ``benchmarks/.peers-venv`` (accuracy.py's recipe:
   normalize_total + log1p, 2,000 HVGs of the reference, 50 PCs), at k=500 and at
   ``sc.pp.neighbors``' default k=15, as two processes each: ``prep`` (the reference's PCA +
   neighbours, saved as h5ad: the counterpart of build-reference) and ``map`` (load it,
   ingest the query: the counterpart of annotate). Ratios dask-annot / ingest for time and
   peak memory.
5. Scaling: annotate on the 100k query with ``--scheduler local --n-workers 1`` and ``2``
   (one thread each), reading the zarr store the threads run converted (no convert stage);
   and each stage's kernel timed in this process on one chunk (one BLAS thread, like a
   Dask worker), so a cluster run can be extrapolated: dask-annot does not record
   per-chunk task times itself.

Peak memory is sampled every 0.2 s as the sum of the resident set sizes of the measured
process and all its descendants (shared pages, e.g. libraries mapped by several worker
processes, count once per process, so this errs high).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIMULATE = HERE / "simulate.py"
DEFAULT_WORK = HERE / "results" / "work"
DEFAULT_MAP = REPO / "dask_annot" / "data" / "maps" / "pbmc_sorted_zheng2017.csv"
REF_SEED, QUERY_SEED = 1, 2
MODEL_NAME = "simref"
SAMPLE_S = 0.2
GB = 1e9
TARGETS = {
    "annotate_1.2M_wall_s": 600.0,
    "annotate_1.2M_peak_gb": 6.0,
    "speedup_vs_ingest_k500": 3.0,
}


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Samples the summed RSS of a process and all its descendants in a thread."""

    def __init__(self, pid: int, interval: float = SAMPLE_S):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_single = 0
        self.max_procs = 0
        self.samples = 0
        self._cpu: dict[int, float] = {}  # pid -> last seen user+system CPU seconds
        self._sys0 = self._busy()
        self.other_cores = None
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        ps = self._psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            return
        total, single = 0, 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except ps.Error:
                continue
            total += rss
            single = max(single, rss)
            try:
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
            except ps.Error:
                pass
        self.peak = max(self.peak, total)
        self.peak_single = max(self.peak_single, single)
        self.max_procs = max(self.max_procs, len(procs))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._t0
        if wall > 0:
            # the machine is shared: how many cores other processes kept busy meanwhile, on average
            other = self._busy() - self._sys0 - sum(self._cpu.values())
            self.other_cores = round(max(other, 0.0) / wall, 2)


def run_measured(cmd: list[str], *, log: Path, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd`` (stdout+stderr to ``log``) and return wall time, peak summed RSS, exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=str(cwd), env=env)
        with PeakRSS(proc.pid) as peak:
            rc = proc.wait()
        wall = time.perf_counter() - t0
    return {
        "returncode": rc,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peak.peak / GB, 3),
        "peak_rss_largest_process_gb": round(peak.peak_single / GB, 3),
        "max_processes": peak.max_procs,
        "load_avg_1min_at_start": round(load0, 2),
        "other_processes_mean_cores": peak.other_cores,
        "log": str(log),
    }


def check_ok(res: dict, what: str) -> None:
    if res["returncode"] != 0:
        tail = Path(res["log"]).read_text()[-3000:]
        raise RuntimeError(f"{what} failed (exit {res['returncode']}); log {res['log']}:\n{tail}")


def dask_annot_cmd() -> list[str]:
    return [sys.executable, "-m", "dask_annot"]


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=str(REPO)).stdout.strip()
        except OSError:
            return None

    dirty = git("status", "--porcelain", "--", "dask_annot")
    return {"head": git("rev-parse", "HEAD"), "dask_annot_uncommitted": [x.strip() for x in (dirty or "").splitlines() if x.strip()]}


# ----------------------------------------------------------------------------- inputs
def sim_paths(work: Path, kind: str, cells: int, seed: int) -> Path:
    return work / "sim" / f"{kind}_{cells}_s{seed}.h5"


def ensure_sim(work: Path, kind: str, cells: int, seed: int) -> dict:
    """A simulated matrix (reused when its record matches), with how long generating it took."""
    sys.path.insert(0, str(HERE))
    import simulate

    h5 = sim_paths(work, kind, cells, seed)
    meta, measure = simulate.meta_path(h5), h5.with_name(h5.stem + ".measure.json")
    want = {"cells": cells, "seed": seed, "simulator_version": simulate.VERSION}
    if h5.exists() and meta.exists() and simulate.labels_path(h5).exists():
        rec = json.loads(meta.read_text())
        src_ok = rec.get("source", {}).get("path") == str(Path(simulate.DEFAULT_SOURCE).resolve())
        if src_ok and all(rec.get(k) == v for k, v in want.items()):
            out = {"path": str(h5), "cached": True, **rec}
            if measure.exists():
                out["measured"] = json.loads(measure.read_text())
            return out
    print(f"   simulating {cells} {kind} cells (seed {seed}) -> {h5}", file=sys.stderr, flush=True)
    res = run_measured([sys.executable, SIMULATE, "--cells", cells, "--seed", seed, "--output", h5],
                       log=h5.with_name(h5.stem + ".log"))
    check_ok(res, f"simulate {kind} {cells}")
    measure.write_text(json.dumps(res, indent=1) + "\n")
    rec = json.loads(meta.read_text())
    return {"path": str(h5), "cached": False, **rec, "measured": res}


def ensure_reference(work: Path, ref_sim: dict, ontology_map: str | None) -> dict:
    """The dask-annot reference built from the simulated reference (reused when built from the same file)."""
    import hashlib

    h5 = Path(ref_sim["path"])
    tag = "nomap" if not ontology_map else Path(ontology_map).stem
    out = work / "reference" / f"{MODEL_NAME}_{ref_sim['cells']}_s{ref_sim['seed']}_{tag}"
    measure = out.with_name(out.name + ".measure.json")
    sha = hashlib.sha256()
    with open(h5, "rb") as fh:
        while chunk := fh.read(1 << 22):
            sha.update(chunk)
    if (out / "reference.json").exists() and measure.exists():
        meta = json.loads((out / "reference.json").read_text())
        if meta.get("source", {}).get("sha256") == sha.hexdigest():
            return {"path": str(out), "cached": True, "measured": json.loads(measure.read_text()), "meta": meta}
    shutil.rmtree(out, ignore_errors=True)
    sys.path.insert(0, str(HERE))
    import simulate

    cmd = dask_annot_cmd() + ["build-reference", "--input", h5, "--labels", simulate.labels_path(h5), "--label-column", "label",
                              "--name", MODEL_NAME, "--output", out]
    if ontology_map:
        cmd += ["--ontology-map", ontology_map]
    print(f"   building the reference -> {out}", file=sys.stderr, flush=True)
    res = run_measured(cmd, log=out.with_name(out.name + ".log"))
    check_ok(res, "dask-annot build-reference")
    measure.write_text(json.dumps(res, indent=1) + "\n")
    return {"path": str(out), "cached": False, "measured": res, "meta": json.loads((out / "reference.json").read_text())}


# ----------------------------------------------------------------------------- dask-annot runs
def truth_for(sim_rec: dict) -> pd.Series:
    sys.path.insert(0, str(HERE))
    import simulate

    t = pd.read_csv(simulate.labels_path(sim_rec["path"]), dtype=str, keep_default_na=False)
    return t.set_index("barcode")["label"]


def score_dask_annot(cell_types_csv: Path, truth: pd.Series, ref_meta: dict) -> dict:
    """Accuracy of fine and coarse labels against the truth mapped through the reference."""
    fine_of = ref_meta["input_labels"]
    coarse_of = {lv["fine"]: lv["coarse"] for lv in ref_meta["levels"]}
    pred = pd.read_csv(cell_types_csv, dtype=str, keep_default_na=False, usecols=["barcode", "coarse_cell_type", "fine_cell_type"])
    pred = pred.set_index("barcode").reindex(truth.index)
    want_fine = truth.map(fine_of)
    want_coarse = want_fine.map(coarse_of)
    fine_ok = pred["fine_cell_type"].to_numpy() == want_fine.to_numpy()
    coarse_ok = pred["coarse_cell_type"].to_numpy() == want_coarse.to_numpy()
    recall = {lab: round(float(fine_ok[(truth == lab).to_numpy()].mean()), 4) for lab in sorted(truth.unique())}
    return {
        "accuracy_fine": round(float(fine_ok.mean()), 4),
        "accuracy_coarse": round(float(coarse_ok.mean()), 4),
        "recall_fine_by_true_label": recall,
        "missing_from_output": int(pred["fine_cell_type"].isna().sum()),
    }


def run_annotate(work: Path, tag: str, matrix: str, ref: dict, truth: pd.Series, extra: list[str] = ()) -> dict:
    out = work / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no reused store, no resumed chunks
    cmd = dask_annot_cmd() + ["annotate", "--id", tag, "--matrix", matrix, "--cell-annotation-model", ref["path"],
                              "--output-dir", out, "--quiet", *extra]
    print(f"   dask-annot annotate {tag} ...", file=sys.stderr, flush=True)
    res = run_measured(cmd, log=work / "runs" / f"{tag}.log")
    check_ok(res, f"dask-annot annotate {tag}")
    mdir = out / tag / "outs" / "segmented_outs" / "cell_types" / MODEL_NAME
    run = json.loads((mdir / "run.json").read_text())
    rec = {"command": " ".join(map(str, cmd)), "git": git_state(), **res, "timings_s": run["timings_s"], "cells": run["cells"],
           "parameters": {k: run["parameters"].get(k) for k in ("k_used", "knn_method", "chunk_cells", "scheduler", "n_workers", "de_chunk_cells")},
           "de_groups": run.get("differential_expression", {}).get("groups"),
           "store": str(out / tag / "work" / "matrix.zarr")}
    rec.update(score_dask_annot(mdir / "cell_types.csv", truth, ref["meta"]))
    print(f"   {tag}: {res['wall_s']:.0f} s, peak {res['peak_rss_gb']:.2f} GB, accuracy {rec['accuracy_fine']:.4f}", file=sys.stderr, flush=True)
    return rec


# ----------------------------------------------------------------------------- ingest (peer venv)
def peers_python(args) -> str:
    if args.peers_python:
        return os.path.abspath(args.peers_python)
    res = subprocess.run(["bash", str(HERE / "setup_peers.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit("benchmarks/setup_peers.sh failed")
    return res.stdout.strip().splitlines()[-1]


def peer_main(args) -> None:
    """Runs inside benchmarks/.peers-venv: ``ingest-prep`` or ``ingest-map``."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import anndata as ad
    import scanpy as sc

    sc.settings.verbosity = 1
    sc.settings.n_jobs = args.n_jobs
    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(name):
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 2)
        t = now

    if args.peer == "ingest-prep":
        ref = sc.read_10x_h5(args.ref)
        ref.var_names_make_unique()
        labels = pd.read_csv(args.ref_labels, dtype=str, keep_default_na=False).set_index("barcode")["label"]
        ref.obs["label"] = pd.Categorical(labels.reindex(ref.obs_names).to_numpy())
        step("read_s")
        ref.X = ref.X.astype(np.float32)
        sc.pp.normalize_total(ref, target_sum=1e4)
        sc.pp.log1p(ref)
        sc.pp.highly_variable_genes(ref, n_top_genes=args.hvg)
        ref = ref[:, ref.var["highly_variable"].to_numpy()].copy()
        step("normalize_hvg_s")
        sc.pp.pca(ref, n_comps=50, random_state=args.seed)
        step("pca_s")
        sc.pp.neighbors(ref, n_neighbors=args.k, random_state=args.seed)
        step("neighbors_s")
        ref.write_h5ad(args.out)
        step("write_s")
        info = {"n_genes": int(ref.n_vars), "n_cells": int(ref.n_obs)}
    else:
        ref = ad.read_h5ad(args.ref)
        query = sc.read_10x_h5(args.query)
        query.var_names_make_unique()
        step("read_s")
        query.X = query.X.astype(np.float32)
        sc.pp.normalize_total(query, target_sum=1e4)
        sc.pp.log1p(query)
        query = query[:, ref.var_names].copy()
        step("normalize_s")
        sc.tl.ingest(query, ref, obs="label", embedding_method="pca")
        step("ingest_s")
        pd.DataFrame({"barcode": query.obs_names, "label": query.obs["label"].astype(str).to_numpy()}).to_csv(args.out, index=False)
        step("write_s")
        info = {"n_neighbors": int(ref.uns["neighbors"]["params"]["n_neighbors"]), "n_cells": int(query.n_obs)}
    versions = {m: getattr(__import__(m), "__version__", "?") for m in ("scanpy", "anndata", "pynndescent", "numpy", "numba", "sklearn")}
    Path(args.out).with_suffix(".json").write_text(json.dumps({"steps": steps, "versions": versions, **info}, indent=1))


def run_ingest(py: str, work: Path, ref_sim: dict, query_sim: dict, truth: pd.Series, k: int, args, *, tag: str = "") -> dict:
    """ingest prep + map, each its own measured process; numba's on-disk cache is the peers
    venv's own (as dask-annot's is its environment's), filled by an untimed warm-up first."""
    sys.path.insert(0, str(HERE))
    import simulate

    d = work / "ingest" / f"{tag}k{k}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    env = {k_: v for k_, v in os.environ.items() if k_ != "NUMBA_CACHE_DIR"}
    common = [py, Path(__file__).resolve(), "--seed", args.seed, "--n-jobs", args.n_jobs]
    prep_out, pred = d / "ref_prepped.h5ad", d / "pred.csv"
    print(f"   ingest k={k}: prep ...", file=sys.stderr, flush=True)
    prep = run_measured(common + ["--peer", "ingest-prep", "--ref", ref_sim["path"], "--ref-labels", simulate.labels_path(ref_sim["path"]),
                                  "--k", k, "--hvg", args.ingest_hvg, "--out", prep_out], log=d / "prep.log", env=env)
    check_ok(prep, f"ingest prep k={k}")
    prep["steps"] = json.loads(prep_out.with_suffix(".json").read_text())["steps"]
    print(f"   ingest k={k}: prep {prep['wall_s']:.0f} s, peak {prep['peak_rss_gb']:.2f} GB; map ...", file=sys.stderr, flush=True)
    mapped = run_measured(common + ["--peer", "ingest-map", "--ref", prep_out, "--query", query_sim["path"], "--out", pred],
                          log=d / "map.log", env=env)
    check_ok(mapped, f"ingest map k={k}")
    info = json.loads(pred.with_suffix(".json").read_text())
    mapped["steps"] = info["steps"]
    p = pd.read_csv(pred, dtype=str, keep_default_na=False).set_index("barcode")["label"].reindex(truth.index)
    ok = p.to_numpy() == truth.to_numpy()
    rec = {"k": k, "prep": prep, "map": mapped, "versions": info["versions"],
           "accuracy_fine": round(float(ok.mean()), 4),
           "recall_fine_by_true_label": {lab: round(float(ok[(truth == lab).to_numpy()].mean()), 4) for lab in sorted(truth.unique())},
           "wall_s_total": round(prep["wall_s"] + mapped["wall_s"], 2),
           "peak_rss_gb_max": max(prep["peak_rss_gb"], mapped["peak_rss_gb"])}
    print(f"   ingest k={k}: map {mapped['wall_s']:.0f} s, peak {mapped['peak_rss_gb']:.2f} GB, accuracy {rec['accuracy_fine']:.4f}",
          file=sys.stderr, flush=True)
    prep_out.unlink(missing_ok=True)  # GBs at k=500
    return rec


# ----------------------------------------------------------------------------- per-chunk kernels
def chunk_kernel_times(store_path: str, ref_path: str, *, chunk_cells: int, k_requested: int = 500) -> dict:
    """Each annotate stage's block kernel on the first chunk of the store, timed in this process.

    Calls the package's private kernels the way the Dask graph does (one BLAS thread, like a
    Dask worker), so per-chunk costs can be multiplied out for a cluster. A warm-up call of
    the kNN kernel (index unpickling, numba compilation) is timed separately.
    """
    from threadpoolctl import threadpool_limits

    from dask_annot import align, de, knn, normalize, outputs, pipeline, project, reference, store, vote

    st = store.open_store(store_path)
    model = reference.load_reference(ref_path)
    al = align.align_genes(query_ids=st.feature_ids, query_names=st.feature_names, ref_ids=model.gene_ids, ref_names=model.gene_names)
    k, _ = knn.neighbourhood(k_requested, model.n_cells)
    method = knn.choose_method(model.n_cells, "auto")  # what annotate's default (auto) picks
    balanced = k < k_requested
    proj = project.projection_matrix(model.loadings, al.query_index >= 0)
    n = min(chunk_cells, st.n_cells)
    out: dict = {"chunk_cells": n, "k": k, "knn_method": method, "ann_batch_cells": knn.ANN_BATCH_CELLS}
    times: dict[str, float] = {}

    def timed(name, f, *a):
        t0 = time.perf_counter()
        r = f(*a)
        times[name] = round(time.perf_counter() - t0, 4)
        return r

    with threadpool_limits(1):
        block = timed("read", store.read_block, st.path, 0, n, st.n_features)
        aligned = timed("align", align._align_block, block, al.selection())
        z = timed("zscore", normalize._zscore_block, aligned, st.umi_count[:n, None], model)
        emb = timed("project", project._project_block, z, proj)
        warm = min(64, n)

        def search(m):
            return [knn._neighbors_block(emb[lo : lo + knn.ANN_BATCH_CELLS], model, k, m, 0.2)
                    for lo in range(0, n, knn.ANN_BATCH_CELLS)]

        timed("knn_first_call_warmup", knn._neighbors_block, emb[:warm], model, k, method, 0.2)
        parts = timed("knn", search, method)
        if method != "ann" and (Path(ref_path) / "index.pkl").exists():
            # the reference also carries a pynndescent index: time that search too, for comparison
            timed("knn_ann_first_call_warmup (not in annotate)", knn._neighbors_block, emb[:warm], model, k, "ann", 0.2)
            timed("knn_ann (not in annotate)", search, "ann")
        nbrs = np.concatenate(parts)
        timed("vote", vote._vote_block, nbrs, model, balanced)
        timed("json_member", outputs.json_block, nbrs, model, st.barcodes[:n])
        # DE: the per-chunk sufficient statistics, on DE's own fixed chunk
        n_de = min(pipeline.DE_CHUNK_CELLS, st.n_cells)
        de_block = store.read_block(st.path, 0, n_de, st.n_features)
        codes = np.arange(n_de) % 4  # 4 groups, as the coarse types of the sorted-PBMC map
        timed("de_chunk_statistics", de._chunk_partial, de_block, codes, st.umi_count[:n_de], 4)
    out["seconds"] = times
    per = {k_: v for k_, v in times.items() if "warmup" not in k_ and "not in annotate" not in k_ and k_ != "de_chunk_statistics"}
    out["annotate_chunk_s"] = round(sum(per.values()), 4)
    out["annotate_s_per_10k_cells"] = round(sum(per.values()) * 10_000 / n, 4)
    out["de_chunk_cells"] = n_de
    out["de_s_per_10k_cells"] = round(times["de_chunk_statistics"] * 10_000 / n_de, 4)
    return out


# ----------------------------------------------------------------------------- report
def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def load_note(r: dict) -> str:
    """The machine's load around a run: 1-min load average at its start and, when sampled,
    the mean number of cores other processes kept busy during it."""
    out = f"{r.get('load_avg_1min_at_start', float('nan')):.1f} at start"
    if r.get("other_processes_mean_cores") is not None:
        out += f", others {r['other_processes_mean_cores']:.1f} cores"
    return out


def commit(r: dict) -> str:
    g = r.get("git") or {}
    return (str(g.get("head"))[:8] + ("+dirty" if g.get("dask_annot_uncommitted") else "")) if g.get("head") else "-"


def md_tables(res: dict) -> str:
    lines: list[str] = []
    sims = res.get("simulate", {})
    if sims:
        lines += ["### Simulated inputs (benchmarks/simulate.py)", "",
                  "| file | cells | seed | generate wall s | peak RSS GB | file GB | non-zero / cell |", "|---|---|---|---|---|---|---|"]
        for name, s in sims.items():
            m = s.get("measured") or {}
            wall = _f(m.get("wall_s")) if m else f"{_f(s.get('generate_s'))} (generate_s of its sim.json: made outside this benchmark)"
            lines.append(f"| {name} | {s['cells']:,} | {s['seed']} | {wall} | {_f(m.get('peak_rss_gb'), '{:.2f}')} | "
                         f"{s['matrix_bytes'] / GB:.2f} | {s['nnz'] / s['cells']:.0f} |")
        lines.append("")
    ref = res.get("reference")
    if ref:
        m = ref["measured"]
        lines += [f"Reference: `dask-annot build-reference` on {ref['cells']:,} simulated cells ({ref['knn_method']} index, "
                  f"{ref['n_genes']} genes, {len(ref['labels'])} labels): {m['wall_s']:.0f} s wall, peak {m['peak_rss_gb']:.2f} GB.", ""]
    ann = res.get("annotate", {})
    order = ["fingerprint", "convert", "load_model", "annotate", "de", "write", "summary"]
    seen = {k_ for a in ann.values() for k_ in a["timings_s"] if k_ != "total"}
    stages = [s_ for s_ in order if s_ in seen] + sorted(seen - set(order)) + ["total"]
    if ann:
        lines += ["### dask-annot annotate (default settings)", "",
                  "| cells | scheduler | kNN | " + " | ".join(f"{s} s" for s in stages) + " | process wall s | peak RSS GB (all processes) | accuracy fine | accuracy coarse | DE share of wall | machine load | dask-annot |",
                  "|" + "---|" * (len(stages) + 10)]
        for key in sorted(ann, key=int):
            a = ann[key]
            t = a["timings_s"]
            de_share = t.get("de", 0) / a["wall_s"] if a["wall_s"] else None
            lines.append(f"| {int(key):,} | {a['parameters'].get('scheduler')} | {a['parameters'].get('knn_method')} | " + " | ".join(_f(t.get(s)) for s in stages) +
                         f" | {a['wall_s']:.1f} | {a['peak_rss_gb']:.2f} | {a['accuracy_fine']:.4f} | {a['accuracy_coarse']:.4f} | {_f(de_share, '{:.0%}')} | {load_note(a)} | {commit(a)} |")
        lines += ["", "`annotate` = normalize + project + kNN + vote + per-chunk outputs (one Dask compute); `de` = sSeq DE on the coarse types; "
                  "`total` is run.json's; process wall adds interpreter start-up and imports.", ""]
    ing = res.get("ingest", {})
    if ing and ann.get(str(res.get("ingest_cells"))):
        a = ann[str(res["ingest_cells"])]
        no_de = a["timings_s"]["total"] - a["timings_s"].get("de", 0)
        lines += [f"### dask-annot vs scanpy ingest, {int(res['ingest_cells']):,}-cell query, {ref['cells']:,}-cell reference" if ref else "### dask-annot vs scanpy ingest", "",
                  "| method | wall s | peak RSS GB | accuracy fine | dask-annot / this: time | dask-annot / this: peak memory |", "|---|---|---|---|---|---|",
                  f"| dask-annot annotate (k={a['parameters']['k_used']}, {a['parameters']['knn_method']} search, DE included) | {a['wall_s']:.1f} | {a['peak_rss_gb']:.2f} | {a['accuracy_fine']:.4f} | 1 | 1 |"]
        build = ref["measured"]
        for kk in sorted(ing, key=lambda x: -int(x)):
            i = ing[kk]
            m, pr = i["map"], i["prep"]
            lines += [
                f"| ingest k={kk} map (load prepped reference, ingest query) | {m['wall_s']:.1f} | {m['peak_rss_gb']:.2f} | "
                f"{i['accuracy_fine']:.4f} | {a['wall_s'] / m['wall_s']:.2f} | {a['peak_rss_gb'] / m['peak_rss_gb']:.2f} |",
                f"| ingest k={kk} prep (reference PCA + neighbours) | {pr['wall_s']:.1f} | {pr['peak_rss_gb']:.2f} | | "
                f"{build['wall_s'] / pr['wall_s']:.2f} (build-reference) | {build['peak_rss_gb'] / pr['peak_rss_gb']:.2f} (build-reference) |",
            ]
        wu = res.get("ingest_warmup")
        if wu:
            lines += ["", f"Each ingest process ran after an untimed warm-up on {wu['ref_cells']:,}/{wu['query_cells']:,} cells (prep {wu['prep_wall_s']:.0f} s, "
                      f"map {wu['map_wall_s']:.0f} s) that fills numba's on-disk cache, as dask-annot's environment already has one."]
        lines += ["", f"dask-annot annotate without DE: {no_de:.1f} s (run.json total − de). "
                  "Ingest step times (s): " + "; ".join(f"k={kk} prep {ing[kk]['prep']['steps']}, map {ing[kk]['map']['steps']}" for kk in ing), ""]
    sc_ = res.get("scaling", {})
    if sc_.get("runs"):
        lines += [f"### Scaling on this machine ({sc_['cells']:,}-cell query, `--scheduler local`, 1 thread per worker, input = the zarr store)", "",
                  "| workers | kNN | annotate s | de s | total s | process wall s | peak RSS GB | accuracy fine | machine load | dask-annot |", "|---|---|---|---|---|---|---|---|---|---|"]
        for w in sorted(sc_["runs"], key=int):
            r = sc_["runs"][w]
            t = r["timings_s"]
            lines.append(f"| {w} | {r['parameters'].get('knn_method')} | {_f(t.get('annotate'))} | {_f(t.get('de'))} | {_f(t.get('total'))} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['accuracy_fine']:.4f} | {load_note(r)} | {commit(r)} |")
        if "speedup" in sc_:
            lines += ["", "Speed-up 1 -> 2 workers: " + ", ".join(f"{k_} {v:.2f}x" for k_, v in sc_["speedup"].items())]
        lines.append("")
    pc = sc_.get("per_chunk")
    if pc and "seconds" in pc:
        lines += [f"### Per-chunk kernel times (one chunk of {pc['chunk_cells']:,} cells, one thread, k={pc['k']}, {pc['knn_method']})", "",
                  "| kernel | s per chunk |", "|---|---|"]
        lines += [f"| {k_} | {v:.3f} |" for k_, v in pc["seconds"].items()]
        lines += ["", f"annotate kernels: {pc['annotate_s_per_10k_cells']:.2f} s per 10k cells per thread; DE statistics "
                  f"{pc['de_s_per_10k_cells']:.3f} s per 10k cells. Extrapolation for N cells on W single-thread workers: "
                  f"annotate stage ~ N/10k x {pc['annotate_s_per_10k_cells']:.2f} s / W, plus the serial driver stages "
                  "(fingerprint, convert, load_model, write) which do not scale with W.", ""]
    elif pc:
        lines += [f"Per-chunk kernel times: NOT MEASURED ({pc.get('error')})", ""]
    if res.get("notes"):
        lines += ["### Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    tg = res.get("targets")
    if tg:
        lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in tg]
        lines.append("")
    return "\n".join(lines)


def targets(res: dict) -> list[dict]:
    out = []
    big = res.get("annotate", {}).get("1200000")
    if big:
        out.append({"target": "1.2M cells annotate (DE incl.) <= 10 min wall", "measured": f"{big['wall_s']:.0f} s", "met": big["wall_s"] <= 600})
        out.append({"target": "1.2M cells peak memory (all processes) <= 6 GB", "measured": f"{big['peak_rss_gb']:.2f} GB", "met": big["peak_rss_gb"] <= 6.0})
        de = big["timings_s"].get("de")
        if de is not None:
            adds = de / max(big["wall_s"] - de, 1e-9)
            out.append({"target": "DE adds <= 25% to annotate wall at 1.2M", "measured": f"{de:.0f} s = +{adds:.0%}", "met": adds <= 0.25})
    small = res.get("annotate", {}).get(str(res.get("ingest_cells")))
    k500 = res.get("ingest", {}).get("500")
    if small and k500:
        sp_ = k500["map"]["wall_s"] / small["wall_s"]
        out.append({"target": "100k: >= 3x faster than ingest k=500 (map)", "measured": f"{sp_:.2f}x", "met": sp_ >= 3})
        out.append({"target": "100k: peak memory <= ingest k=500 (map)", "measured": f"{small['peak_rss_gb']:.2f} vs {k500['map']['peak_rss_gb']:.2f} GB",
                    "met": small["peak_rss_gb"] <= k500["map"]["peak_rss_gb"]})
    return out


# ----------------------------------------------------------------------------- main
def main_run(args) -> int:
    if args.nice:
        os.nice(args.nice)
    work = Path(args.work_dir).resolve()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "scale.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    if res.get("reference_cells") not in (None, args.ref_cells):
        res = {}  # another reference: earlier numbers are not comparable
    res["reference_cells"] = args.ref_cells

    def save():
        res["targets"] = targets(res)
        res_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
        (out_dir / "scale.md").write_text(header(res) + md_tables(res))

    sizes = [int(s) for s in args.sizes.split(",") if s]
    res.setdefault("simulate", {})
    res.setdefault("runs_log", []).append({
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_scale.py " + " ".join(args.argv), "git": git_state(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)},
    })
    print(f"== inputs (work dir {work})", file=sys.stderr)
    ref_sim = ensure_sim(work, "ref", args.ref_cells, REF_SEED)
    res["simulate"][Path(ref_sim["path"]).name] = {k: ref_sim.get(k) for k in ("cells", "seed", "nnz", "matrix_bytes", "measured", "cached", "generate_s")}
    queries = {}
    for n in sizes:
        q = ensure_sim(work, "query", n, QUERY_SEED)
        queries[n] = q
        res["simulate"][Path(q["path"]).name] = {k: q.get(k) for k in ("cells", "seed", "nnz", "matrix_bytes", "measured", "cached", "generate_s")}
    save()
    omap = None if args.ontology_map.lower() == "none" else args.ontology_map
    ref = ensure_reference(work, ref_sim, omap)
    res["reference"] = {"path": ref["path"], "cells": ref["meta"]["n_cells"], "n_genes": ref["meta"]["n_genes"], "knn_method": ref["meta"]["knn"]["method"],
                        "labels": ref["meta"]["labels"], "input_labels": ref["meta"]["input_labels"], "measured": ref["measured"], "cached": ref["cached"]}
    save()
    res.setdefault("annotate", {})
    for n in sizes:
        print(f"== annotate {n:,} cells", file=sys.stderr)
        res["annotate"][str(n)] = run_annotate(work, f"q{n}", queries[n]["path"], ref, truth_for(queries[n]), args.annotate_args)
        save()
    ingest_n = args.ingest_cells
    if not args.skip_ingest:
        if ingest_n not in queries:
            queries[ingest_n] = ensure_sim(work, "query", ingest_n, QUERY_SEED)
        py = peers_python(args)
        truth = truth_for(queries[ingest_n])
        res["ingest_cells"] = ingest_n
        res.setdefault("ingest", {})
        print("== scanpy ingest warm-up (fills numba's cache; not scored)", file=sys.stderr)
        warm_ref, warm_q = ensure_sim(work, "warmup_ref", 2000, 11), ensure_sim(work, "warmup_query", 1000, 12)
        w = run_ingest(py, work, warm_ref, warm_q, truth_for(warm_q), 15, args, tag="warmup_")
        res["ingest_warmup"] = {"prep_wall_s": w["prep"]["wall_s"], "map_wall_s": w["map"]["wall_s"], "ref_cells": 2000, "query_cells": 1000}
        for k in [int(x) for x in args.ingest_k.split(",") if x]:
            print(f"== scanpy ingest k={k} on {ingest_n:,} cells", file=sys.stderr)
            res["ingest"][str(k)] = run_ingest(py, work, ref_sim, queries[ingest_n], truth, k, args)
            save()
    if not args.skip_scaling:
        n = args.ingest_cells
        if n not in queries:
            queries[n] = ensure_sim(work, "query", n, QUERY_SEED)
        truth = truth_for(queries[n])
        base = res.get("annotate", {}).get(str(n))
        matrix = base["store"] if base and Path(base["store"]).exists() else queries[n]["path"]
        sc_ = res.setdefault("scaling", {})
        sc_["cells"], sc_["input"] = n, matrix
        sc_.setdefault("runs", {})
        for w in (1, 2):
            print(f"== scaling: {n:,} cells, LocalCluster {w} worker(s)", file=sys.stderr)
            sc_["runs"][str(w)] = run_annotate(work, f"scale{n}_w{w}", matrix, ref, truth,
                                               ["--scheduler", "local", "--n-workers", str(w), *args.annotate_args])
            save()
        r1, r2 = sc_["runs"]["1"]["timings_s"], sc_["runs"]["2"]["timings_s"]
        sc_["speedup"] = {s: round(r1[s] / r2[s], 3) for s in ("annotate", "de", "total") if r1.get(s) and r2.get(s)}
        store_path = matrix if Path(matrix).is_dir() else sc_["runs"]["1"]["store"]
        print("== per-chunk kernel times", file=sys.stderr)
        try:
            sc_["per_chunk"] = chunk_kernel_times(store_path, ref["path"], chunk_cells=args.chunk_cells)
        except Exception as exc:  # the package's private kernels moved: say so, never invent numbers
            sc_["per_chunk"] = {"error": f"{type(exc).__name__}: {exc}"}
        save()
    save()
    print(md_tables(res))
    print(f"wrote {res_path} and {out_dir / 'scale.md'}", file=sys.stderr)
    return 0


def header(res: dict) -> str:
    last = res["runs_log"][-1]
    runs = "".join(f"- {r['started']}: `{r['command'].strip()}` (dask-annot {str(r['git']['head'])[:8]})\n" for r in res["runs_log"])
    return (f"# Scale benchmark\n\nThe sections below come from these runs (each table row names its dask-annot commit):\n\n{runs}\n"
            f"Last run {last['started']} by `{last['command'].strip()}` on {last['machine']['cpus']} CPUs, "
            f"{last['machine']['mem_gb']} GB (a machine shared with other jobs: load average at the start of each run is in scale.json). "
            f"dask-annot at {str(last['git']['head'])[:10]}"
            + (f" with uncommitted changes to {', '.join(last['git']['dask_annot_uncommitted'])}" if last["git"]["dask_annot_uncommitted"] else "")
            + ".\n\nPeak RSS = the largest sum, sampled every 0.2 s, of the resident memory of the process and all its "
              "descendants (libraries shared by several processes count once each).\n\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1200000", help="query sizes to annotate (default 100000,1200000)")
    p.add_argument("--ref-cells", type=int, default=100_000, help="simulated reference cells (default 100000)")
    p.add_argument("--ingest-cells", type=int, default=100_000, help="query size for ingest and the scaling runs (default 100000)")
    p.add_argument("--ingest-k", default="500,15", help="ingest neighbourhoods (default 500,15: 10x's k and sc.pp.neighbors' default)")
    p.add_argument("--ingest-hvg", type=int, default=2000, help="ingest: highly variable genes of the reference (default 2000, as accuracy.py)")
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--ontology-map", default=str(DEFAULT_MAP), help="label -> CL map for the reference, or 'none' (fine = raw label)")
    p.add_argument("--chunk-cells", type=int, default=10_000, help="chunk for the per-chunk kernel timing (dask-annot's default)")
    p.add_argument("--annotate-arg", dest="annotate_args", action="append", default=[], help="extra argument passed to every annotate (repeatable)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK), help="simulated inputs, reference and runs (cached, gitignored)")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where scale.json/.md go")
    p.add_argument("--peers-python", help="python of the peers' venv (default: benchmarks/setup_peers.sh)")
    p.add_argument("--report-only", action="store_true", help="rewrite scale.md from scale.json and print it; run nothing")
    p.add_argument("--nice", type=int, default=10, help="niceness increment for this run and its children (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1)
    # peer mode (internal; runs inside the peers' venv)
    p.add_argument("--peer", choices=["ingest-prep", "ingest-map"], help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    p.add_argument("--ref-labels", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--hvg", type=int, default=2000, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.peer:
        peer_main(args)
        return 0
    if args.report_only:
        out_dir = Path(args.out_dir)
        res = json.loads((out_dir / "scale.json").read_text())
        res["targets"] = targets(res)
        (out_dir / "scale.md").write_text(header(res) + md_tables(res))
        print(md_tables(res))
        return 0
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
