#!/usr/bin/env python
"""Atlas-scale CELLxGENE references (issue 14): build time and peak memory, and the JSON
evidence kernel's peak at 300 labels x 100 datasets.

    python benchmarks/bench_cellxgene.py build --cells 1000000 --files 20 --workdir /tmp/cxg-bench
    python benchmarks/bench_cellxgene.py evidence [--cells 10000 --k 500 --labels 300 --datasets 100]

``build``: simulates ``--cells`` cells with benchmarks/simulate.py (fitted to the sorted PBMC,
seed 1) or, with ``--tile SOURCE.h5ad``, repeats that file's real cells; splits them into ``--files`` CELLxGENE-schema h5ads (``cell_type_ontology_term_id``
= the Cell Ontology id of the simulated type, ``feature_name``, raw counts in X, the dataset
id from the file name), then runs ``dask-annot build-reference --input <all files>`` in a
fresh process and reports its wall time and peak resident memory (``ru_maxrss``).
``evidence``: runs the JSON evidence kernel on one chunk of random neighbours over a
reference with that many labels and datasets, and reports its peak traced allocation
(``tracemalloc``) beside what the former dense kernel allocated (cells x labels x datasets x 8 B).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cl_map() -> dict[str, str]:
    return {r["label"]: r["ontology_id"] for r in csv.DictReader(open(ROOT / "dask_annot" / "data" / "maps" / "pbmc_sorted_zheng2017.csv"))}


def _write_cellxgene_files(n_cells: int, n_files: int, out: Path, info, part) -> list[Path]:
    """``n_files`` CELLxGENE-schema h5ads of ``n_cells`` cells in all; ``part(a, b)`` gives the
    counts, CL ids and barcodes of cells ``a:b``. Files already written are kept."""
    import anndata as ad
    import pandas as pd

    var = pd.DataFrame({"feature_name": list(info.feature_names)}, index=pd.Index(list(info.feature_ids)))
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_cells, n_files + 1).astype(int)
    files = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        p = out / f"dataset-{i:02d}.h5ad"
        files.append(p)
        if p.exists():
            continue
        X, cl_ids, barcodes = part(a, b)
        obs = pd.DataFrame({"cell_type_ontology_term_id": pd.Categorical(cl_ids), "is_primary_data": True},
                           index=pd.Index(barcodes))
        tmp = p.with_suffix(".tmp.h5ad")
        ad.AnnData(X=X, obs=obs, var=var).write_h5ad(tmp)
        os.replace(tmp, p)
    return files


def split_into_cellxgene_files(sim: Path, labels_csv: Path, n_files: int, out: Path) -> list[Path]:
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from dask_annot import h5

    truth = pd.read_csv(labels_csv)["label"].map(_cl_map()).to_numpy()
    info = h5.open_matrix(sim)
    return _write_cellxgene_files(info.n_cells, n_files, out, info, lambda a, b: (
        h5.read_cells(info, a, b), truth[a:b], [str(x) for x in info.barcodes[a:b]]))


def _source_cells(source: Path, label_column: str):
    """A real labelled h5ad's matrix info, all its counts, and its labels as CL ids."""
    import anndata as ad

    sys.path.insert(0, str(ROOT))
    from dask_annot import h5

    info = h5.open_matrix(source)
    X = h5.read_cells(info, 0, info.n_cells)
    own = ad.read_h5ad(source, backed="r").obs[label_column].astype(str).map(_cl_map()).to_numpy()
    return info, X, own


def tile_into_cellxgene_files(source: Path, label_column: str, n_cells: int, n_files: int, out: Path) -> list[Path]:
    """``n_cells`` cells made by repeating a real labelled h5ad's cells (each copy its own barcode)."""
    info, X, labels = _source_cells(source, label_column)

    def part(a, b):
        rows = np.arange(a, b) % info.n_cells
        return X[rows], labels[rows], [f"c{j:07d}" for j in range(a, b)]

    return _write_cellxgene_files(n_cells, n_files, out, info, part)


