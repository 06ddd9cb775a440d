"""Label spreading over the query's own neighbour graph (the small-reference consensus)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import dask

from dask_annot import consensus, store
from dask_annot.cli import example_path

from .conftest import shared_path
from .test_pipeline import annotate_dir, read_rows


def _brute_graph(y: np.ndarray, k: int) -> np.ndarray:
    d2 = ((y[:, None, :] - y[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(d2, np.inf)
    cols = np.arange(y.shape[0])
    # nearest first, ties to the lower index
    return np.array([np.lexsort((cols, row))[:k] for row in d2])


def _graph(y: np.ndarray, k: int = consensus.GRAPH_K) -> tuple[np.ndarray, str]:
    (g,) = dask.compute(consensus.graph_of(y, y.shape[0], k), scheduler="threads")
    return g["nbr"], g["how"]


def test_exact_query_graph_is_the_brute_force_top_k_with_ties_to_the_lower_index(rng):
    # small integer coordinates: every distance is exact and there are ties and duplicate cells
    y = rng.integers(-2, 3, size=(700, 3)).astype(np.float64)
    y[100] = y[5]
    y[650] = y[5]
    nbr, how = _graph(y, k=15)
    assert how == "exact"
    np.testing.assert_array_equal(nbr, _brute_graph(y, 15))
    assert not (nbr == np.arange(len(y))[:, None]).any()


def test_query_graph_of_tiny_queries():
    nbr, _ = _graph(np.zeros((1, 4)))
    assert (nbr == -1).all()
    nbr, _ = _graph(np.arange(8, dtype=np.float64).reshape(4, 2), k=15)
    assert nbr.shape == (4, 3) and sorted(nbr[0].tolist()) == [1, 2, 3]


def test_large_queries_search_inverted_lists_close_to_the_exact_graph_whatever_the_tiling(tmp_path, monkeypatch):
    # real cells (FACS-sorted PBMC), the lists scaled down with the data: 3,500 cells in lists
    # of ~20, 8 coarse clusters, each list's cells compared with those of its 16 nearest lists
    st = store.convert(shared_path("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"), tmp_path / "m.zarr")
    (y,) = dask.compute(consensus.query_embedding(st), scheduler="sync")
    exact, how = _graph(y)
    assert how == "exact"
    for name, value in (("EXACT_MAX_CELLS", 1000), ("LIST_CELLS", 20), ("COARSE_LISTS", 8), ("NEAR_LISTS", 16)):
        monkeypatch.setattr(consensus, name, value)
    lists, how = _graph(y)
    assert how.startswith("inverted lists")
    assert not (lists == np.arange(len(y))[:, None]).any() and (lists >= 0).all()
    assert all(len(set(row)) == consensus.GRAPH_K for row in lists.tolist())
    recall = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(lists.tolist(), exact.tolist())])
    assert recall > 0.85  # measured 0.93 (pynndescent: 0.98)
    monkeypatch.setattr(consensus, "_GRAPH_TILE_CELLS", 333)  # 10 tiles instead of 3: each list is searched alone
    again, _ = _graph(y)
    np.testing.assert_array_equal(lists, again)
    # each cell's neighbours are the nearest among its candidates (float64 distances)
    order, offsets, adj = consensus._partition(y)
    home = np.empty(len(y), np.int64)
    home[order] = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    for i in range(0, len(y), 97):
        cand = np.sort(np.concatenate([order[offsets[m]: offsets[m + 1]] for m in adj[home[i]]]))
        cand = cand[cand != i]
        d2 = ((y[cand] - y[i]) ** 2).sum(axis=1)
        got = ((y[lists[i]] - y[i]) ** 2).sum(axis=1)
        np.testing.assert_allclose(np.sort(got), np.sort(d2)[: consensus.GRAPH_K], rtol=1e-9)


def test_spreading_follows_the_graph_and_keeps_each_cell_a_distribution(rng):
    # two groups of 50 cells, each a 10-NN clique of its own; the votes are noisy:
    # 35 cells of group A lean A, 15 lean B (and the reverse for group B)
    n, k = 100, 10
    group = np.repeat([0, 1], 50)
    nbr = np.array([rng.choice(np.flatnonzero((group == group[i]) & (np.arange(n) != i)), k, replace=False) for i in range(n)])
    lean = group.copy()
    flip = np.concatenate([rng.choice(50, 15, replace=False), 50 + rng.choice(50, 15, replace=False)])
    lean[flip] = 1 - lean[flip]
    p0 = np.where(lean[:, None] == np.arange(2), 0.6, 0.4)
    p = consensus.spread(p0, nbr)
    assert (p.argmax(axis=1) == group).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(consensus.spread(p0, nbr, alpha=0.0), p0)
    # a cell without neighbours keeps its own vote
    lonely = nbr.copy()
    lonely[3] = -1
    assert consensus.spread(p0, lonely)[3].tolist() == p0[3].tolist()


def test_query_embedding_does_not_depend_on_how_the_blocks_are_cut(tmp_path, monkeypatch):
    st = store.convert(example_path(), tmp_path / "m.zarr")
    (whole,) = dask.compute(consensus.query_embedding(st), scheduler="threads")
    assert whole.shape == (800, consensus.N_PCS) and np.isfinite(whole).all()
    monkeypatch.setattr(consensus, "BLOCK_CELLS", 97)
    (cut,) = dask.compute(consensus.query_embedding(st), scheduler="threads")
    # the sums run in another order, so not bit for bit, but the same embedding
    np.testing.assert_allclose(cut, whole, atol=1e-8)


def test_large_queries_take_genes_and_components_from_an_evenly_spaced_sample(tmp_path, monkeypatch):
    st = store.convert(example_path(), tmp_path / "m.zarr")
    (whole,) = dask.compute(consensus.query_embedding(st), scheduler="threads")
    monkeypatch.setattr(consensus, "BASIS_CELLS", 400)  # every 2nd cell of 800
    assert consensus.basis_step(800) == 2 and consensus._sample_rows(97, 194, 2).tolist() == list(range(1, 97, 2))
    (sampled,) = dask.compute(consensus.query_embedding(st), scheduler="threads")
    monkeypatch.setattr(consensus, "BLOCK_CELLS", 97)  # blocks starting at odd cells: the same sample
    (cut,) = dask.compute(consensus.query_embedding(st), scheduler="threads")
    np.testing.assert_allclose(cut, sampled, atol=1e-8)
    assert sampled.shape == whole.shape and not np.allclose(sampled, whole)
    # the leading components span the same space: each of the first 3 sampled ones is almost
    # entirely explained by the first 10 of the full basis (least squares R^2; measured 0.99,
    # 0.99, 0.97; the 4th and 5th of 400 cells of this 800-cell sample are not stable: 0.46, 0.29)
    coef, *_ = np.linalg.lstsq(whole[:, :10], sampled[:, :3], rcond=None)
    r2 = 1 - ((sampled[:, :3] - whole[:, :10] @ coef) ** 2).sum(axis=0) / (sampled[:, :3] ** 2).sum(axis=0)
    assert (r2 > 0.95).all(), r2


def _coarse_accuracy(mdir) -> float:
    """Fine labels of pbmc4k cells against SoupX's labels at the shared level (B, CD4 T, CD8 T, NK, monocyte)."""
    import anndata

    truth = anndata.read_h5ad(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")).obs["Annotation"]
    truth = {**truth.to_dict(), **{f"{b}-1": v for b, v in truth.items()}}  # the example's barcodes end in -1
    level = {"B": "B", "MNP": "MNP", "NK": "NK", "T_CD4": "CD4", "T_CD8": "CD8"}

    def of(fine: str) -> str:
        f = fine.lower()
        for key, name in (("cd8", "CD8"), ("cd4", "CD4"), ("b cell", "B"), ("natural killer", "NK"), ("monocyte", "MNP")):
            if key in f:
                return name
        return "other"

    rows = [r for r in read_rows(mdir / "cell_types.csv") if truth[r["barcode"]] in level]
    assert len(rows) > 700
    return float(np.mean([of(r["fine_cell_type"]) == level[truth[r["barcode"]]] for r in rows]))


def test_consensus_is_recorded_and_makes_small_reference_labels_more_accurate(tmp_path):
    """All 2,170 SoupX-labelled pbmc4k cells against the built-in (FACS-sorted PBMC) model: the
    benchmark's sorted -> pbmc4k direction, where the per-cell vote is weakest (0.854 -> 0.889 there)."""
    matrix = shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")
    plain = annotate_dir(tmp_path / "none", matrix=matrix, consensus="none")
    spread = annotate_dir(tmp_path / "auto", matrix=matrix)
    rec_plain = json.loads((plain / "run.json").read_text())["parameters"]["consensus"]
    rec = json.loads((spread / "run.json").read_text())["parameters"]["consensus"]
    assert rec_plain["applied"] is False
    assert rec["applied"] is True and rec["graph_search"] == "exact" and rec["cells_relabelled"] > 0
    acc_plain, acc_spread = _coarse_accuracy(plain), _coarse_accuracy(spread)
    assert acc_spread > acc_plain + 0.02, (acc_plain, acc_spread)
    # cell_count_in_model stays the raw number of reference neighbours carrying the final label
    matches = {m["barcode"]: {x["cell_type"]: x["cell_count_in_model"] for x in m["matches"]}
               for m in json.loads(__import__("gzip").decompress((spread / "cell_annotation_results.json.gz").read_bytes()))}
    for r in read_rows(spread / "cell_types.csv"):
        if r["fine_cell_type"] == "Unassigned":  # unlike the reference (issue 11): its nearest label's count
            assert int(r["cell_count_in_model"]) in matches[r["barcode"]].values()
            continue
        assert int(r["cell_count_in_model"]) == matches[r["barcode"]].get(r["fine_cell_type"], 0)


def test_consensus_spread_with_a_large_reference_rule_and_bad_values(tmp_path):
    from dask_annot import config
    from dask_annot.errors import ConfigError

    with pytest.raises(ConfigError, match="--consensus must be auto, spread or none"):
        config.resolve(consensus="vote")
    # the small-reference rule is keyed on the reference's size, not on --k (issue 13.3): --k 15 on the
    # 3,500-cell built-in model keeps the class-balanced vote and the consensus; none turns it off
    auto = json.loads((annotate_dir(tmp_path / "a", k=15) / "run.json").read_text())["parameters"]
    off = json.loads((annotate_dir(tmp_path / "s", k=15, consensus="none") / "run.json").read_text())["parameters"]
    assert auto["vote"].startswith("class-balanced") and auto["consensus"]["applied"] is True
    assert off["consensus"]["applied"] is False
