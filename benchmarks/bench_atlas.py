#!/usr/bin/env python
"""Atlas benchmark (issue 15): sharded references, the IVF search, graph sizes, 1 vs 2 workers.

One command (from the repository root)::

    nice -n 10 python benchmarks/bench_atlas.py [--ref-cells 1000000] [--query-cells 1200000] [--sample 2000] \
        [--workers-query-cells 200000] [--skip-pynndescent]

What it does, writing ``benchmarks/results/atlas.{json,md}``:

1. Simulates (``benchmarks/simulate.py``: fitted to the FACS-sorted PBMC of Zheng 2017,
   7 types, 8,846 genes) a reference (seed 1) and a query (seed 2), cached in the work dir.
2. ``dask-annot build-reference --knn-method ivf`` in one shard (inverted lists: global
   spherical k-means, one list per ~1,000 cells), then ``dask-annot reshard-reference`` into
   ``--shards`` shards (same arrays and lists, new shard files); both measured.
3. Search quality on ``--sample`` query cells (evenly spaced): the IVF search and
   pynndescent (the search ``auto`` used before, index built here with the build's
   parameters) against the exact float64 search: recall@k and top-label agreement (the
   10x plurality vote); and each search's time per 10,000 query cells in this process,
   one thread (a Dask worker's share).
4. ``dask-annot annotate`` of the query against each reference (threads, default chunks):
   wall, peak memory of all processes, graph bytes per submission (run.json), whether the
   two references' outputs are byte-identical; then ``--scheduler local`` with 1 and 2
   single-threaded workers on the 1-shard reference (a ``--workers-query-cells`` query): the speed-up.

Every run records the machine's 1-minute load at its start and how many cores other
processes kept busy meanwhile (``bench_scale.PeakRSS``): this machine is shared.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import bench_scale as bs  # noqa: E402  (measuring helpers: run_measured, ensure_sim, git_state)
import numpy as np  # noqa: E402

MODEL_NAME = bs.MODEL_NAME
MAP = bs.DEFAULT_MAP


def build(work: Path, ref_sim: dict, tag: str, extra: list[str]) -> dict:
    import simulate

    h5 = Path(ref_sim["path"])
    out = work / "reference" / f"{MODEL_NAME}_{ref_sim['cells']}_{tag}"
    measure = out.with_name(out.name + ".measure.json")
    if (out / "reference.json").exists() and measure.exists():
        return {"path": str(out), "cached": True, "measured": json.loads(measure.read_text()),
                "meta": json.loads((out / "reference.json").read_text())}
    shutil.rmtree(out, ignore_errors=True)
    cmd = bs.dask_annot_cmd() + ["build-reference", "--input", h5, "--labels", simulate.labels_path(h5), "--label-column", "label",
                                 "--name", MODEL_NAME, "--output", out, "--ontology-map", MAP, *extra]
    print(f"   building {out.name} ...", file=sys.stderr, flush=True)
    res = bs.run_measured(cmd, log=out.with_name(out.name + ".log"))
    bs.check_ok(res, f"build-reference {tag}")
    measure.write_text(json.dumps(res, indent=1) + "\n")
    return {"path": str(out), "cached": False, "measured": res, "command": " ".join(map(str, cmd)),
            "meta": json.loads((out / "reference.json").read_text())}


def reshard(work: Path, one: dict, shards: int) -> dict:
    """The 1-shard reference split into ``shards`` (``dask-annot reshard-reference``: same arrays and lists)."""
    out = Path(one["path"] + f"_reshard{shards}")
    shutil.rmtree(out, ignore_errors=True)
    n = one["meta"]["n_cells"]
    cmd = bs.dask_annot_cmd() + ["reshard-reference", "--reference", one["path"], "--output", out, "--shard-cells", str(-(-n // shards))]
    print(f"   resharding -> {out.name} ...", file=sys.stderr, flush=True)
    res = bs.run_measured(cmd, log=out.with_name(out.name + ".log"))
    bs.check_ok(res, "reshard-reference")
    return {"path": str(out), "measured": res, "command": " ".join(map(str, cmd)), "meta": json.loads((out / "reference.json").read_text())}


def annotate(work: Path, tag: str, matrix: str, ref: dict, extra: list[str] = ()) -> dict:
    out = work / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    cmd = bs.dask_annot_cmd() + ["annotate", "--id", tag, "--matrix", matrix, "--cell-annotation-model", ref["path"],
                                 "--output-dir", out, "--quiet", *extra]
    print(f"   annotate {tag} ...", file=sys.stderr, flush=True)
    res = bs.run_measured(cmd, log=work / "runs" / f"{tag}.log")
    bs.check_ok(res, f"annotate {tag}")
    mdir = out / tag / "outs" / "segmented_outs" / "cell_types" / MODEL_NAME
    run = json.loads((mdir / "run.json").read_text())
    print(f"   {tag}: {res['wall_s']:.0f} s, peak {res['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    return {"command": " ".join(map(str, cmd)), **res, "timings_s": run["timings_s"], "graph_bytes": run.get("graph_bytes"),
            "parameters": {k: run["parameters"].get(k) for k in ("k_used", "knn_method", "shards", "ivf_probes", "chunk_cells", "scheduler", "n_workers")},
            "model_dir": str(mdir), "store": str(out / tag / "work" / "matrix.zarr")}


def outputs_digest(mdir: str) -> dict:
    import hashlib

    m = Path(mdir)
    out = {}
    for name in ("cell_types.csv", "cell_annotation_differential_expression.csv"):
        out[name] = hashlib.sha256((m / name).read_bytes()).hexdigest()
    out["cell_annotation_results.json (decompressed)"] = hashlib.sha256(gzip.decompress((m / "cell_annotation_results.json.gz").read_bytes())).hexdigest()
    return out


def search_quality(store_path: str, ref: dict, *, sample: int, k: int, probes: int | None, pynndescent: bool = True) -> dict:
    """Recall@k and top-label agreement against the exact search, and seconds per 10k cells (one thread)."""
    from threadpoolctl import threadpool_limits

    import dask
    from dask_annot import knn, pipeline, store, vote
    from dask_annot.reference import load_reference

    model = load_reference(ref["path"])
    st = store.open_store(store_path)
    al = pipeline.align_to_model(st, model)
    emb = pipeline.embedding(st, model, al, chunk_cells=10_000)
    pick = np.linspace(0, st.n_cells - 1, sample).round().astype(np.int64)
    (q,) = dask.compute(emb[pick], scheduler="threads")
    q = np.asarray(q, dtype=np.float32)
    probes = probes or knn.probes_of(model.meta)
    res: dict = {"sample": int(sample), "k": k, "probes": probes, "n_lists": model.meta["shards"]["ivf"]["n_lists"]}

    def run(method: str, **kw):
        qd = dask.array.from_array(q, chunks=(q.shape[0], -1))
        t0 = time.process_time()  # CPU seconds: the machine is shared, wall time would measure the others
        with threadpool_limits(1):
            out = knn.sharded_neighbors(qd, model.shards, k=k, method=method, **kw).compute(scheduler="sync")
        return out, time.process_time() - t0

    import dask.array  # noqa: F401

    run("ivf", probes=probes)  # numba compile, page the shard in
    exact, t_exact = run("exact")
    ivf, t_ivf = run("ivf", probes=probes)
    labels = lambda nb: vote.vote_with_scores(nb, model, False)[0]["fine"]  # noqa: E731
    lab_exact = labels(exact)

    def score(nb, t):
        rec = np.mean([np.intersect1d(a[a >= 0], b[b >= 0]).size / max(1, (b >= 0).sum()) for a, b in zip(nb["idx"], exact["idx"])])
        return {"recall": round(float(rec), 5), "top_label_agreement": round(float(np.mean(labels(nb) == lab_exact)), 5),
                "cpu_s_per_10k_cells_1thread": round(t / sample * 10_000, 2)}

    res["exact"] = {"cpu_s_per_10k_cells_1thread": round(t_exact / sample * 10_000, 2)}
    res["ivf"] = score(ivf, t_ivf)
    if not pynndescent:
        return res
    # pynndescent, as annotate's `ann` search runs it (index built with build-reference's parameters)
    t0 = time.process_time()
    with threadpool_limits(1):
        index = knn.build_ann_index(model.embedding, seed=0, n_neighbors=30)
    t_build = time.process_time() - t0

    class _M:
        def ann_index(self):
            return index

    knn._neighbors_block(q[:50], _M(), k, "ann", 0.2)  # noqa: SLF001 - compile first, as for the others
    t0 = time.process_time()
    with threadpool_limits(1):
        ann = knn._neighbors_block(q, _M(), k, "ann", 0.2)  # noqa: SLF001 - the benchmark times the kernel itself
    res["pynndescent"] = {**score(ann, time.process_time() - t0), "index_build_cpu_s": round(t_build, 1)}
    return res


def md(r: dict) -> str:
    L = [f"# Atlas benchmark (issue 15)\n", f"Run {r['started']} at commit {r['git'].get('head', '?')[:10]}; command: `{r['command']}`.",
         f"Reference {r['ref_cells']:,} simulated cells, query {r['query_cells']:,} (benchmarks/simulate.py: Zheng 2017 sorted PBMC, "
         "7 types, 8,846 genes). **Reduced size** unless the numbers say 1,000,000 / 1,200,000.\n",
         "## Search quality and speed (2,000-cell sample, one thread)\n",
         "| search | recall@k vs exact | top-label agreement | CPU s per 10k cells (1 thread) |", "|---|---|---|---|"]
    q = r["quality"]
    L.append(f"| exact (float64) | 1 | 1 | {q['exact']['cpu_s_per_10k_cells_1thread']} |")
    L.append(f"| ivf ({q['probes']} of {q['n_lists']} lists) | {q['ivf']['recall']} | {q['ivf']['top_label_agreement']} | {q['ivf']['cpu_s_per_10k_cells_1thread']} |")
    if "pynndescent" in q:
        L.append(f"| pynndescent (eps 0.2) | {q['pynndescent']['recall']} | {q['pynndescent']['top_label_agreement']} | {q['pynndescent']['cpu_s_per_10k_cells_1thread']} (index {q['pynndescent']['index_build_cpu_s']} CPU s) |")
    L += ["", "## annotate runs\n", "| run | wall s | peak GB | graph bytes (annotate / de) | load at start | other procs' cores |", "|---|---|---|---|---|---|"]
    for tag, a in r["annotate"].items():
        gb = a.get("graph_bytes") or {}
        L.append(f"| {tag} | {a['wall_s']} | {a['peak_rss_gb']} | {gb.get('annotate')} / {gb.get('de')} | {a['load_avg_1min_at_start']} | {a['other_processes_mean_cores']} |")
    L += ["", f"1 vs {r['shards']} shards byte-identical: **{r.get('shards_identical')}**.",
          f"1 vs 2 workers speed-up (wall, {r.get('workers_query_cells', r['query_cells']):,} query cells): **{r.get('speedup_2_workers')}**.", ""]
    if r.get("extrapolation"):
        L += ["## Extrapolation (labelled: not measured at full size)\n", "```", json.dumps(r["extrapolation"], indent=1), "```"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-cells", type=int, default=1_000_000)
    p.add_argument("--query-cells", type=int, default=1_200_000)
    p.add_argument("--sample", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--probes", type=int, default=None, help="lists probed (default: the reference's)")
    p.add_argument("--skip-workers", action="store_true", help="no 1 vs 2 worker runs")
    p.add_argument("--workers-query-cells", type=int, default=200_000,
                   help="query cells of the 1 vs 2 worker runs (a separate simulated query, seed 2; default 200000)")
    p.add_argument("--skip-pynndescent", action="store_true", help="no pynndescent index in the search-quality part (its build takes minutes at 1M)")
    p.add_argument("--work-dir", default=str(HERE / "results" / "work"))
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--nice", type=int, default=0, help="niceness increment (default 0: start it with `nice -n 10`)")
    a = p.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    work = Path(a.work_dir)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    r: dict = {"started": started, "command": "python benchmarks/bench_atlas.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "git": bs.git_state(), "ref_cells": a.ref_cells, "query_cells": a.query_cells, "shards": a.shards,
               "cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    ref_sim = bs.ensure_sim(work, "ref", a.ref_cells, bs.REF_SEED)
    query_sim = bs.ensure_sim(work, "query", a.query_cells, bs.QUERY_SEED)
    r["simulate"] = {"ref": ref_sim.get("measured"), "query": query_sim.get("measured")}
    one = build(work, ref_sim, "ivf1", ["--knn-method", "ivf", "--shard-cells", str(a.ref_cells)])
    many = reshard(work, one, a.shards)
    r["build"] = {"1": one["measured"], str(a.shards): many["measured"]}
    ivf = ["--knn-method", "ivf"]  # what auto picks above 400,000 reference cells; asked for at reduced size
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    r["annotate"] = runs

    def save() -> None:  # after every step: a long run stopped early keeps what it measured
        (out / "atlas.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        if "quality" in r:
            (out / "atlas.md").write_text(md(r))

    runs["threads_1shard"] = annotate(work, "t1", query_sim["path"], one, ivf)
    store_path = runs["threads_1shard"]["store"]
    save()
    r["quality"] = search_quality(store_path, one, sample=a.sample, k=min(500, runs["threads_1shard"]["parameters"]["k_used"]), probes=a.probes,
                                  pynndescent=not a.skip_pynndescent)
    save()
    runs[f"threads_{a.shards}shards"] = annotate(work, f"t{a.shards}", store_path, many, ivf)
    r["shards_identical"] = outputs_digest(runs["threads_1shard"]["model_dir"]) == outputs_digest(runs[f"threads_{a.shards}shards"]["model_dir"])
    save()
    if not a.skip_workers:
        wq = query_sim["path"] if a.workers_query_cells == a.query_cells else bs.ensure_sim(work, "query", a.workers_query_cells, bs.QUERY_SEED)["path"]
        r["workers_query_cells"] = a.workers_query_cells
        for n in (1, 2):
            runs[f"local_{n}worker"] = annotate(work, f"w{n}", wq, one, [*ivf, "--scheduler", "local", "--n-workers", str(n)])
            save()
        r["speedup_2_workers"] = round(runs["local_1worker"]["wall_s"] / runs["local_2worker"]["wall_s"], 2)
    save()
    print(md(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