def cmd_build(a) -> None:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if a.tile:
        files = tile_into_cellxgene_files(Path(a.tile), a.label_column, a.cells, a.files, work / f"tiled_{a.cells}_{a.files}")
    else:
        sim = work / f"sim_{a.cells}.h5"
        if not sim.exists():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simulate.py"), "--cells", str(a.cells), "--output", str(sim), "--seed", "1"],
                           check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        print(json.dumps({"simulated": str(sim), "seconds": round(time.time() - t, 1)}), flush=True)
        t = time.time()
        files = split_into_cellxgene_files(sim, sim.with_suffix(".labels.csv"), a.files, work / f"cxg_{a.cells}_{a.files}")
    print(json.dumps({"files": len(files), "seconds": round(time.time() - t, 1)}), flush=True)
    out = work / "ref"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    prog = ("import resource,sys,time;from dask_annot.cli import main;t=time.time();rc=main(sys.argv[1:]);"
            "print('BENCH', time.time()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr);sys.exit(rc)")
    args = ["build-reference", "--input", *map(str, files), "--name", "cxg_bench", "--output", str(out)]
    if a.max_cells_per_type:
        args += ["--max-cells-per-type", str(a.max_cells_per_type)]
    r = subprocess.run([sys.executable, "-c", prog, *args], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    line = [x for x in r.stderr.splitlines() if x.startswith("BENCH")]
    if r.returncode or not line:
        print(json.dumps({"error": r.stderr.strip().splitlines()[-3:]}))
        return
    _, secs, kb = line[-1].split()
    meta = json.loads((out / "reference.json").read_text())
    print(json.dumps({"build": "cellxgene files", "input": "tiled " + Path(a.tile).name if a.tile else "simulated", "cells": meta["n_cells"], "files": len(files), "datasets": len(meta["datasets"]),
                      "minutes": round(float(secs) / 60, 2), "peak_rss_gb": round(int(kb) / 2**20, 2),
                      "max_cells_per_type": a.max_cells_per_type}), flush=True)


def cmd_evidence(a) -> None:
    import tracemalloc

    sys.path.insert(0, str(ROOT))
    from dask_annot import outputs

    class M:  # the attributes the kernel reads
        pass

    rng = np.random.default_rng(0)
    m = M()
    n_ref = a.reference_cells
    m.labels = tuple(f"CL:{i:07d}" for i in range(a.labels))
    m.datasets = tuple(f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(a.datasets))
    m.label_codes = rng.integers(0, a.labels, n_ref).astype(np.int32)
    m.dataset_codes = rng.integers(0, a.datasets, n_ref).astype(np.int32)
    nbrs = np.zeros((a.cells, a.k), dtype=[("idx", np.int64), ("dist", np.float32)])
    nbrs["idx"] = rng.integers(0, n_ref, (a.cells, a.k))
    bcs = np.array([f"cell{i:07d}-1" for i in range(a.cells)], dtype=object)
    t, c = time.time(), time.process_time()
    member = outputs.json_block(nbrs, m, bcs)
    secs, cpu = time.time() - t, time.process_time() - c
    tracemalloc.start()  # a second run for the peak: tracing slows allocation several-fold
    outputs.json_block(nbrs, m, bcs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"evidence_kernel": {"cells": a.cells, "k": a.k, "labels": a.labels, "datasets": a.datasets,
                                          "peak_traced_mb": round(peak / 2**20, 1), "seconds": round(secs, 1), "cpu_seconds": round(cpu, 1),
                                          "output_mb": round(len(member) / 2**20, 1),
                                          "estimate_mb": round(outputs.evidence_memory_bytes(a.cells, k=a.k) / 2**20, 1),
                                          "dense_kernel_mb": round(a.cells * a.labels * a.datasets * 8 / 2**20, 1),
                                          "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}}))


def _cl_pool(n: int) -> list[str]:
    """``n`` Cell Ontology ids of the shipped release with distinct names (sorted ids, first ``n``)."""
    sys.path.insert(0, str(ROOT))
    from dask_annot.ontology import cell_ontology

    cl, seen, out = cell_ontology(), set(), []
    for term in sorted(cl):
        name = cl[term]["label"]
        if term.startswith("CL:") and name not in seen:
            seen.add(name)
            out.append(term)
        if len(out) == n:
            return out
    raise SystemExit(f"the shipped Cell Ontology has fewer than {n} distinctly named CL terms")


def write_relabelled_reference(source: Path, label_column: str, n_cells: int, n_labels: int, n_datasets: int, out: Path,
                               *, seed: int = 0) -> Path:
    """One CELLxGENE-schema h5ad of ``n_cells`` real cells (``source``'s cells repeated in order),
    re-labelled into ``n_labels`` Cell Ontology ids over ``n_datasets`` dataset ids.

    The labels keep the source's types apart: type t of T gets its own share of the
    ``n_labels`` ids and each cell one of them at random (seeded), so every label is one real
    type; the dataset id (a UUID-shaped string, as CELLxGENE's) is drawn uniformly per cell.
    ``n_labels=0``: the source's own labels (through the sorted PBMC's CL map), one dataset.
    """
    import anndata as ad
    import pandas as pd

    if out.exists():
        return out
    info, X, own = _source_cells(source, label_column)
    rows = np.arange(n_cells) % info.n_cells
    rng = np.random.default_rng(seed)
    if n_labels:
        types, t_of = np.unique(own, return_inverse=True)
        share = np.array_split(np.array(_cl_pool(n_labels)), types.size)
        pick = rng.random(n_cells)
        labels = np.array([share[t][int(u * share[t].size)] for t, u in zip(t_of[rows].tolist(), pick.tolist())], dtype=object)
        ds_names = np.array([f"{i:08x}-0000-4000-8000-{i * 7919:012x}" for i in range(n_datasets)], dtype=object)
        datasets = ds_names[rng.integers(0, n_datasets, n_cells)]
    else:
        labels = own[rows]
        datasets = np.full(n_cells, "baseline-dataset", dtype=object)
    var = pd.DataFrame({"feature_name": list(info.feature_names)}, index=pd.Index(list(info.feature_ids)))
    obs = pd.DataFrame({"cell_type_ontology_term_id": pd.Categorical(labels), "dataset_id": pd.Categorical(datasets),
                        "is_primary_data": True}, index=pd.Index([f"c{j:07d}" for j in range(n_cells)]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.h5ad")
    ad.AnnData(X=X[rows], obs=obs, var=var).write_h5ad(tmp)
    os.replace(tmp, out)
    return out


def write_tiled_query(source: Path, n_cells: int, out: Path) -> Path:
    """An h5ad of ``n_cells`` real cells: ``source``'s raw counts repeated (each copy its own barcode)."""
    import anndata as ad
    import pandas as pd

    if out.exists():
        return out
    sys.path.insert(0, str(ROOT))
    from dask_annot import h5

    info = h5.open_matrix(source)
    X = h5.read_cells(info, 0, info.n_cells)
    rows = np.arange(n_cells) % info.n_cells
    var = pd.DataFrame(index=pd.Index(list(info.feature_names)))
    var["gene_ids"] = list(info.feature_ids)
    var = var[~var.index.duplicated()]
    keep_cols = np.flatnonzero(~pd.Index(list(info.feature_names)).duplicated())
    obs = pd.DataFrame(index=pd.Index([f"q{j:07d}-1" for j in range(n_cells)]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.h5ad")
    ad.AnnData(X=X[rows][:, keep_cols], obs=obs, var=var).write_h5ad(tmp)
    os.replace(tmp, out)
    return out


class _RssTimeline:
    """Summed RSS of this process's children (and theirs) every 0.5 s, to say in which stage
    of annotate the peak fell (stages from run.json's timings, in run order, ending at exit)."""

    STAGES = ("fingerprint", "convert", "geometry", "load_model", "annotate", "consensus", "de", "write", "summary")

    def __enter__(self):
        import threading

        import psutil

        self._me, self.points, self._stop = psutil.Process(), [], threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        import psutil

        while not self._stop.wait(0.5):
            total = 0
            for p in self._me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.points.append((time.perf_counter() - self._t0, total))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def stage_of_peak(self, timings: dict, wall: float) -> dict:
        if not self.points:
            return {}
        t_peak, peak = max(self.points, key=lambda x: x[1])
        stages = [(k, float(timings[k])) for k in self.STAGES if k in timings]
        end = wall  # stages end at the process's exit (imports and set-up come first)
        bounds = []
        for name, secs in reversed(stages):
            bounds.append((name, end - secs, end))
            end -= secs
        def stage_at(t):
            return next((n for n, lo, hi in bounds if lo <= t <= hi), "start-up")

        by_stage: dict[str, float] = {}
        for t, rss in self.points:
            by_stage[stage_at(t)] = max(by_stage.get(stage_at(t), 0), rss)
        return {"stage": stage_at(t_peak), "at_s": round(t_peak, 1), "rss_gb": round(peak / 1e9, 3),
                "peak_gb_by_stage": {k: round(v / 1e9, 3) for k, v in by_stage.items()}}


def cmd_annotate(a) -> None:
    """End to end: build the 300 x 100 reference and the baseline one, annotate the same
    100k-cell query with each, compare peak memory (all processes) and the JSON evidence."""
    import gzip

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale import run_measured

    work = Path(a.workdir)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    query = write_tiled_query(Path(a.query), a.query_cells, work / f"query_{a.query_cells}.h5ad")
    results = {}
    for tag, n_labels, n_datasets in (("wide", a.labels, a.datasets), ("baseline", 0, 1)):
        t = time.time()
        src = write_relabelled_reference(Path(a.tile), a.label_column, a.reference_cells, n_labels, n_datasets,
                                         work / f"ref_{tag}_{a.reference_cells}.h5ad")
        made = round(time.time() - t, 1)
        ref = work / f"ref_{tag}"
        if not (ref / "reference.json").exists():
            import shutil

            shutil.rmtree(ref, ignore_errors=True)
            b = run_measured([sys.executable, "-m", "dask_annot", "build-reference", "--input", str(src), "--name", "cxg_" + tag,
                              "--output", str(ref)], log=work / f"build_{tag}.log", env=env, cwd=ROOT)
            if b["returncode"]:
                raise SystemExit(f"build {tag} failed, see {b['log']}")
        else:
            b = None
        meta = json.loads((ref / "reference.json").read_text())
        out = work / f"run_{tag}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "dask_annot", "annotate", "--id", tag, "--matrix", str(query), "--cell-annotation-model", str(ref),
               "--output-dir", str(out), "--quiet", *a.annotate_args]
        with _RssTimeline() as timeline:
            r = run_measured(cmd, log=work / f"annotate_{tag}.log", env=env, cwd=ROOT)
        if r["returncode"]:
            raise SystemExit(f"annotate {tag} failed, see {r['log']}")
        mdir = out / tag / "outs" / "segmented_outs" / "cell_types" / ("cxg_" + tag)
        ev = mdir / "cell_annotation_results.json.gz"
        run = json.loads((mdir / "run.json").read_text())
        n_entries = 0
        with gzip.open(ev, "rt") as fh:
            for line in fh:
                n_entries += line.count('"dataset_id"') if '"dataset_id"' in line else 0
        results[tag] = {"reference_cells": meta["n_cells"], "labels": len(meta["labels"]), "datasets": len(meta["datasets"]),
                        "reference_h5ad_seconds": made, "build": b, "annotate": r, "timings_s": run["timings_s"],
                        "k_used": run["parameters"].get("k_used"), "chunk_cells": run["parameters"].get("chunk_cells"),
                        "evidence_gz_mb": round(ev.stat().st_size / 2**20, 1), "query_cells": run["cells"],
                        "peak_stage": timeline.stage_of_peak(run["timings_s"], r["wall_s"])}
        print(json.dumps({tag: results[tag]}), flush=True)
    w, base = results["wide"]["annotate"], results["baseline"]["annotate"]
    print(json.dumps({"peak_ratio_wide_over_baseline": round(w["peak_rss_gb"] / base["peak_rss_gb"], 3),
                      "wall_ratio_wide_over_baseline": round(w["wall_s"] / base["wall_s"], 3)}), flush=True)
    (work / "annotate_results.json").write_text(json.dumps(results, indent=1) + "\n")


def write_soma_census(source: Path, label_column: str, n_cells: int, n_datasets: int, uri: Path) -> Path:
    """A Census-shaped local SOMA store (``census_data/homo_sapiens``, ``X['raw']``,
    ``census_info/summary``) of ``n_cells`` real cells: ``source``'s cells repeated, their own
    labels as CL ids (the sorted PBMC map), the dataset id drawn per cell (seed 0)."""
    import anndata as ad
    import pandas as pd
    import pyarrow as pa
    import tiledbsoma as soma
    import tiledbsoma.io

    if (uri / "census_data").exists():
        return uri
    info, X, own = _source_cells(source, label_column)
    rows = np.arange(n_cells) % info.n_cells
    datasets = np.array([f"dataset-{i:03d}" for i in range(n_datasets)], dtype=object)[np.random.default_rng(0).integers(0, n_datasets, n_cells)]
    obs = pd.DataFrame({"cell_type_ontology_term_id": own[rows].astype(str), "dataset_id": datasets.astype(str),
                        "is_primary_data": True}, index=pd.Index([f"c{j:07d}" for j in range(n_cells)]))
    var = pd.DataFrame({"feature_id": list(info.feature_ids), "feature_name": list(info.feature_names)},
                       index=pd.Index(list(info.feature_ids)))
    a = ad.AnnData(X=X[rows].astype(np.float32), obs=obs, var=var)
    with soma.Collection.create(str(uri)) as root:
        root.add_new_collection("census_data")
        cinfo = root.add_new_collection("census_info")
        schema = pa.schema([("label", pa.large_string()), ("value", pa.large_string())])
        summ = cinfo.add_new_dataframe("summary", schema=schema, index_column_names=["soma_joinid"], domain=[(0, 1)])
        summ.write(pa.table({"soma_joinid": pa.array([0, 1], pa.int64()), "label": ["census_schema_version", "census_build_date"],
                             "value": ["bench", "bench"]}))
    exp_uri = f"{uri}/census_data/homo_sapiens"
    tiledbsoma.io.from_anndata(exp_uri, a, measurement_name="RNA", X_layer_name="raw")
    with soma.Collection.open(f"{uri}/census_data", "w") as cd, soma.Experiment.open(exp_uri) as exp:
        cd.set("homo_sapiens", exp, use_relative_uri=True)
    return uri


def cmd_census(a) -> None:
    """build-reference --census-uri on a local SOMA store: the slices read by 1 or 2 Dask
    threads, 2 LocalCluster workers, and (``--main``) another checkout's code; arrays compared."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale import run_measured

    sys.path.insert(0, str(ROOT))
    from dask_annot.reference import read_artifact

    work = Path(a.workdir)
    uri = write_soma_census(Path(a.tile), a.label_column, a.cells, a.datasets, work / f"census_{a.cells}")
    runs = [(f"{s}-{n}", ROOT, ["--scheduler", s, "--n-workers", str(n)]) for s, n in a.runs]
    if a.main:
        runs.insert(0, ("serial-main", Path(a.main), []))
    results, first = {}, None
    for tag, code, flags in runs:
        out = work / f"ref_{tag}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "dask_annot", "build-reference", "--census", "", "--census-uri", str(uri), "--name", "census_bench",
               "--output", str(out), *flags]
        r = run_measured(cmd, log=work / f"build_{tag}.log", env=dict(os.environ, PYTHONPATH=str(code)), cwd=code)
        if r["returncode"]:
            raise SystemExit(f"{tag} failed, see {r['log']}")
        arrays = read_artifact(out)[1]
        if first is None:
            first = arrays
        same = sorted(arrays) == sorted(first) and all(np.array_equal(arrays[k], first[k]) for k in first)
        results[tag] = {**r, "identical_to_" + runs[0][0]: same, "code": str(code)}
        print(json.dumps({tag: results[tag]}), flush=True)
    (work / "census_results.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--cells", type=int, default=1_000_000)
    b.add_argument("--files", type=int, default=20)
    b.add_argument("--max-cells-per-type", type=int, default=None)
    b.add_argument("--tile", default=None, help="repeat this labelled h5ad's cells instead of simulating (faster to make)")
    b.add_argument("--label-column", default="trueLabel", help="--tile's label column (mapped to CL by the sorted PBMC map)")
    b.add_argument("--workdir", default="/tmp/dask-annot-bench-cxg")
    e = sub.add_parser("evidence")
    e.add_argument("--cells", type=int, default=10_000)
    e.add_argument("--k", type=int, default=500)
    e.add_argument("--labels", type=int, default=300)
    e.add_argument("--datasets", type=int, default=100)
    e.add_argument("--reference-cells", type=int, default=1_000_000)
    n = sub.add_parser("annotate")
    n.add_argument("--reference-cells", type=int, default=100_000)
    n.add_argument("--labels", type=int, default=300)
    n.add_argument("--datasets", type=int, default=100)
    n.add_argument("--query-cells", type=int, default=100_000)
    n.add_argument("--tile", default=str(ROOT.parent / "shared/data/pbmc_sorted_zheng2017/pbmc_sorted_3500.h5ad"))
    n.add_argument("--label-column", default="trueLabel")
    n.add_argument("--query", default=str(ROOT.parent / "shared/data/pbmc4k_soupx/pbmc4k_2170cells_soupx_labels.h5ad"))
    n.add_argument("--workdir", default="/tmp/dask-annot-bench-cxg-annotate")
    n.add_argument("annotate_args", nargs="*", help="extra flags for annotate (after --)")
    c = sub.add_parser("census")
    c.add_argument("--cells", type=int, default=50_000)
    c.add_argument("--datasets", type=int, default=20)
    c.add_argument("--tile", default=str(ROOT.parent / "shared/data/pbmc_sorted_zheng2017/pbmc_sorted_3500.h5ad"))
    c.add_argument("--label-column", default="trueLabel")
    c.add_argument("--main", default=None, help="also build with this checkout's code (e.g. /work/main: Census read on the driver)")
    c.add_argument("--runs", default=[("threads", 1), ("threads", 2), ("local", 2)],
                   type=lambda v: [(x.split(":")[0], int(x.split(":")[1])) for x in v.split(",")],
                   help="scheduler:workers,... (default threads:1,threads:2,local:2)")
    c.add_argument("--workdir", default="/tmp/dask-annot-bench-census")
    a = ap.parse_args()
    {"build": cmd_build, "evidence": cmd_evidence, "annotate": cmd_annotate, "census": cmd_census}[a.cmd](a)


if __name__ == "__main__":
    main()
