#!/usr/bin/env python
"""DE benchmark: ``dask-annot de`` alone on a simulated 1.2M-cell sample, and its share of annotate.

One command (from the repository root)::

    nice python benchmarks/bench_de.py [--cells 1200000]

* The sample is ``benchmarks/simulate.py``'s query of that size (seed 2), shared with
  ``bench_scale.py`` through ``benchmarks/results/work/`` (simulated here if missing).
* The input is the zarr store bench_scale's annotate run of that size converted, when it
  exists, so the DE stage is timed without a conversion; otherwise the matrix is converted
  first with ``dask-annot convert`` (timed separately, cached).
* Groups (``--groups``): ``annotate`` (default) = the ``coarse_cell_type`` bench_scale's
  annotate run wrote, i.e. exactly the groups annotate's own DE used; when that run is
  missing, the simulator's truth mapped to the reference's coarse types (``truth-coarse``),
  or the raw true labels (``truth``).
* Reports the DE stage time (dask-annot's own ``timings: de``), the process wall time, the
  peak memory of all its processes together (sampled as in bench_scale.py), and, from
  ``benchmarks/results/scale.json``, the ``de`` stage of annotate at that size as a share of
  annotate's wall time. Target: DE adds at most 25% to annotate's wall time at 1.2M cells.

Writes ``benchmarks/results/de.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scale import (  # noqa: E402  (this directory is not a package)
    DEFAULT_WORK,
    QUERY_SEED,
    check_ok,
    dask_annot_cmd,
    ensure_sim,
    git_state,
    run_measured,
)


def groups_table(work: Path, cells: int, how: str, sim: dict) -> tuple[pd.DataFrame, str]:
    """(barcode, group) for every cell, and a description of where the groups came from."""
    import simulate

    truth = pd.read_csv(simulate.labels_path(sim["path"]), dtype=str, keep_default_na=False)
    if how == "annotate":
        found = sorted((work / "runs" / f"q{cells}").glob(f"q{cells}/outs/segmented_outs/cell_types/*/cell_types.csv"))
        if found:
            ct = pd.read_csv(found[0], dtype=str, keep_default_na=False, usecols=["barcode", "coarse_cell_type"])
            return ct.rename(columns={"coarse_cell_type": "group"}), f"coarse_cell_type of {found[0]}"
        how = "truth-coarse"
        print(f"   no annotate run of {cells} cells in {work / 'runs'}; groups = truth mapped to coarse types", file=sys.stderr)
    if how == "truth-coarse":
        refs = sorted((work / "reference").glob("*/reference.json"))
        if refs:
            meta = json.loads(refs[0].read_text())
            coarse_of = {lv["fine"]: lv["coarse"] for lv in meta["levels"]}
            g = truth["label"].map(meta["input_labels"]).map(coarse_of)
            return pd.DataFrame({"barcode": truth["barcode"], "group": g}), f"true labels -> coarse types of {refs[0].parent}"
        print("   no reference in the work dir; groups = raw true labels", file=sys.stderr)
    return truth.rename(columns={"label": "group"}), "raw true labels"


def stage_seconds(log: Path) -> dict:
    """dask-annot de's own stage timings, from its last log line ('timings: de 12.3s')."""
    text = log.read_text()
    m = re.findall(r"timings: (.*)$", text, flags=re.M)
    if not m:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)s", m[-1])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=1_200_000, help="simulated cells (default 1200000)")
    p.add_argument("--groups", default="annotate", choices=["annotate", "truth-coarse", "truth"], help="where the DE groups come from (default annotate)")
    p.add_argument("--scheduler", default=None, help="passed to dask-annot de (default: its own, threads)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK))
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--report-only", action="store_true",
                   help="do not run DE again: re-read de.json's measurement and refresh DE's share of annotate from scale.json")
    a = p.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    work, out_dir = Path(a.work_dir).resolve(), Path(a.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        rec = json.loads((out_dir / "de.json").read_text())
        rec["reported"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return report(rec, out_dir, a.cells)
    d = work / "de"
    d.mkdir(parents=True, exist_ok=True)

    sim = ensure_sim(work, "query", a.cells, QUERY_SEED)
    store = work / "runs" / f"q{a.cells}" / f"q{a.cells}" / "work" / "matrix.zarr"
    convert = None
    if not store.exists():
        store = d / f"query_{a.cells}_s{QUERY_SEED}.zarr"
        measure = store.with_name(store.name + ".measure.json")
        if store.exists() and measure.exists():
            convert = {**json.loads(measure.read_text()), "cached": True}
        else:
            print(f"   converting {sim['path']} -> {store}", file=sys.stderr, flush=True)
            convert = run_measured(dask_annot_cmd() + ["convert", "--matrix", sim["path"], "--output", store], log=d / "convert.log")
            check_ok(convert, "dask-annot convert")
            measure.write_text(json.dumps(convert, indent=1) + "\n")
    groups, origin = groups_table(work, a.cells, a.groups, sim)
    gcsv = d / f"groups_{a.cells}.csv"
    groups.to_csv(gcsv, index=False)
    out_csv = d / f"de_{a.cells}.csv"
    cmd = dask_annot_cmd() + ["de", "--matrix", store, "--groups", gcsv, "--output", out_csv]
    if a.scheduler:
        cmd += ["--scheduler", a.scheduler]
    print(f"   dask-annot de on {a.cells:,} cells, {groups['group'].nunique()} groups ...", file=sys.stderr, flush=True)
    res = run_measured(cmd, log=d / f"de_{a.cells}.log")
    check_ok(res, "dask-annot de")
    stages = stage_seconds(Path(res["log"]))

    rec = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_de.py " + " ".join(argv),
        "git": git_state(),
        "cells": a.cells,
        "genes": sim["genes"],
        "input": str(store),
        "convert": convert,
        "groups": {"origin": origin, "sizes": groups["group"].value_counts().to_dict()},
        "de": {**res, "stages_s": stages},
    }
    return report(rec, out_dir, a.cells)


def report(rec: dict, out_dir: Path, cells: int) -> int:
    """de.{json,md} from a DE measurement and the annotate run of that size in scale.json."""
    res, stages, convert = rec["de"], rec["de"].get("stages_s", {}), rec.get("convert")
    n_groups, origin = len(rec["groups"]["sizes"]), rec["groups"]["origin"]
    scale = out_dir / "scale.json"
    ann = json.loads(scale.read_text()).get("annotate", {}).get(str(cells)) if scale.exists() else None
    if ann:
        de_in = ann["timings_s"].get("de")
        rec["annotate"] = {"wall_s": ann["wall_s"], "timings_s": ann["timings_s"], "peak_rss_gb": ann["peak_rss_gb"]}
        if de_in is not None:
            rec["annotate"]["de_share_of_wall"] = round(de_in / ann["wall_s"], 4)
            rec["annotate"]["de_adds_to_rest"] = round(de_in / (ann["wall_s"] - de_in), 4)
            rec["target_de_adds_at_most_25pct"] = rec["annotate"]["de_adds_to_rest"] <= 0.25
    (out_dir / "de.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")

    lines = [
        f"### dask-annot de alone, {cells:,} simulated cells x {rec['genes']} genes, {n_groups} groups ({origin})", "",
        "| DE stage s | process wall s | peak RSS GB (all processes) | convert s (separate) |", "|---|---|---|---|",
        f"| {stages.get('de', float('nan')):.1f} | {res['wall_s']:.1f} | {res['peak_rss_gb']:.2f} | "
        + (f"{convert['wall_s']:.1f}{' (cached)' if convert.get('cached') else ''}" if convert else "none: the annotate run's store") + " |", "",
    ]
    if ann:
        x = rec["annotate"]
        lines += [
            f"### DE inside annotate at {cells:,} cells (from scale.json)", "",
            "| annotate wall s | de stage s | DE share of annotate wall | DE adds to the rest | target (adds <= 25%) |", "|---|---|---|---|---|",
            f"| {x['wall_s']:.1f} | {x['timings_s'].get('de', float('nan')):.1f} | {x.get('de_share_of_wall', float('nan')):.0%} | "
            f"{x.get('de_adds_to_rest', float('nan')):.0%} | {'met' if rec.get('target_de_adds_at_most_25pct') else 'NOT met'} |", "",
        ]
    else:
        lines += [f"No annotate result at {cells:,} cells in {scale}: run `python benchmarks/bench_scale.py --sizes {cells}` for DE's share.", ""]
    text = "\n".join(lines)
    refreshed = f" Share of annotate refreshed {rec['reported']} from scale.json (`--report-only`)." if rec.get("reported") else ""
    (out_dir / "de.md").write_text(f"# DE benchmark\n\nGenerated {rec['generated']} by `{rec['command'].strip()}`.{refreshed}\n\n" + text)
    print(text)
    print(f"wrote {out_dir / 'de.json'} and {out_dir / 'de.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
