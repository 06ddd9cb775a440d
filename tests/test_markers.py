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


def test_marker_run_does_not_depend_on_chunks_or_workers(pbmc4k_run, tmp_path):
    _, res = pbmc4k_run
    other = pipeline.run("pbmc4k", shared_path(*PBMC4K), models=["pan_human_v1"], output_dir=tmp_path,
                         settings=resolve(chunk_cells=333, scheduler="threads", n_workers=1), log=lambda m: None)[0]
    assert (other.model_dir / "cell_types.csv").read_bytes() == (res.model_dir / "cell_types.csv").read_bytes()
    assert other.record["marker_expression"] == res.record["marker_expression"]


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


def test_default_run_leaves_out_a_marker_model_that_cannot_judge_the_matrix(tmp_path):
    """Default models: a matrix holding the kNN model's genes but none of the pan model's marker
    genes still gets its kNN annotation; the pan model is left out with a warning."""
    import scipy.sparse as sp

    from dask_annot import h5
    from dask_annot.cli import example_path

    info = h5.open_matrix(example_path())
    X = h5.read_cells(info, 0, info.n_cells).tocsc()
    pan = {str(g).upper() for g in resolve_model("pan_human_v1").genes}
    keep = np.array([str(n).upper() not in pan for n in info.feature_names])
    path = tmp_path / "no_markers.h5"
    h5.write_10x_h5(path, sp.csr_matrix(X[:, keep]), barcodes=info.barcodes, feature_ids=info.feature_ids[keep],
                    feature_names=info.feature_names[keep])
    logs = []
    results = pipeline.run("t", path, models=None, output_dir=tmp_path / "out", settings=resolve(), log=logs.append)
    assert [r.model_dir.name for r in results] == ["human_pbmc_v1"]
    assert any("default model pan_human_v1 left out" in m for m in logs)
    with pytest.raises(GeneOverlapError):  # named explicitly, it is an error
        pipeline.run("t2", path, models=["pan_human_v1"], output_dir=tmp_path / "out", settings=resolve(), log=lambda m: None)


BASTIDAS = ("data", "mouse_tissue", "bastidas_mouse_pancreas_e15_739cells.h5ad")


def test_asctb_chain_term_that_is_an_ancestor_qualifies_the_type_before_it():
    """ASCT+B pancreas: "pancreatic ductal cell > epithelial cell of exocrine pancreas: KRT19"
    describes ductal cells (the second term is a CL ancestor of the first); a chain that goes on
    to a term that is not an ancestor names a new type (centro-acinar cell, EC cell)."""
    import importlib.util

    from dask_annot.ontology import cell_ontology

    from .conftest import HERE

    spec = importlib.util.spec_from_file_location("asctb_markers", HERE.parent / "scripts" / "asctb_markers.py")
    asctb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(asctb)
    cl = cell_ontology()
    assert asctb.row_type(["CL:0002079", "CL:1001433"], cl) == "CL:0002079"
    assert asctb.row_type(["CL:0002079", "CL:0002080"], cl) == "CL:0002080"
    assert asctb.row_type(["CL:0002079", "CL:0000577"], cl) == "CL:0000577"
    assert asctb.row_type(["CL:0000084"], cl) == "CL:0000084"
    # the built-in models carry it: KRT19 is a ductal marker; "epithelial cell of exocrine pancreas" is no type of its own
    for name, krt19 in (("pan_human_v1", "KRT19"), ("pan_mouse_v1", "Krt19")):
        m = resolve_model(name)
        duct = m.labels.index("pancreatic ductal cell")
        assert krt19 in {m.genes[g] for t, g in zip(m.type_idx, m.gene_idx) if t == duct}, name
        assert "epithelial cell of exocrine pancreas" not in m.labels


def test_organ_restriction_on_real_pancreas(tmp_path):
    """--organ pancreas: only the pancreas table's types are candidates (without it, E15.5
    endocrine cells of Bastidas et al. are partly called Merkel cells, a skin type)."""
    m = resolve_model("pan_mouse_v1")
    organs = m.meta["type_organs"]
    path = shared_path(*BASTIDAS)
    runs = {}
    for key, org in (("all", None), ("pancreas", "pancreas")):
        res = pipeline.run(key, path, models=["pan_mouse_v1"], output_dir=tmp_path / key, settings=resolve(organs=org),
                           log=lambda msg: None)[0]
        ct = pd.read_csv(res.model_dir / "cell_types.csv", keep_default_na=False)
        runs[key] = (ct, res.record)
    fine_all = set(runs["all"][0]["fine_cell_type"]) & set(m.labels)
    fine_pan = set(runs["pancreas"][0]["fine_cell_type"]) & set(m.labels)
    assert any("pancreas" not in organs[t] for t in fine_all)
    assert fine_pan and all("pancreas" in organs[t] for t in fine_pan)
    rec = runs["pancreas"][1]["gene_overlap"]
    assert rec["organs"] == ["pancreas"] and 0 < rec["cell_types_scorable"] <= rec["cell_types_of_organs"] < len(m.labels)
    assert "organs" not in runs["all"][1]["gene_overlap"]


def test_unknown_organ_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    from dask_annot.errors import ConfigError

    m = resolve_model("pan_mouse_v1")
    with pytest.raises(ConfigError, match="not an organ of model 'pan_mouse_v1'; choose from .*pancreas"):
        markers.organ_candidates(m, ["pancreas", "brain"])
    assert markers.organ_candidates(m, []).all() and resolve(organs="Pancreas, lung").organs == ("pancreas", "lung")
    p = subprocess.run([sys.executable, "-m", "dask_annot", "annotate", "--id", "x", "--matrix", str(shared_path(*BASTIDAS)),
                        "--cell-annotation-model", "pan_mouse_v1", "--organ", "pancreaz", "--output-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "pancreaz" in p.stderr and "choose from" in p.stderr
    assert not (tmp_path / "x" / "outs").exists() or not any((tmp_path / "x" / "outs").rglob("cell_types.csv"))


def test_gene_names_resolved_and_mouse_orthologs_renamed():
    """Names a table writes with no HGNC id ("NKP46") resolve to the symbol (NCR1); mouse orthologs
    with another symbol are renamed (FCER2 -> Fcer2a, CD8B -> Cd8b1); LYZ stays unmapped in mouse."""

    def markers_of(model, label):
        t = model.labels.index(label)
        return {model.genes[g] for ti, g in zip(model.type_idx, model.gene_idx) if ti == t}

    human, mouse = resolve_model("pan_human_v1"), resolve_model("pan_mouse_v1")
    assert "NCR1" in markers_of(human, "natural killer cell") and "NKP46" not in set(human.genes)
    assert "Ncr1" in markers_of(mouse, "natural killer cell") and "Fcer2a" in markers_of(mouse, "naive B cell")
    assert "Cd8b1" in set(mouse.genes) and not {"Lyz1", "Lyz2"} & set(mouse.genes)
