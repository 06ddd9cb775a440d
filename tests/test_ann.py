"""ANN recall against exact search on a real reference (layer 4)."""
from __future__ import annotations

import numpy as np
import pytest

from dask_annot import align, h5, knn, normalize, project, reference, vote

from .conftest import shared_path


@pytest.mark.slow
def test_pynndescent_recall_at_k500_on_real_pbmc():
    """pbmc4k cells against the built-in 3,500-cell PBMC reference, k=500: recall >= 0.95, top label >= 0.995."""
    m = reference.resolve_model("human_pbmc_v1")
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

    m = reference.resolve_model("human_pbmc_v1")
    rng = np.random.default_rng(1)
    q = m.embedding[rng.integers(0, m.n_cells, 5000)] + rng.normal(size=(5000, m.n_pcs)).astype(np.float32) * 0.5
    runs = []
    for chunk, scheduler in [(5000, "sync"), (777, "threads"), (4096, "threads")]:
        with dask.config.set(scheduler=scheduler, num_workers=2):
            runs.append(knn.neighbors(da.from_array(q, chunks=(chunk, -1)), m, k=500, method="ann").compute())
    for r in runs[1:]:
        np.testing.assert_array_equal(r["idx"], runs[0]["idx"])


def test_faiss_flat_is_exact_search_and_chunk_independent():
    """The flat (faiss) search agrees with NumPy's float64 exact search, whatever the chunking."""
    import dask
    import dask.array as da

    m = reference.resolve_model("human_pbmc_v1")
    rng = np.random.default_rng(2)
    q = m.embedding[rng.integers(0, m.n_cells, 3000)] + rng.normal(size=(3000, m.n_pcs)).astype(np.float32) * 0.5
    runs = []
    for chunk, scheduler in [(3000, "sync"), (500, "threads"), (2999, "threads")]:
        with dask.config.set(scheduler=scheduler, num_workers=2):
            runs.append(knn.neighbors(da.from_array(q, chunks=(chunk, -1)), m, k=200, method="flat").compute())
    for r in runs[1:]:
        np.testing.assert_array_equal(r["idx"], runs[0]["idx"])
        np.testing.assert_array_equal(r["dist"], runs[0]["dist"])
    exact = knn._exact_block(q, m, 200)
    assert np.mean(runs[0]["idx"] == exact["idx"]) > 0.999  # float32 vs float64 near-ties only
    np.testing.assert_allclose(runs[0]["dist"], exact["dist"], atol=2e-3)
    assert knn.choose_method(100_000) == "flat" and knn.choose_method(3500) == "exact" and knn.choose_method(1_000_000) == "ann"
