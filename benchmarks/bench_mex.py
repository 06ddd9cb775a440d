#!/usr/bin/env python
"""Peak memory and time of converting a large 10x MEX directory into a store.

    python benchmarks/bench_mex.py --cells 200000 --workdir /tmp/mex [--code DIR ...]

Writes (once, reused) a MEX directory of ``--cells`` cells made by tiling a real Cell
Ranger matrix (default: tests/data's 1,107-cell GRCh38 chr21 file; each copy of a cell
gets its own barcode; ``--genes N`` keeps its first N genes), with the entries in Cell Ranger's order (by barcode, then
feature). Then, for each ``--code`` checkout (default: this one), runs
``dask-annot convert`` in a fresh process with that checkout first on ``PYTHONPATH`` and
reports its peak resident memory (``ru_maxrss``) and wall time as JSON lines.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "tests" / "data" / "tenx_h5_format_tests" / "scanpy_cr3.0_v3_grch38chr21_1107cells.h5"


def write_mex(source: Path, n_cells: int, out: Path, *, genes: int | None = None) -> dict:
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from dask_annot import h5

    info = h5.open_matrix(source)
    X = h5.read_cells(info, 0, info.n_cells)
    if genes:
        X = X[:, :genes]
        info = type(info)(**{**vars(info), "feature_ids": info.feature_ids[:genes], "feature_names": info.feature_names[:genes],
                             "ge_index": info.ge_index[:genes]})
    reps = -(-n_cells // info.n_cells)
    nnz = 0
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    per_rep = [X[: min(info.n_cells, n_cells - r * info.n_cells)] for r in range(reps)]
    total = sum(b.nnz for b in per_rep)
    with gzip.open(tmp / "matrix.mtx.gz", "wt", compresslevel=1) as fh:
        fh.write("%%MatrixMarket matrix coordinate integer general\n%\n")
        fh.write(f"{info.n_features} {n_cells} {total}\n")
        for r, b in enumerate(per_rep):
            coo = b.tocoo()
            df = pd.DataFrame({"f": coo.col + 1, "c": coo.row + 1 + r * info.n_cells, "v": coo.data})
            df.to_csv(fh, sep=" ", header=False, index=False)
            nnz += b.nnz
    with gzip.open(tmp / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{n}\tGene Expression\n" for i, n in zip(info.feature_ids, info.feature_names))
    with gzip.open(tmp / "barcodes.tsv.gz", "wt") as fh:
        for r in range(reps):
            k = min(info.n_cells, n_cells - r * info.n_cells)
            fh.writelines(f"{b.split('-')[0]}-{r + 1}\n" for b in info.barcodes[:k])
    os.replace(tmp, out)
    return {"cells": n_cells, "genes": info.n_features, "entries": nnz, "source": source.name}


def run_convert(code: Path, mex: Path, store: Path) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(code))
    prog = ("import resource,sys,time;from dask_annot import store;t=time.time();"
            f"store.convert({str(mex)!r},{str(store)!r});"
            "print(time.time()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"code": str(code), "error": out.stderr.strip().splitlines()[-1]}
    secs, kb = out.stdout.split()
    return {"code": str(code), "seconds": round(float(secs), 1), "peak_rss_gb": round(int(kb) / 2**20, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--genes", type=int, help="keep only the source's first N genes (fewer entries per cell)")
    ap.add_argument("--workdir", default="/tmp/dask-annot-bench-mex")
    ap.add_argument("--code", action="append", help="a checkout to measure (repeatable); default: this one")
    a = ap.parse_args()
    work = Path(a.workdir)
    mex = work / f"mex_{a.cells}_{Path(a.source).stem}_{a.genes or 'all'}"
    if not mex.exists():
        t = time.time()
        print(json.dumps({"wrote": str(mex), **write_mex(Path(a.source), a.cells, mex, genes=a.genes), "seconds": round(time.time() - t, 1)}), flush=True)
    for code in a.code or [str(ROOT)]:
        print(json.dumps(run_convert(Path(code), mex, work / "store.zarr")), flush=True)


if __name__ == "__main__":
    main()
