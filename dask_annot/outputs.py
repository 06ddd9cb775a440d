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
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from .errors import DaskAnnotError, OutputError

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


def atomic_write(path: Path, data: bytes | str | Iterable[bytes]) -> None:
    """Write to a temporary name beside ``path``, flush to disk, then rename into place.
    ``data``: the bytes (or text), or pieces of bytes written one by one as they come."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pieces = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    try:
        with open(tmp, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # nothing half-written, whatever stopped the pieces
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, DaskAnnotError):
            raise OutputError(f"{path}: cannot be written ({exc.strerror or exc}); free disk space or choose another --output-dir") from exc
        raise


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


EVIDENCE_BATCH_CELLS = 1024
"""Cells per evidence sub-batch: the kernel's working arrays hold ``batch x k`` neighbours, so
its memory is bounded by ``k``, whatever the number of labels, datasets or cells in the chunk."""


def evidence_memory_bytes(chunk_cells: int, *, k: int) -> int:
    """A generous bound on :func:`json_block`'s peak memory for one chunk.

    Per neighbour of one sub-batch: about eight int64 working arrays, their Python lists and
    the JSON text of its (label, dataset) entry (~512 bytes, Python objects included); plus
    the compressed output of the whole chunk (~32 bytes per neighbour at worst, when every
    neighbour is its own entry).
    """
    batch = min(chunk_cells, EVIDENCE_BATCH_CELLS)
    return int(batch * k * 512 + chunk_cells * k * 32)


def _evidence_entries(idx: np.ndarray, label_codes: np.ndarray, dataset_codes: np.ndarray, ds_rank: np.ndarray,
                      n_labels: int, n_ds: int) -> tuple[np.ndarray, ...]:
    """The distinct (cell, label, dataset) neighbour counts of a block, in output order.

    Returns ``cell, label, dataset, count, label_total`` per entry, sorted by cell, then
    label total descending, label code, dataset count descending, dataset name. Sizes
    grow with the neighbours present, never with ``cells x labels x datasets``.
    """
    valid = idx >= 0
    rows = np.broadcast_to(np.arange(idx.shape[0], dtype=np.int64)[:, None], idx.shape)[valid]
    ref = idx[valid]
    key = (rows * n_labels + label_codes[ref].astype(np.int64)) * n_ds + dataset_codes[ref].astype(np.int64)
    uniq, cnt = np.unique(key, return_counts=True)
    ds = uniq % n_ds
    cl = uniq // n_ds  # cell * n_labels + label, sorted
    starts = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1]])
    tot = np.add.reduceat(cnt, starts) if len(cnt) else cnt
    tot_e = np.repeat(tot, np.diff(np.r_[starts, len(cl)]))
    cell, lab = cl // n_labels, cl % n_labels
    order = _entry_order(cell, tot_e, lab, cnt, ds_rank[ds], n_cells=idx.shape[0], n_labels=n_labels, n_ds=n_ds)
    return cell[order], lab[order], ds[order], cnt[order], tot_e[order]


def _entry_order(cell, tot, lab, cnt, ds_rank, *, n_cells: int, n_labels: int, n_ds: int, max_key: float = 2.0 ** 62) -> np.ndarray:
    """The order of entries by cell, label total descending, label, count descending, dataset
    name: one argsort of a combined int64 key (a single sort instead of lexsort's five) when
    the key fits, else lexsort (the same order: the entries' (cell, label, dataset) are distinct)."""
    k = int(max(tot.max(), cnt.max())) + 1 if len(tot) else 1
    sizes = [n_cells, k, max(n_labels, 1), k, max(n_ds, 1)]
    if float(np.prod(np.array(sizes, dtype=np.float64))) >= max_key:
        return np.lexsort((ds_rank, -cnt, lab, -tot, cell))
    key = cell.astype(np.int64)
    for size, part in zip(sizes[1:], (k - 1 - tot, lab, k - 1 - cnt, ds_rank)):
        key = key * size + part
    return np.argsort(key, kind="stable")


def json_block(nbrs: np.ndarray, model, barcodes: np.ndarray, *, batch_cells: int = EVIDENCE_BATCH_CELLS) -> bytes:
    """One chunk's cells as gzip-compressed JSON objects joined by commas (a gzip member).

    Pure: the driver concatenates the members between ``[`` and ``]``; concatenated
    gzip members are one valid gzip stream. The text is assembled from pre-escaped
    names (it is the same as ``json.dumps`` with compact separators). Cells are taken
    ``batch_cells`` at a time and only the (label, dataset) pairs present among the
    neighbours are counted, so memory is bounded by ``batch_cells x k``; the bytes do not
    depend on ``batch_cells``.
    """
    n_labels, n_ds = len(model.labels), len(model.datasets)
    idx = np.asarray(nbrs["idx"])
    label_codes = np.asarray(model.label_codes)
    dataset_codes = np.asarray(model.dataset_codes)
    # text pieces, looked up per entry by numpy indexing (no Python loop over entries)
    label_mid = np.array([f',"cell_type":{json.dumps(x)},"dataset_ids_with_counts":[' for x in model.labels] + [""], dtype=object)
    ds_tail = np.array([json.dumps(x) + "}" for x in model.datasets], dtype=object)
    numbers = np.array([str(i) for i in range(idx.shape[1] + 1)] + [""], dtype=object)  # counts are at most k
    count_head = np.array([f'{{"count_per_dataset":{i},"dataset_id":' for i in range(idx.shape[1] + 1)], dtype=object)
    ds_rank = np.argsort(np.argsort(np.array(model.datasets, dtype=object))) if n_ds else np.zeros(0, dtype=np.int64)
    bcs = barcodes.tolist() if isinstance(barcodes, np.ndarray) else list(barcodes)
    comp = zlib.compressobj(4, zlib.DEFLATED, 31)
    out = []
    for b0 in range(0, idx.shape[0], max(1, batch_cells)):
        block = idx[b0:b0 + batch_cells]
        entries = _evidence_entries(block, label_codes, dataset_codes, ds_rank, n_labels, n_ds)
        heads = [f'{"," if b0 + i else ""}{{"barcode":{json.dumps(str(bcs[b0 + i]))},"matches":[' for i in range(block.shape[0])]
        text = "".join(_evidence_tokens(*entries, heads, label_mid=label_mid, ds_tail=ds_tail, numbers=numbers,
                                        count_head=count_head).tolist())
        out.append(comp.compress(text.encode()))
    out.append(comp.flush())
    return b"".join(out)


_SEPARATORS = np.array(["", ",", "]},"], dtype=object)  # first entry of a cell / same label / next label
_LABEL_HEAD = np.array(["", '{"cell_count_in_model":'], dtype=object)


def _evidence_tokens(cell, lab, ds, cnt, tot, heads: list[str], *, label_mid, ds_tail, numbers, count_head) -> np.ndarray:
    """The JSON text of a sub-batch as pieces in order (their concatenation is the text):
    per cell its head, six pieces per (label, dataset) entry, and its closing brackets."""
    n_cells, n_e = len(heads), cell.size
    new_cell = np.ones(n_e, dtype=bool)
    new_cell[1:] = cell[1:] != cell[:-1]
    new_label = new_cell.copy()
    new_label[1:] |= lab[1:] != lab[:-1]
    per_entry = np.empty((n_e, 6), dtype=object)
    per_entry[:, 0] = _SEPARATORS[np.where(new_cell, 0, np.where(new_label, 2, 1))]
    per_entry[:, 1] = _LABEL_HEAD[new_label.astype(np.int64)]
    per_entry[:, 2] = numbers[np.where(new_label, tot, numbers.size - 1)]
    per_entry[:, 3] = label_mid[np.where(new_label, lab, label_mid.size - 1)]
    per_entry[:, 4] = count_head[cnt]
    per_entry[:, 5] = ds_tail[ds]
    n_per_cell = np.bincount(cell, minlength=n_cells) if n_e else np.zeros(n_cells, dtype=np.int64)
    head_at = 2 * np.arange(n_cells) + 6 * (np.cumsum(n_per_cell) - n_per_cell)
    frame_at = np.stack([head_at, head_at + 1 + 6 * n_per_cell], axis=1).ravel()
    tokens = np.empty(2 * n_cells + 6 * n_e, dtype=object)
    is_frame = np.zeros(tokens.size, dtype=bool)
    is_frame[frame_at] = True
    tokens[frame_at] = np.stack([np.array(heads, dtype=object), np.where(n_per_cell > 0, "]}]}", "]}").astype(object)], axis=1).ravel()
    tokens[~is_frame] = per_entry.ravel()
    return tokens


def json_results(members: list[bytes]) -> bytes:
    """Join per-chunk gzip members into one gzipped JSON array."""
    return b"".join(json_results_parts(members))


def json_results_parts(members: Iterable[bytes]) -> Iterator[bytes]:
    """The bytes of :func:`json_results` piece by piece, taking one member at a time (so a
    writer holds one chunk's evidence, not the whole file's)."""
    yield gzip.compress(b"[", mtime=0)
    for i, m in enumerate(members):
        if i:
            yield gzip.compress(b",", mtime=0)
        yield m
    yield gzip.compress(b"]", mtime=0)


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
