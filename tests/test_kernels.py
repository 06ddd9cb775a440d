"""Block kernels on tiny arrays with the awkward cases built in (layer 1), and properties (layer 3)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_annot import align, knn, normalize, project, vote
from dask_annot.errors import ConfigError, GeneOverlapError
from dask_annot.ontology import levels_for
from dask_annot.knn import unit_rows


class TinyModel:
    """The attributes the kernels read, on a hand-made reference."""

    def __init__(self, embedding, label_codes, labels, datasets=("d0",), dataset_codes=None):
        self.embedding64 = np.asarray(embedding, dtype=np.float64)
        self.embedding_unit = unit_rows(self.embedding64)
        self.screen_arrays = knn.screen_arrays(self.embedding_unit)
        self.label_codes = np.asarray(label_codes, dtype=np.int32)
        self.labels = tuple(labels)
        self.class_sizes = np.bincount(self.label_codes, minlength=len(labels))
        self.datasets = tuple(datasets)
        self.dataset_codes = np.zeros_like(self.label_codes) if dataset_codes is None else np.asarray(dataset_codes)
        self.mean = np.zeros(3)
        self.std = np.ones(3)
        self.target_sum = 1e4
        self.clip = 10.0


def test_zero_umi_cells_normalize_to_zero_not_nan():
    block = sp.csr_matrix(np.array([[0, 0, 0], [1, 0, 3]], dtype=np.int32))
    z = normalize._zscore_block(block, np.array([0, 4]), TinyModel(np.eye(3), [0, 1, 2], "abc"))
    assert np.isfinite(z).all() and (z[0] == 0).all()
    np.testing.assert_allclose(z[1], np.log1p(np.array([1, 0, 3]) / 4 * 1e4).astype(np.float32), rtol=1e-6)


def test_empty_chunk_passes_through_every_kernel():
    m = TinyModel(np.eye(3), [0, 1, 2], "abc")
    z = normalize._zscore_block(sp.csr_matrix((0, 3), dtype=np.int32), np.zeros(0), m)
    emb = project._project_block(z, np.eye(3))
    nb = knn._neighbors_block(emb, m, 2, "exact", 0.2)
    assert vote._vote_block(nb, m, False).shape == (0,)


def test_stages_refuse_gene_chunking():
    import dask.array as da

    x = da.zeros((10, 6), chunks=(5, 3))
    with pytest.raises(ConfigError, match=r"rechunk"):
        normalize.check_cell_chunked(x, "zscore")


def test_alignment_by_symbol_and_missing_genes_stay_zero():
    al = align.align_genes(query_ids=[f"q{i}" for i in range(60)], query_names=[f"G{i}" for i in range(60)],
                           ref_ids=[f"r{i}" for i in range(70)], ref_names=[f"G{i}" for i in range(5, 75)])
    assert al.matched_by == "symbol" and al.n_shared == 55
    X = sp.csr_matrix(np.arange(120).reshape(2, 60))
    out = align._align_block(X, al.selection()).toarray()
    np.testing.assert_array_equal(out[:, :55], X.toarray()[:, 5:60])
    assert (out[:, 55:] == 0).all()


def test_alignment_prefers_ensembl_ids_and_strips_versions():
    ids = [f"ENSG{i:011d}" for i in range(100)]
    al = align.align_genes(query_ids=[f"{x}.3" for x in ids], query_names=["X"] * 100, ref_ids=ids[::-1], ref_names=["Y"] * 100)
    assert al.matched_by == "ensembl_id"
    np.testing.assert_array_equal(al.query_index, np.arange(100)[::-1])


def test_too_small_overlap_is_refused_with_counts():
    with pytest.raises(GeneOverlapError, match=r"only 10 of the 100 genes.*matched by symbol"):
        align.align_genes(query_ids=list("abcdefghij"), query_names=[f"G{i}" for i in range(10)],
                          ref_ids=[f"r{i}" for i in range(100)], ref_names=[f"G{i}" for i in range(100)])


def test_projection_is_the_loadings_when_every_gene_is_measured(rng):
    w, _ = np.linalg.qr(rng.normal(size=(40, 5)))
    np.testing.assert_array_equal(project.projection_matrix(w, np.ones(40, bool)), w)
    measured = np.ones(40, bool)
    measured[::3] = False
    p = project.projection_matrix(w, measured)
    assert (p[~measured] == 0).all()
    c = rng.normal(size=(7, 5))
    np.testing.assert_allclose((c @ w.T) @ p, c, atol=1e-10)  # a cell on the PCA subspace is recovered exactly


def test_exact_knn_matches_brute_force_cosine(rng):
    ref = rng.normal(size=(200, 6))
    q = rng.normal(size=(37, 6)).astype(np.float32)
    m = TinyModel(ref, np.zeros(200, int), "a")
    nb = knn._exact_block(q, m, 25)
    u = unit_rows(q.astype(np.float64))
    d = np.sqrt(np.maximum(((u[:, None, :] - m.embedding_unit[None]) ** 2).sum(-1), 0))
    np.testing.assert_array_equal(nb["idx"], np.argsort(d, axis=1, kind="stable")[:, :25])
    np.testing.assert_allclose(nb["dist"], np.sort(d, axis=1)[:, :25], rtol=1e-5, atol=1e-6)


def test_knn_rows_do_not_depend_on_the_block(rng):
    m = TinyModel(rng.normal(size=(300, 8)), np.zeros(300, int), "a")
    q = rng.normal(size=(600, 8)).astype(np.float32)
    whole = knn._exact_block(q, m, 40)
    parts = np.concatenate([knn._exact_block(q[a:a + 97], m, 40) for a in range(0, 600, 97)])
    np.testing.assert_array_equal(whole["idx"], parts["idx"])


def test_neighbourhood_rule():
    assert knn.neighbourhood(500, 20_000_000) == (500, "as requested")
    assert knn.neighbourhood(500, 50_000)[0] == 500
    assert knn.neighbourhood(500, 3500)[0] == 35
    assert knn.neighbourhood(500, 800)[0] == 15
    assert knn.neighbourhood(10, 800) == (10, "as requested")
    assert knn.neighbourhood(500, 12)[0] == 12


def _records(idx, dist):
    idx, dist = np.atleast_2d(idx), np.atleast_2d(dist)
    out = np.empty(idx.shape[0], dtype=knn.neighbor_dtype(idx.shape[1]))
    out["idx"], out["dist"] = idx, dist
    return out


def test_vote_counts_ties_and_invalid_neighbours():
    m = TinyModel(np.eye(6), [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    # 2 x a, 2 x b: tie on count broken by weighted share (a's are nearer)
    v = vote._vote_block(_records([0, 1, 2, 3], [0.1, 0.1, 0.9, 0.9]), m, False)
    assert (v["fine"][0], v["count"][0]) == (0, 2) and v["prob"][0] > 0.5
    # exact tie everywhere: the label that sorts first
    v = vote._vote_block(_records([2, 0], [0.5, 0.5]), m, False)
    assert v["fine"][0] == 0 and v["prob"][0] == pytest.approx(0.5)
    # -1 slots (ANN padding) are ignored
    v = vote._vote_block(_records([4, -1, -1], [0.2, np.inf, np.inf]), m, False)
    assert (v["fine"][0], v["count"][0], v["n_neighbors"][0]) == (2, 1, 1)


def test_balanced_vote_corrects_class_sizes():
    m = TinyModel(np.eye(10), [0] * 8 + [1] * 2, ["big", "small"])
    nb = _records([0, 1, 2, 8, 9], [0.1] * 5)
    assert vote._vote_block(nb, m, False)["fine"][0] == 0  # 3 of 8 big cells vs 2 of 2 small ones
    assert vote._vote_block(nb, m, True)["fine"][0] == 1


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 30), balanced=st.booleans())
def test_vote_does_not_depend_on_neighbour_order(seed, k, balanced):
    r = np.random.default_rng(seed)
    m = TinyModel(np.eye(50), r.integers(0, 4, 50), "abcd")
    idx = np.array([r.choice(50, size=k, replace=False) for _ in range(5)])
    dist = np.round(r.random((5, k)), 3).astype(np.float32)
    a = vote._vote_block(_records(idx, dist), m, balanced)
    perm = r.permutation(k)
    b = vote._vote_block(_records(idx[:, perm], dist[:, perm]), m, balanced)
    np.testing.assert_array_equal(a["fine"], b["fine"])
    np.testing.assert_array_equal(a["count"], b["count"])
    np.testing.assert_allclose(a["prob"], b["prob"], rtol=1e-6)


def test_ontology_levels():
    lv = levels_for("CD14 mono", "CL:0001054")
    assert (lv.fine, lv.coarse, lv.broad) == ("CD14-positive monocyte", "monocyte", "immune cell")
    assert lv.path == "immune cell|monocyte|CD14-positive monocyte"
    assert levels_for("B", "CL:0000236").path == "immune cell|B cell"
    assert levels_for("mystery", None).path == "mystery"
    with pytest.raises(ConfigError, match="not in the Cell Ontology"):
        levels_for("x", "CL:9999999")


def test_projection_with_missing_genes_checks_conditioning_and_refuses_an_unrecoverable_direction():
    """Issue 13 item 4: a singular fit was a LinAlgError at 0fac772; it is now a clear GeneOverlapError."""
    from dask_annot.errors import GeneOverlapError
    from dask_annot.models import resolve_model

    w = resolve_model("human_pbmc_v1").loadings.astype(np.float64)
    every = project.projection_matrix(w, np.ones(w.shape[0], bool))
    np.testing.assert_array_equal(every, w)  # nothing missing: exactly the loadings
    rng = np.random.default_rng(3)
    some = rng.random(w.shape[0]) > 0.3
    fit = project.projection_matrix(w, some)
    assert (fit[~some] == 0).all()
    # on a cell that lies in the PCA space, the fit from 70% of the genes recovers its coordinates
    c = rng.normal(size=w.shape[1])
    np.testing.assert_allclose((w @ c)[some] @ fit[some], c, atol=1e-9)
    with pytest.raises(GeneOverlapError, match="carry .* of one of the model's principal directions"):
        project.projection_matrix(w, np.arange(w.shape[0]) < 5, what="q.h5")  # rank 5 < 30 PCs: singular
    # the genes that carry PC 1 removed
    carriers = np.argsort(-np.abs(w[:, 0]))
    cut = np.ones(w.shape[0], bool)
    cut[carriers[: int(np.searchsorted(np.cumsum(np.sort(w[:, 0] ** 2)[::-1]), 0.9995)) + 1]] = False
    with pytest.raises(GeneOverlapError, match="q.h5: the genes it measures"):
        project.projection_matrix(w, cut, what="q.h5")


def test_calls_become_azimuths_vocabulary_by_depth_and_10xs_in_the_cloud_layout():
    from dask_annot import outputs
    from dask_annot.ontology import Levels

    class M:
        levels = (Levels(fine="naive B cell", coarse="B cell", broad="immune cell", ontology_id="CL:0000788"),
                  Levels(fine="T cell", coarse="T cell", broad="immune cell", ontology_id="CL:0000084"))

    calls = outputs.calls_from(np.array([0, 0, 0, 0, 1]), prob=np.array([0.9, 0.8, 0.7, 0.1, 0.95]),
                               count=np.array([30, 20, 10, 3, 33]), depth=np.array([3, 2, 1, 0, 3]))
    umi = np.array([500, 500, 500, 500, 50])
    h = outputs.cell_labels(calls, umi, M, layout="hierarchical")
    assert h["broad_cell_type"].tolist() == ["immune cell", "immune cell", "immune cell", "Unassigned", "Low UMI Barcode"]
    assert h["coarse_cell_type"].tolist() == ["B cell", "B cell", "Coarse Not Confidently Annotated", "Unassigned", "Low UMI Barcode"]
    assert h["fine_cell_type"].tolist() == ["naive B cell", "Fine Not Confidently Annotated", "Fine Not Confidently Annotated", "Unassigned", "T cell"]
    assert h["full_hierarchical_labels"].tolist() == ["immune cell|B cell|naive B cell", "immune cell|B cell", "immune cell", "Unassigned", "immune cell|T cell"]
    assert h["coarse_cell_type_unfiltered"].tolist() == ["B cell", "B cell", "Coarse Not Confidently Annotated", "Unassigned", "T cell"]
    c = outputs.cell_labels(calls, umi, M, layout="cloud")
    assert c["coarse_cell_type"].tolist() == ["B cell", "B cell", "B cell", "Unassigned", "Low UMI Barcode"]
    assert c["fine_cell_type"].tolist() == ["naive B cell"] * 3 + ["Unassigned", "T cell"]
    text = outputs.cell_types_csv(np.array(["a", "b", "c", "d", "e"]), calls, umi, M, layout="hierarchical").splitlines()
    assert text[3] == "c,immune cell,Coarse Not Confidently Annotated,Fine Not Confidently Annotated,immune cell,0.7,Coarse Not Confidently Annotated,500"


def test_production_projection_equals_the_dense_definition_with_clipping_and_missing_genes(rng):
    """project_counts' sparse kernel (z-score folded into the loadings, clip corrected only on stored
    entries) against the definition: clipped dense z-scores times the projection matrix."""
    n_genes, n_pcs = 40, 6
    q, _ = np.linalg.qr(rng.normal(size=(n_genes, n_pcs)))

    class M:
        mean = rng.uniform(0.0, 0.3, n_genes)
        std = rng.uniform(0.05, 0.5, n_genes)  # small stds: large counts exceed the clip
        clip = 10.0

    counts = sp.random(300, n_genes, density=0.2, random_state=7, data_rvs=lambda k: rng.integers(1, 60, k)).tocsr()
    keep = np.ones(300)
    keep[0] = 0  # an all-zero cell
    counts = sp.csr_matrix(sp.diags(keep) @ counts)
    counts.eliminate_zeros()
    logn = normalize.log_normalize_block(counts, np.asarray(counts.sum(axis=1)).ravel() + 50, 1e4)
    measured = rng.random(n_genes) > 0.25
    proj = project.projection_matrix(q, measured)
    got = project._project_counts_block(logn, project.projection_terms(proj, M.mean, M.std), M)
    dense = normalize.clipped_zscore(logn.toarray(), M.mean, M.std, M.clip)
    assert (dense >= M.clip).sum() > 20  # the clip correction is exercised
    np.testing.assert_allclose(got, (dense @ proj).astype(np.float32), rtol=1e-5, atol=1e-5)
