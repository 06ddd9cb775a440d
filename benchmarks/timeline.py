#!/usr/bin/env python
"""Where a run's time goes: a Dask timeline of one ``dask-annot annotate`` (threads scheduler).

One command (from the repository root)::

    python benchmarks/timeline.py MATRIX MODEL [--out-dir DIR]

Runs ``dask_annot.api.annotate`` in this process with a Dask callback that records, per task
name prefix (``dask.utils.key_split``), when its first task started, when its last one ended
(seconds from the first compute), the summed task time and the task count, and prints them in
order of ending. Used at stop 19 to find that the foreign-gene statistics and the query's own
graph ran after the whole search. Tasks of a second submission made from another thread (the
query graph, ``pipeline._compute_beside_graph``) may be missing: callbacks follow the thread.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from dask.callbacks import Callback
    from dask.utils import key_split

    from dask_annot import api

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("matrix")
    ap.add_argument("model")
    ap.add_argument("--out-dir", default=None, help="annotate's output dir (default: a temporary one)")
    args = ap.parse_args()
    rec = collections.defaultdict(lambda: [float("inf"), 0.0, 0.0, 0])
    starts: dict = {}
    t0: list = []

    class Timeline(Callback):
        def _start(self, dsk):
            if not t0:
                t0.append(time.time())

        def _pretask(self, key, dsk, state):
            starts[key] = time.time()

        def _posttask(self, key, result, dsk, state, id):
            t = time.time()
            s = starts.pop(key, t)
            r = rec[key_split(key)]
            r[0], r[1], r[2], r[3] = min(r[0], s - t0[0]), max(r[1], t - t0[0]), r[2] + t - s, r[3] + 1

    out = args.out_dir or tempfile.mkdtemp(prefix="timeline-")
    t = time.time()
    with Timeline():
        api.annotate(args.matrix, model=args.model, output_dir=out, run_id="timeline", quiet=True)
    print(f"annotate {time.time() - t:.1f} s (outputs in {out})")
    print(f"{'task':45s} {'first':>7s} {'last':>7s} {'busy':>7s} {'n':>5s}")
    for name, (a, b, busy, n) in sorted(rec.items(), key=lambda kv: kv[1][1]):
        print(f"{name:45s} {a:7.1f} {b:7.1f} {busy:7.1f} {n:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
