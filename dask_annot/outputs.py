"""Outputs in Space Ranger's layout, each written whole or not at all.

``<output>/<id>/outs/segmented_outs/cell_types/<model>/`` holds ``cell_types.csv``,
``cell_annotation_results.json.gz`` (kNN models), ``cell_annotation_differential_expression.csv``
(two or more coarse types) and ``run.json``, the run record, written last: a
directory without a complete ``run.json`` is not a finished run.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import OutputError

Layout = Literal["cloud", "hierarchical"]
LOW_UMI = "Low UMI Barcode"
LOW_UMI_THRESHOLD = 100
CLOUD_COLUMNS = ["barcode", "coarse_cell_type", "fine_cell_type", "cell_count_in_model", "coarse_cell_type_unfiltered", "umi_count"]
HIERARCHICAL_COLUMNS = [
    "barcode", "broad_cell_type", "coarse_cell_type", "fine_cell_type", "full_hierarchical_labels",
    "final_level_softmax_prob", "coarse_cell_type_unfiltered", "umi_count",
]


def model_dir(output_dir: str | os.PathLike, run_id: str, model_name: str) -> Path:
    return Path(output_dir) / run_id / "outs" / "segmented_outs" / "cell_types" / model_name


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary name beside ``path``, flush to disk, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc}); free disk space or choose another --output-dir") from exc


def fmt_prob(p: float) -> str:
    """float32 shortest round-trip text, as 10x writes probabilities."""
    return np.format_float_positional(np.float32(p), unique=True, trim="-")


# ----------------------------------------------------------------------------- per-cell calls

CALL_DTYPE = np.dtype([("code", np.int32), ("depth", np.int8), ("prob", np.float32), ("count", np.int32)])
"""A model's call for one cell: ``code`` indexes ``model.labels`` / ``model.levels`` (the deepest
term decided); ``depth`` how far down the hierarchy the call is confident; ``prob`` the
probability that the reported final level is right; ``count`` the reference neighbours
carrying the fine label (``cell_count_in_model``; 0 for marker models)."""
DEPTH_NONE, DEPTH_BROAD, DEPTH_COARSE, DEPTH_FINE = 0, 1, 2, 3
UNASSIGNED = "Unassigned"
COARSE_NCA = "Coarse Not Confidently Annotated"
FINE_NCA = "Fine Not Confidently Annotated"


def calls_from(code: np.ndarray, *, prob: np.ndarray, count: np.ndarray | None = None, depth: np.ndarray | None = None) -> np.ndarray:
    """A ``CALL_DTYPE`` array (``depth`` defaults to confident to the fine level)."""
    out = np.empty(len(code), dtype=CALL_DTYPE)
    out["code"] = code
    out["prob"] = prob
    out["count"] = 0 if count is None else count
    out["depth"] = DEPTH_FINE if depth is None else depth
    return out


def _path(*parts: str) -> str:
    out: list[str] = []
    for p in parts:
        if not out or out[-1] != p:
            out.append(p)
    return "|".join(out)


def _text_table(model) -> dict[str, np.ndarray]:
    """Per (label code, depth): the text of each column, as object arrays of shape (labels, 4)."""
    n = len(model.levels)
    cols = {c: np.empty((n, 4), dtype=object) for c in ("broad", "coarse", "fine", "path", "cloud_coarse", "cloud_fine")}
    for i, lv in enumerate(model.levels):
        rows = {
            DEPTH_NONE: (UNASSIGNED, UNASSIGNED, UNASSIGNED, UNASSIGNED),
            DEPTH_BROAD: (lv.broad, COARSE_NCA, FINE_NCA, _path(lv.broad)),
            DEPTH_COARSE: (lv.broad, lv.coarse, FINE_NCA, _path(lv.broad, lv.coarse)),
            DEPTH_FINE: (lv.broad, lv.coarse, lv.fine, lv.path),
        }
        for d, (b, c, f, pth) in rows.items():
            cols["broad"][i, d], cols["coarse"][i, d], cols["fine"][i, d], cols["path"][i, d] = b, c, f, pth
            cols["cloud_coarse"][i, d] = UNASSIGNED if d == DEPTH_NONE else lv.coarse
            cols["cloud_fine"][i, d] = UNASSIGNED if d == DEPTH_NONE else lv.fine
    return cols


def cell_labels(calls: np.ndarray, umi: np.ndarray, model, *, layout: Layout) -> dict[str, np.ndarray]:
    """The label columns of ``cell_types.csv`` for one layout, as object arrays in matrix order.

    Hierarchical (Azimuth's vocabulary): a level the call is not confident at reads
    ``Coarse/Fine Not Confidently Annotated``; a cell unlike the reference is ``Unassigned``
    at every level. Cloud (10x's): ``Unassigned`` or the fine label and its coarse type.
    ``Low UMI Barcode`` replaces ``coarse_cell_type`` (and ``broad_cell_type``) below
    :data:`LOW_UMI_THRESHOLD` UMIs; ``coarse_cell_type_unfiltered`` keeps the call.
    """
    table = _text_table(model)
    code = calls["code"].astype(np.int64)
    depth = calls["depth"].astype(np.int64)
    low = np.asarray(umi) < LOW_UMI_THRESHOLD
    if layout == "cloud":
        coarse_unf = table["cloud_coarse"][code, depth]
        return {"coarse_cell_type": np.where(low, LOW_UMI, coarse_unf), "fine_cell_type": table["cloud_fine"][code, depth],
                "coarse_cell_type_unfiltered": coarse_unf}
    coarse_unf = table["coarse"][code, depth]
    return {"broad_cell_type": np.where(low, LOW_UMI, table["broad"][code, depth]), "coarse_cell_type": np.where(low, LOW_UMI, coarse_unf),
            "fine_cell_type": table["fine"][code, depth], "full_hierarchical_labels": table["path"][code, depth],
            "coarse_cell_type_unfiltered": coarse_unf}


def cell_types_csv(barcodes: np.ndarray, calls: np.ndarray, umi: np.ndarray, model, *, layout: Layout) -> str:
    """The ``cell_types.csv`` text, one row per barcode in matrix order."""
    lab = cell_labels(calls, umi, model, layout=layout)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    umi_l = np.asarray(umi).tolist()
    if layout == "cloud":
        w.writerow(CLOUD_COLUMNS)
        w.writerows(zip(barcodes, lab["coarse_cell_type"], lab["fine_cell_type"], calls["count"].tolist(),
                        lab["coarse_cell_type_unfiltered"], umi_l))
    else:
        w.writerow(HIERARCHICAL_COLUMNS)
        probs = [fmt_prob(p) for p in calls["prob"].tolist()]
        w.writerows(zip(barcodes, lab["broad_cell_type"], lab["coarse_cell_type"], lab["fine_cell_type"],
                        lab["full_hierarchical_labels"], probs, lab["coarse_cell_type_unfiltered"], umi_l))
    return buf.getvalue()


def json_block(nbrs: np.ndarray, model, barcodes: np.ndarray) -> bytes:
    """One chunk's cells as gzip-compressed JSON objects joined by commas (a gzip member).

    Pure: the driver concatenates the members between ``[`` and ``]``; concatenated
    gzip members are one valid gzip stream. The text is assembled from pre-escaped
    names (it is the same as ``json.dumps`` with compact separators).
    """
    n_labels, n_ds = len(model.labels), len(model.datasets)
    idx = nbrs["idx"]
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    code = model.label_codes[safe].astype(np.int64) * n_ds + model.dataset_codes[safe]
    flat = (np.arange(idx.shape[0])[:, None] * (n_labels * n_ds) + code)[valid]
    counts = np.bincount(flat, minlength=idx.shape[0] * n_labels * n_ds).reshape(idx.shape[0], n_labels, n_ds)
    totals = counts.sum(axis=2)
    label_txt = [json.dumps(x) for x in model.labels]
    ds_txt = [json.dumps(x) for x in model.datasets]
    # per cell: labels by count desc then label order; datasets by count desc then name
    order_l = np.lexsort((np.broadcast_to(np.arange(n_labels), totals.shape), -totals), axis=1).tolist()
    totals_l = totals.tolist()
    ds_rank = np.argsort(np.argsort(np.array(model.datasets, dtype=object)))
    single = n_ds == 1
    parts = []
    for i, bc in enumerate(barcodes.tolist() if isinstance(barcodes, np.ndarray) else list(barcodes)):
        row_t = totals_l[i]
        matches = []
        for lab in order_l[i]:
            t = row_t[lab]
            if t == 0:
                break
            if single:
                dsj = f'{{"count_per_dataset":{t},"dataset_id":{ds_txt[0]}}}'
            else:
                per_ds = counts[i, lab]
                nz = np.flatnonzero(per_ds)
                nz = nz[np.lexsort((ds_rank[nz], -per_ds[nz]))]
                dsj = ",".join(f'{{"count_per_dataset":{int(per_ds[d])},"dataset_id":{ds_txt[d]}}}' for d in nz)
            matches.append(f'{{"cell_count_in_model":{t},"cell_type":{label_txt[lab]},"dataset_ids_with_counts":[{dsj}]}}')
        parts.append(f'{{"barcode":{json.dumps(str(bc))},"matches":[{",".join(matches)}]}}')
    return gzip.compress(",".join(parts).encode(), compresslevel=4, mtime=0)


def json_results(members: list[bytes]) -> bytes:
    """Join per-chunk gzip members into one gzipped JSON array."""
    out = [gzip.compress(b"[", mtime=0)]
    for i, m in enumerate(members):
        if i:
            out.append(gzip.compress(b",", mtime=0))
        out.append(m)
    out.append(gzip.compress(b"]", mtime=0))
    return b"".join(out)


def check_output_dir(root: Path, *, input_sha256: str) -> None:
    """Refuse an output directory that holds another input's run."""
    for record in root.glob("outs/segmented_outs/cell_types/*/run.json"):
        try:
            prev = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        prev_sha = prev.get("input", {}).get("sha256")
        if prev_sha and prev_sha != input_sha256:
            raise OutputError(
                f"{root}: holds a run of another input ({prev.get('input', {}).get('path')}); "
                "choose another --id or --output-dir, or remove that directory"
            )


def write_run_record(path: Path, record: dict) -> None:
    atomic_write(path, json.dumps(record, indent=1, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
