#!/usr/bin/env python
"""The query's own kNN graph at scale: inverted lists (dask-annot's) vs pynndescent vs exact.

One command (from the repository root; the store is any dask-annot zarr store, e.g. the
``work/matrix.zarr`` a 1.2M-cell ``bench_scale.py`` run leaves)::

    python benchmarks/bench_query_graph.py --store RUN/work/matrix.zarr [--labels LABELS.csv] [--sample 2000]

Writes ``benchmarks/results/query_graph.{json,md}``: for the query's own embedding
(``consensus.query_embedding``), the 15-NN graph from ``consensus.graph_of`` (inverted
lists above 50,000 cells) and from pynndescent (what graph_of used until stop 19, with its
parameters), each timed in a fresh process (wall and CPU of all threads; pynndescent's
numba compilation reported apart), and on ``--sample`` evenly spaced cells against the
exact Euclidean graph: recall@15, the mean distance to the 15 neighbours, and, with
``--labels`` (CSV with barcode order = store order, column ``label``), the share of
neighbours carrying the cell's own label (what pooling over neighbours needs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
K = 15

_LISTS = """
import sys, time, json, numpy as np, dask
sys.path.insert(0, {repo!r})
from dask_annot import consensus
y = np.load({y!r})
t, c = time.time(), time.process_time()
g = consensus.graph_of(y, len(y)).compute(scheduler="threads")
wall, cpu = time.time() - t, time.process_time() - c
np.save({out!r}, g["nbr"])
print(json.dumps({{"wall_s": wall, "cpu_s": cpu, "how": g["how"]}}))
"""

_PYNN = """
import sys, time, json, numpy as np
t, c = time.time(), time.process_time()
import pynndescent
y = np.load({y!r}).astype(np.float32)
pynndescent.NNDescent(y[:2000], n_neighbors=16, metric="euclidean", random_state=0, low_memory=True).neighbor_graph
jit_wall, jit_cpu = time.time() - t, time.process_time() - c
t, c = time.time(), time.process_time()
idx = pynndescent.NNDescent(y, n_neighbors=16, metric="euclidean", random_state=0, low_memory=True).neighbor_graph[0]
wall, cpu = time.time() - t, time.process_time() - c
out = np.array([[v for v in row if v != i][:15] for i, row in enumerate(idx.tolist())])
np.save({out!r}, out)
print(json.dumps({{"wall_s": wall, "cpu_s": cpu, "compile_wall_s": jit_wall, "compile_cpu_s": jit_cpu, "pynndescent": pynndescent.__version__}}))
"""


def _run(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _exact(y: np.ndarray, pick: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", y, y)
    out = []
    for lo in range(0, pick.size, 100):
        p = pick[lo : lo + 100]
        d2 = sq[p, None] + sq[None, :] - 2.0 * (y[p] @ y.T)
        d2[np.arange(p.size), p] = np.inf
        out.append(np.argsort(d2, axis=1, kind="stable")[:, :K])
    return np.concatenate(out)


def _quality(y, pick, nbr, exact, labels) -> dict:
    out = {
        "recall_at_15": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(exact.tolist(), nbr.tolist())])),
        "mean_neighbour_distance": float(np.mean([np.sqrt(((y[b[b >= 0]] - y[i]) ** 2).sum(1)).mean() for i, b in zip(pick, nbr)])),
    }
    if labels is not None:
        out["same_label_share"] = float(np.mean([(labels[b[b >= 0]] == labels[i]).mean() for i, b in zip(pick, nbr)]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--labels")
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import dask
    import pandas as pd

    from dask_annot import consensus, store

    st = store.open_store(args.store)
    t, c = time.time(), time.process_time()
    (y,) = dask.compute(consensus.query_embedding(st), scheduler="threads")
    emb = {"wall_s": time.time() - t, "cpu_s": time.process_time() - c}
    n = y.shape[0]
    pick = np.arange(0, n, max(1, n // args.sample))[: args.sample]
    labels = pd.read_csv(args.labels)["label"].to_numpy() if args.labels else None
    exact = _exact(y, pick)
    rows = {"exact": {"quality": _quality(y, pick, exact, exact, labels)}}
    with tempfile.TemporaryDirectory() as tmp:
        yp, lp, pp = (str(Path(tmp) / f) for f in ("y.npy", "lists.npy", "pynn.npy"))
        np.save(yp, y)
        rows["inverted lists"] = {"time": _run(_LISTS.format(repo=str(REPO), y=yp, out=lp))}
        rows["inverted lists"]["quality"] = _quality(y, pick, np.load(lp)[pick], exact, labels)
        rows["pynndescent"] = {"time": _run(_PYNN.format(y=yp, out=pp))}
        rows["pynndescent"]["quality"] = _quality(y, pick, np.load(pp)[pick], exact, labels)
    result = {"command": " ".join(["python", "benchmarks/bench_query_graph.py", *sys.argv[1:]]), "cells": int(n),
              "store": args.store, "embedding": emb, "sample": int(pick.size), "graphs": rows,
              "constants": {"LIST_CELLS": consensus.LIST_CELLS, "NEAR_LISTS": consensus.NEAR_LISTS,
                            "COARSE_LISTS": consensus.COARSE_LISTS, "BASIS_CELLS": consensus.BASIS_CELLS}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_graph.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The query's own 15-NN graph", "", f"`{result['command']}`: {n:,} cells; quality on {pick.size:,} evenly "
             "spaced cells against the exact Euclidean graph. Times in a fresh process each (CPU = all threads).", "",
             f"Own embedding (sampled basis, every cell projected): {emb['wall_s']:.1f} s wall, {emb['cpu_s']:.1f} CPU s.", "",
             "| graph | wall s | CPU s | compile s (separate) | recall@15 | mean distance to neighbours | same-label share |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        tm, q = r.get("time", {}), r["quality"]
        lines.append(f"| {name} | {tm.get('wall_s', float('nan')):.1f} | {tm.get('cpu_s', float('nan')):.1f} | "
                     f"{tm.get('compile_wall_s', 0):.1f} | {q['recall_at_15']:.3f} | {q['mean_neighbour_distance']:.3f} | "
                     f"{q.get('same_label_share', float('nan')):.4f} |")
    (out / "query_graph.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
