"""The JSON evidence kernel: same text as the dense (cells x labels x datasets) definition,
memory proportional to the neighbours."""
from __future__ import annotations

import gzip
import json
import tracemalloc

import numpy as np
import pytest

from dask_annot import outputs
from tests.test_kernels import TinyModel


def _dense_evidence(idx: np.ndarray, m: TinyModel, barcodes) -> list:
    """The definition: count every (label, dataset) pair per cell densely, then sort labels by
    count desc then label order, datasets by count desc then name."""
    n_l, n_d = len(m.labels), len(m.datasets)
    out = []
    for i, row in enumerate(idx):
        c = np.zeros((n_l, n_d), dtype=np.int64)
        for r in row[row >= 0]:
            c[m.label_codes[r], m.dataset_codes[r]] += 1
        tot = c.sum(axis=1)
        matches = []
        for lab in sorted(range(n_l), key=lambda j: (-tot[j], j)):
            if tot[lab] == 0:
                break
            ds = sorted((d for d in range(n_d) if c[lab, d]), key=lambda d: (-c[lab, d], m.datasets[d]))
            matches.append({"cell_count_in_model": int(tot[lab]), "cell_type": m.labels[lab],
                            "dataset_ids_with_counts": [{"count_per_dataset": int(c[lab, d]), "dataset_id": m.datasets[d]} for d in ds]})
        out.append({"barcode": barcodes[i], "matches": matches})
    return out


def _model(rng, n_ref=400, n_labels=7, datasets=("zeta", "alpha", "mid \"quoted\"", "b,comma")):
    codes = rng.integers(0, n_labels, n_ref)
    return TinyModel(np.eye(3), codes, [f"type {j}" for j in range(n_labels)], datasets=datasets,
                     dataset_codes=rng.integers(0, len(datasets), n_ref))


@pytest.mark.parametrize("batch", [1, 3, 1024])
def test_evidence_matches_the_dense_definition(rng, batch):
    m = _model(rng)
    idx = rng.integers(0, 400, size=(37, 25))
    idx[5, :] = -1          # a cell without neighbours
    idx[6, 10:] = -1        # fewer than k found
    nbrs = np.zeros(idx.shape, dtype=[("idx", np.int64), ("dist", np.float32)])
    nbrs["idx"] = idx
    bcs = np.array([f"AC{i}-1" for i in range(len(idx))], dtype=object)
    member = outputs.json_block(nbrs, m, bcs, batch_cells=batch)
    got = json.loads(gzip.decompress(outputs.json_results([member])))
    assert got == _dense_evidence(idx, m, list(bcs))
    # the bytes do not depend on the sub-batch size
    assert gzip.decompress(member) == gzip.decompress(outputs.json_block(nbrs, m, bcs, batch_cells=5))


def test_evidence_text_is_compact_json(rng):
    m = _model(rng, datasets=("d0",))
    idx = rng.integers(0, 400, size=(4, 9))
    nbrs = np.zeros(idx.shape, dtype=[("idx", np.int64)])
    nbrs["idx"] = idx
    bcs = np.array(["a", "b", "c", "d"], dtype=object)
    text = gzip.decompress(outputs.json_block(nbrs, m, bcs)).decode()
    assert text == ",".join(json.dumps(o, separators=(",", ":")) for o in _dense_evidence(idx, m, list(bcs)))


def test_empty_chunk_gives_an_empty_member(rng):
    m = _model(rng)
    nbrs = np.zeros((0, 5), dtype=[("idx", np.int64)])
    assert gzip.decompress(outputs.json_block(nbrs, m, np.array([], dtype=object))) == b""


def test_evidence_memory_follows_neighbours_not_labels_times_datasets(rng):
    """300 labels x 100 datasets, 10,000 cells x k=50: the dense kernel needed
    10,000 x 300 x 100 x 8 B = 2.4 GB; this one stays within its pre-flight estimate."""
    n_ref, n_l, n_d, k, cells = 30_000, 300, 100, 50, 10_000
    m = TinyModel(np.eye(3), rng.integers(0, n_l, n_ref), [f"CL:{j:07d}" for j in range(n_l)],
                  datasets=[f"{j:08x}-dataset" for j in range(n_d)], dataset_codes=rng.integers(0, n_d, n_ref))
    nbrs = np.zeros((cells, k), dtype=[("idx", np.int64)])
    nbrs["idx"] = rng.integers(0, n_ref, (cells, k))
    bcs = np.array([f"c{i}" for i in range(cells)], dtype=object)
    tracemalloc.start()
    outputs.json_block(nbrs, m, bcs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < outputs.evidence_memory_bytes(cells, k=k) < 2.4e9 / 10


def test_memory_preflight_counts_the_evidence_kernel():
    from dask_annot.pipeline import chunk_memory_bytes

    base = chunk_memory_bytes(10_000, n_genes=2000, k=500, n_ref=0, method="ann")
    assert base >= 10_000 * (2000 * 20 + 500 * 32) + outputs.evidence_memory_bytes(10_000, k=500)


def test_entry_order_one_key_equals_lexsort(rng):
    """The combined-key sort gives lexsort's order (the fallback for keys beyond int64)."""
    idx = rng.integers(-1, 400, (60, 40))
    codes_l, codes_d = rng.integers(0, 9, 400), rng.integers(0, 5, 400)
    ds_rank = rng.permutation(5)
    cell, lab, ds, cnt, tot = outputs._evidence_entries(idx, codes_l, codes_d, ds_rank, 9, 5)
    kw = dict(n_cells=60, n_labels=9, n_ds=5)
    one = outputs._entry_order(cell, tot, lab, cnt, ds_rank[ds], **kw)
    lex = outputs._entry_order(cell, tot, lab, cnt, ds_rank[ds], **kw, max_key=1.0)
    assert np.array_equal(one, lex) and np.array_equal(one, np.arange(cell.size))  # entries come out already in order


def test_evidence_file_is_written_member_by_member_and_never_half(tmp_path):
    members = [gzip.compress(b'{"barcode":"a","matches":[]}'), gzip.compress(b'{"barcode":"b","matches":[]}')]
    out = tmp_path / "cell_annotation_results.json.gz"
    outputs.atomic_write(out, outputs.json_results_parts(iter(members)))
    assert out.read_bytes() == outputs.json_results(members)
    assert json.loads(gzip.decompress(out.read_bytes())) == [{"barcode": "a", "matches": []}, {"barcode": "b", "matches": []}]

    def broken():
        yield members[0]
        raise RuntimeError("a chunk could not be read")

    out2 = tmp_path / "other.json.gz"
    with pytest.raises(RuntimeError, match="could not be read"):
        outputs.atomic_write(out2, outputs.json_results_parts(broken()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
