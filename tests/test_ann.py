"""ANN recall against exact search on a real reference (layer 4)."""
from __future__ import annotations

import numpy as np
import pytest

from dask_annot import align, h5, knn, models, normalize, project, reference, vote

from .conftest import shared_path


@pytest.mark.slow
def test_pynndescent_recall_at_k500_on_real_pbmc():
    """pbmc4k cells against the built-in 3,500-cell PBMC reference, k=500: recall >= 0.95, top label >= 0.995."""
    m = models.resolve_model("human_pbmc_v1")
    info = h5.open_matrix(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad"))
    X = h5.read_cells(info, 0, info.n_cells)
    al = align.align_genes(query_ids=info.feature_ids, query_names=info.feature_names, ref_ids=m.gene_ids, ref_names=m.gene_names)
    z = normalize._zscore_block(align._align_block(X, al.selection()), np.asarray(X.sum(axis=1)).ravel(), m)
    emb = project._project_block(z, project.projection_matrix(m.loadings, al.query_index >= 0))
    exact = knn._exact_block(emb, m, 500)
    ann = knn._ann_block(emb, m, 500, 0.2)
    recall = np.mean([np.intersect1d(a[a >= 0], b).size / 500 for a, b in zip(ann["idx"], exact["idx"])])
    agree = np.mean(vote._vote_block(ann, m, False)["fine"] == vote._vote_block(exact, m, False)["fine"])
    print(f"recall@500={recall:.4f} top-label agreement={agree:.4f}")
    assert recall >= 0.95
    assert agree >= 0.995
    assert (ann["idx"] >= 0).all()  # no inf padding at epsilon=0.2


@pytest.mark.slow
def test_ann_neighbours_do_not_depend_on_chunking_or_threads():
    """pynndescent's serial search is position-dependent within a batch; the stage fixes the batches."""
    import dask
    import dask.array as da

    m = models.resolve_model("human_pbmc_v1")
    rng = np.random.default_rng(1)
    q = m.embedding[rng.integers(0, m.n_cells, 5000)] + rng.normal(size=(5000, m.n_pcs)).astype(np.float32) * 0.5
    runs = []
    for chunk, scheduler in [(5000, "sync"), (777, "threads"), (4096, "threads")]:
        with dask.config.set(scheduler=scheduler, num_workers=2):
            runs.append(knn.neighbors(da.from_array(q, chunks=(chunk, -1)), m, k=500, method="ann").compute())
    for r in runs[1:]:
        np.testing.assert_array_equal(r["idx"], runs[0]["idx"])


def _brute_force(q, ref_unit, k):
    """Every reference cell scored (the same fixed-order float64 dot), ordered by (distance, index)."""
    dots = knn._full_dots(np.ascontiguousarray(knn.unit_rows(np.asarray(q, np.float64))), np.ascontiguousarray(ref_unit))
    order = np.lexsort((np.broadcast_to(np.arange(dots.shape[1]), dots.shape), -dots), axis=1)[:, :k]
    return order, np.sqrt(np.maximum(2 - 2 * np.take_along_axis(dots, order, axis=1), 0))


def test_exact_search_is_the_float64_top_k_whatever_the_chunking():
    """The screened exact search returns every cell's true top k (ties by index) on a
    60k-cell reference with duplicated cells and outlying queries, for any chunking and
    scheduler, and agrees with NumPy's BLAS float64 distances."""
    import dask
    import dask.array as da

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(7, 30))
    ref = centres[rng.integers(0, 7, 60_000)] + rng.normal(size=(60_000, 30)) * 0.6
    ref[30_000:30_400] = ref[100]  # 401 identical cells: ties across the k-th neighbour
    m = TinyRef(ref)
    q = np.concatenate([
        centres[rng.integers(0, 7, 2500)] + rng.normal(size=(2500, 30)) * 0.6,
        ref[[100, 5, 59_999]],  # a duplicated cell, and cells of the reference itself
        rng.normal(size=(20, 30)) * 5,  # far from every centre: few cells pass a sample's threshold
    ])
    runs = []
    for chunk, scheduler in [(len(q), "sync"), (500, "threads"), (2999, "threads"), (1, "sync")]:
        qq = q[:40] if chunk == 1 else q
        with dask.config.set(scheduler=scheduler, num_workers=2):
            runs.append(knn.neighbors(da.from_array(qq, chunks=(chunk, -1)), m, k=500, method="exact").compute())
    for r in runs[1:]:
        n = len(r)
        np.testing.assert_array_equal(r["idx"], runs[0]["idx"][:n])
        np.testing.assert_array_equal(r["dist"], runs[0]["dist"][:n])
    idx, dist = _brute_force(q, m.embedding_unit, 500)
    np.testing.assert_array_equal(runs[0]["idx"], idx)
    np.testing.assert_allclose(runs[0]["dist"], dist.astype(np.float32), rtol=0, atol=0)
    assert set(runs[0]["idx"][2500, :401]) == set([100, *range(30_000, 30_400)])  # all the ties, lowest index first
    blas = np.sqrt(np.maximum(2 - 2 * knn.unit_rows(q) @ m.embedding_unit.T, 0))
    np.testing.assert_allclose(runs[0]["dist"], np.sort(blas, axis=1)[:, :500], atol=1e-6)


def test_exact_search_pads_when_k_exceeds_the_reference_and_picks_methods():
    ref = np.random.default_rng(3).normal(size=(40, 5))
    out = knn._exact_block(ref[:3] + 0.01, TinyRef(ref), 50)
    assert (out["idx"][:, :40] >= 0).all() and (out["idx"][:, 40:] == -1).all() and np.isinf(out["dist"][:, 40:]).all()
    np.testing.assert_array_equal(out["idx"][:, :40], _brute_force(ref[:3] + 0.01, TinyRef(ref).embedding_unit, 40)[0])
    assert knn.choose_method(100_000) == "exact" and knn.choose_method(400_000) == "exact"
    assert knn.choose_method(400_001) == "ann" and knn.choose_method(3500, "ann") == "ann"
    with pytest.raises(ValueError, match="unknown kNN method"):
        knn.choose_method(10, "flat")


class TinyRef:
    """What the exact search reads from a reference Model."""

    def __init__(self, embedding):
        self.embedding_unit = knn.unit_rows(np.asarray(embedding, np.float64))
        self.screen_arrays = knn.screen_arrays(self.embedding_unit)
