"""Marker models on real data: the built-in pan-human model (HuBMAP ASCT+B markers) annotating
real PBMC (pbmc4k, labels from SoupX's tutorial), the hierarchy walk, determinism, bad tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dask_annot import markers, pipeline
from dask_annot.config import resolve
from dask_annot.errors import GeneOverlapError, InputFormatError
from dask_annot.models import resolve_model
from dask_annot.outputs import DEPTH_COARSE, DEPTH_FINE, DEPTH_NONE

from .conftest import shared_path

PBMC4K = ("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")
SHARED_LEVEL = {"T_CD4": "T cell", "T_CD8": "T cell", "B": "B cell", "MNP": {"monocyte", "dendritic cell"}, "NK": "natural killer cell"}


@pytest.fixture(scope="module")
def pbmc4k_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mk")
    res = pipeline.run("pbmc4k", shared_path(*PBMC4K), models=["pan_human_v1"], output_dir=out,
                       settings=resolve(chunk_cells=10_000), log=lambda m: None)[0]
    return out, res


def test_pan_human_calls_pbmc4k_lineages(pbmc4k_run):
    import anndata as ad

    _, res = pbmc4k_run
    ct = pd.read_csv(res.model_dir / "cell_types.csv", keep_default_na=False)
    assert list(ct.columns) == ["barcode", "broad_cell_type", "coarse_cell_type", "fine_cell_type", "full_hierarchical_labels",
                                "final_level_softmax_prob", "coarse_cell_type_unfiltered", "umi_count"]
    truth = ad.read_h5ad(shared_path(*PBMC4K), backed="r").obs["Annotation"].astype(str).to_numpy()
    called = ct["coarse_cell_type_unfiltered"].to_numpy()
    for lab in ("T_CD4", "T_CD8", "B", "MNP"):
        want = SHARED_LEVEL[lab]
        want = want if isinstance(want, set) else {want}
        acc = np.mean([c in want for c in called[truth == lab]])
        assert acc >= 0.9, (lab, acc)
    assert not (res.model_dir / "cell_annotation_results.json.gz").exists()  # no evidence file for marker models
    rec = res.record
    assert rec["reference"]["kind"] == "markers" and rec["parameters"]["scoring"]["pooled"]
    p = ct["final_level_softmax_prob"].to_numpy()
    assert np.all((p >= 0) & (p <= 1)) and np.all(p[ct["broad_cell_type"] == "Unassigned"] == 0)
    # dot-plot data: B cells express their markers more often than the cells overall do
    dots = {d["cell_type"]: d for d in rec["marker_expression"]}
    b_types = [d for name, d in dots.items() if "B cell" in name]
    assert b_types and any(m["fraction_expressing"] > 0.5 for m in b_types[0]["markers"])


def test_marker_run_does_not_depend_on_chunks(pbmc4k_run, tmp_path):
    _, res = pbmc4k_run
    other = pipeline.run("pbmc4k", shared_path(*PBMC4K), models=["pan_human_v1"], output_dir=tmp_path,
                         settings=resolve(chunk_cells=333), log=lambda m: None)[0]
    assert (other.model_dir / "cell_types.csv").read_bytes() == (res.model_dir / "cell_types.csv").read_bytes()


def _model_and_plan():
    m = resolve_model("pan_human_v1")
    plan = markers.align_markers(m, np.array(m.genes, dtype=object), source="test")
    return m, plan


def test_walk_goes_down_only_as_far_as_the_margin_allows():
    m, _ = _model_and_plan()
    idx = {lab: i for i, lab in enumerate(m.labels)}
    base = np.full((4, len(m.labels)), -1.0)
    s = base.copy()
    s[0, idx["natural killer cell"]] = 20.0  # clear NK: down to the fine level
    s[1, idx["natural killer cell"]] = 8.0  # NK and a T type level: not confident at the coarse level
    s[1, idx["CD8-positive, alpha-beta T cell"]] = 8.0
    s[2, idx["naive B cell"]] = 9.0  # B, two B subtypes level: coarse B cell, fine not confident
    s[2, idx["memory B cell"]] = 9.0
    s[3, :] = 0.2  # nothing expressed: Unassigned
    calls = markers.walk(s, m)
    assert calls["depth"].tolist() == [DEPTH_FINE, 1, DEPTH_COARSE, DEPTH_NONE]
    assert m.labels[calls["code"][0]] == "natural killer cell" and calls["prob"][0] > 0.99
    assert m.levels[calls["code"][2]].coarse == "B cell"
    assert calls["prob"][3] == 0.0
    assert calls["prob"][2] > 0.99  # B cell is the only coarse group that scores well


def test_pooling_is_a_z_score():
    rng = np.random.default_rng(0)
    n, k = 400, 15
    nbr = np.array([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    raw = rng.standard_normal((n, 3))
    z = markers.pool(raw, nbr) / markers.pool_weights_norm(nbr, n)[:, None]
    assert 0.6 < z.std() < 1.6  # independent unit-variance scores stay unit-variance after pooling
    assert markers.pool_weights_norm(None, 5).tolist() == [1.0] * 5


def test_types_without_measured_markers_are_not_candidates():
    """Zheng's sorted PBMC keeps 8,846 genes: no endothelial marker but HLA class II ones, so
    endothelial types cannot be judged there (they called B cells before this rule)."""
    import anndata as ad

    m, _ = _model_and_plan()
    genes = ad.read_h5ad(shared_path("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"), backed="r").var_names.to_numpy()
    plan = markers.align_markers(m, genes, source="test")
    ok = {m.labels[i] for i in np.flatnonzero(plan.scorable)}
    assert "blood vessel endothelial cell" not in ok and "naive B cell" in ok and "natural killer cell" in ok
    with pytest.raises(GeneOverlapError, match="marker genes"):
        markers.align_markers(m, np.array(["CD3D", "CD3E", "MS4A1"], dtype=object), source="tiny")


def test_bad_marker_table(tmp_path):
    from dask_annot.build import build_marker_reference

    bad = tmp_path / "t.csv"
    bad.write_text("name,gene\nB cell,MS4A1\n")
    with pytest.raises(InputFormatError, match="cell_type,ontology_id,gene"):
        build_marker_reference(bad, name="x", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    good = tmp_path / "g.csv"
    good.write_text("cell_type,ontology_id,gene,sign\nB cell,CL:0000236,MS4A1,+\nB cell,CL:0000236,CD79A,+\n"
                    "T cell,CL:0000084,CD3E,+\nT cell,CL:0000084,MS4A1,-\n")
    out = build_marker_reference(good, name="mine", output=tmp_path / "mine")
    m = resolve_model(str(out))
    assert m.kind == "markers" and set(m.labels) == {"B cell", "T cell"}
