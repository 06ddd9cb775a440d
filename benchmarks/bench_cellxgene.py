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


def tile_into_cellxgene_files(source: Path, label_column: str, n_cells: int, n_files: int, out: Path) -> list[Path]:
    """``n_cells`` cells made by repeating a real labelled h5ad's cells (each copy its own barcode)."""
    import anndata as ad

    sys.path.insert(0, str(ROOT))
    from dask_annot import h5

    info = h5.open_matrix(source)
    X = h5.read_cells(info, 0, info.n_cells)
    labels = ad.read_h5ad(source, backed="r").obs[label_column].astype(str).map(_cl_map()).to_numpy()

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
    a = ap.parse_args()
    cmd_build(a) if a.cmd == "build" else cmd_evidence(a)


if __name__ == "__main__":
    main()
