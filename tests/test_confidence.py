"""Confidence (issue 11): the novelty test on real data, the calibration map, --reject none,
and determinism across schedulers and chunk sizes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from dask_annot import confidence, config, consensus, pipeline
from dask_annot.build import build_reference
from dask_annot.errors import ConfigError
from dask_annot.outputs import DEPTH_NONE

from .conftest import shared_path

MAPS = Path(__file__).resolve().parent.parent / "dask_annot" / "data" / "maps"


def _subset_h5ad(src: Path, out: Path, column: str, per_label: dict[str, int], seed: int) -> Path:
    """A seeded per-label sample of a real labelled h5ad (raw counts kept as they are)."""
    import anndata as ad

    a = ad.read_h5ad(src)
    rng = np.random.default_rng(seed)
    lab = a.obs[column].astype(str).to_numpy()
    pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(lab == k), n, replace=False) for k, n in per_label.items()]))
    sub = a[pick].copy()
    sub.write_h5ad(out)
    return out


@pytest.fixture(scope="module")
def leave_out(tmp_path_factory):
    """Sorted PBMC without B and monocytes (2,500 cells) and a pbmc4k sample holding both absent
    (B, MNP) and present (T, NK) cells."""
    tmp = tmp_path_factory.mktemp("conf")
    query = _subset_h5ad(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad"), tmp / "query.h5ad", "Annotation",
                         {"B": 80, "MNP": 80, "T_CD4": 200, "T_CD8": 120, "NK": 80}, seed=2)
    ref = build_reference(shared_path("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"), label_column="trueLabel",
                          name="sorted_noB", output=tmp / "ref", ontology_map=MAPS / "pbmc_sorted_zheng2017.csv",
                          exclude_labels=("B", "Monocyte"))
    import anndata as ad

    truth = ad.read_h5ad(query, backed="r").obs["Annotation"].astype(str).to_numpy()
    return {"ref": ref, "query": query, "truth": truth, "tmp": tmp}


def _run(lo, run_id, **flags):
    client = flags.pop("client", None)
    settings = config.resolve(scheduler="threads", **flags)
    return pipeline.annotate(run_id, lo["query"], model=str(lo["ref"]), output_dir=lo["tmp"] / "runs", settings=settings,
                             log=lambda m: None, client=client)


def test_cells_of_absent_types_are_unassigned_and_present_ones_keep_labels(leave_out):
    res = _run(leave_out, "auto", layout="hierarchical")
    rejected = res.calls["depth"] == DEPTH_NONE
    truth = leave_out["truth"]
    absent, present = np.isin(truth, ["B", "MNP"]), np.isin(truth, ["T_CD4", "T_CD8", "NK"])
    assert rejected[absent].mean() >= 0.9, rejected[absent].mean()
    assert (~rejected[present]).mean() >= 0.95, (~rejected[present]).mean()
    import pandas as pd

    df = pd.read_csv(res.model_dir / "cell_types.csv", keep_default_na=False)
    un = df["fine_cell_type"] == "Unassigned"
    assert un.to_numpy().tolist() == rejected.tolist()
    assert (df.loc[un, "coarse_cell_type_unfiltered"] == "Unassigned").all()
    assert (df.loc[un, "broad_cell_type"].isin(["Unassigned", "Low UMI Barcode"])).all()
    rec = res.record["confidence"]
    assert rec["applied"] and rec["rejected"] == int(rejected.sum())
    assert sum(v["rejected"] for v in rec["rejected_by_nearest_type"].values()) == rec["rejected"]
    assert set(rec["thresholds"]) == set(json.loads((leave_out["ref"] / "reference.json").read_text())["labels"])
    # the probability is a probability and the levels use Azimuth's vocabulary
    assert ((df["final_level_softmax_prob"] >= 0) & (df["final_level_softmax_prob"] <= 1)).all()
    nca = df["fine_cell_type"] == "Fine Not Confidently Annotated"
    assert (res.calls["depth"][nca.to_numpy()] < 3).all()


def test_calibration_map_is_monotone_and_its_ece_small(leave_out):
    sec = json.loads((leave_out["ref"] / "reference.json").read_text())["confidence"]["calibration"]
    assert "stratified random" in sec["folds"]
    for level in ("fine", "coarse"):
        x, y = np.asarray(sec[level]["x"]), np.asarray(sec[level]["y"])
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)  # a jump is two knots at one x
        grid = np.linspace(-0.5, 1.5, 401)
        mapped = confidence.apply_map(sec[level], grid)
        assert np.all(np.diff(mapped) >= 0) and mapped.min() >= 0 and mapped.max() <= 1
        assert sec[level]["ece"] <= 0.1
        assert sum(b["cells"] for b in sec[level]["curve"]) == sec["cells_scored"] == 2500


def test_reject_none_is_the_old_behaviour(leave_out, tmp_path):
    """--reject none writes what a reference without a confidence section (the behaviour before
    issue 11) writes, byte for byte."""
    old_ref = tmp_path / "old_ref"
    shutil.copytree(leave_out["ref"], old_ref)
    meta = json.loads((old_ref / "reference.json").read_text())
    del meta["confidence"]
    (old_ref / "reference.json").write_text(json.dumps(meta))
    none = _run(leave_out, "none", reject="none")
    settings = config.resolve(scheduler="threads")
    old = pipeline.annotate("old", leave_out["query"], model=str(old_ref), output_dir=tmp_path / "runs", settings=settings, log=lambda m: None)
    assert (none.model_dir / "cell_types.csv").read_bytes() == (old.model_dir / "cell_types.csv").read_bytes()
    assert not (none.calls["depth"] == DEPTH_NONE).any()
    assert old.record["confidence"]["applied"] is False and none.record["confidence"]["applied"] is False


def test_same_calls_with_threads_and_local_cluster_and_any_chunk_size(leave_out, local_cluster_client):
    a = _run(leave_out, "det-threads", layout="hierarchical")
    b = _run(leave_out, "det-cluster", layout="hierarchical", chunk_cells=37, client=local_cluster_client)
    assert (a.model_dir / "cell_types.csv").read_bytes() == (b.model_dir / "cell_types.csv").read_bytes()
    assert a.record["confidence"]["rejected"] == b.record["confidence"]["rejected"]


def test_reject_must_be_auto_or_none():
    with pytest.raises(ConfigError, match="--reject must be auto or none"):
        config.resolve(reject="maybe")


# ----------------------------------------------------------------------------- kernels

def test_pooled_load_handles_missing_neighbours_and_zero_depth():
    foreign = np.array([0.0, 10.0, 0.0, 5.0])
    depth = np.array([0.0, 100.0, 0.0, 50.0])
    nbr = np.array([[-1, -1], [3, -1], [0, 2], [1, 1]])
    load = confidence.pooled_load(foreign, depth, nbr)
    assert load[0] == 0.0 and load[2] == 0.0  # no depth at all: no evidence, not NaN
    assert load[1] == pytest.approx(15 / 150) and load[3] == pytest.approx(25 / 250)
    assert np.array_equal(confidence.pooled_load(foreign, depth, None), np.divide(foreign, depth, out=np.zeros(4), where=depth > 0))


def test_foreign_stats_count_only_repeated_foreign_genes_and_measured_depth():
    block = sp.csr_matrix(np.array([[1, 2, 0, 7], [3, 0, 1, 0], [0, 0, 0, 0]]))
    f, depth = confidence._stats_block(block, np.array([0, 2]), np.array([1.0, 1.0, 1.0, 0.0]))
    assert f.toarray().tolist() == [[0.0, 0.0], [3.0, 0.0], [0.0, 0.0]] and depth.tolist() == [3.0, 4.0, 0.0]


def test_foreign_stats_from_the_counts_as_read_equal_those_from_the_aligned_counts(tmp_path):
    """Universe genes in another order than the query's columns, one unmeasured: the statistics
    from the raw chunks are those of the aligned chunks (columns picked by the universe)."""
    import anndata
    import dask
    import pandas as pd

    from dask_annot import align, store

    rng = np.random.default_rng(3)
    raw = sp.csr_matrix(rng.poisson(0.8, size=(50, 6)).astype(np.int32))
    query_index = np.array([4, -1, 0, 5, 2])  # universe gene -> query column
    conf = SimpleNamespace(genes=np.array([0, 3, 4]), foreign=np.array([True, False, True]), measured=np.array([0, 2, 3, 4]))
    h5ad = tmp_path / "raw.h5ad"
    anndata.AnnData(X=raw, var=pd.DataFrame(index=[f"g{i}" for i in range(6)])).write_h5ad(h5ad)
    st = store.convert(h5ad, tmp_path / "m.zarr")
    (got,) = dask.compute(confidence.foreign_stats(st, conf, query_index, chunk_cells=17))
    got = [(sp.vstack([g[0] for g in got]), np.concatenate([g[1] for g in got]))]
    aligned = raw @ align.Alignment.selection(SimpleNamespace(query_index=query_index, n_query_genes=6, n_reference_genes=5))
    f_ref = aligned[:, conf.genes[conf.foreign]].toarray().astype(np.float32)
    f_ref[f_ref < confidence.MIN_COUNT] = 0
    assert np.array_equal(got[0][0].toarray(), f_ref)
    assert got[0][1].tolist() == np.asarray(aligned[:, conf.measured].sum(axis=1)).ravel().astype(float).tolist()


def test_a_gene_every_neighbourhood_expresses_is_background():
    """Two groups of 20 cells: a gene only the first group expresses counts in full; one every
    cell expresses at the same rate is the query's background and counts for nothing."""
    n = 40
    nbr = np.array([[(i + 1) % 20 + 20 * (i // 20), (i + 2) % 20 + 20 * (i // 20)] for i in range(n)])
    grouped = np.where(np.arange(n) < 20, 4.0, 0.0)
    everywhere = np.full(n, 2.0)
    E = sp.csr_matrix(np.stack([grouped, everywhere], axis=1))
    excess, depth, rate = confidence.background_excess(E, np.full(n, 100.0), nbr)
    assert rate[0] == 0.0 and rate[1] == pytest.approx(0.02)
    assert depth.tolist() == [300.0] * n
    np.testing.assert_allclose(excess, np.where(np.arange(n) < 20, 12.0, 0.0))


def test_a_program_is_what_most_of_a_neighbourhood_expresses():
    # 4 cells, each neighbourhood = the cell and its 2 listed neighbours (-1 = none)
    nbr = np.array([[1, 2], [0, 2], [0, 1], [-1, -1]])
    E = sp.csr_matrix(np.array([[3, 2, 0], [2, 0, 0], [0, 0, 0], [0, 0, 5]], dtype=np.float32))
    # gene 0: cells 0,1 of the triangle (2 of 3 > half); gene 1: only cell 0 (1 of 3); gene 2: the lone cell 3
    assert confidence.program_genes(E, nbr).tolist() == [1, 1, 1, 1]
    E2 = sp.csr_matrix(np.array([[3, 2, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32))
    assert confidence.program_genes(E2, nbr).tolist() == [0, 0, 0, 0]
    assert confidence.program_genes(E2, None).tolist() == [2, 0, 0, 0]


def test_a_gene_every_populated_query_type_expresses_is_the_samples():
    n = confidence.MIN_GROUP_CELLS
    fine = np.repeat([0, 1, 2], [n, n, 5])  # label 2 too small to count
    dense = np.zeros((fine.size, 3), dtype=np.float32)
    dense[::20, 0] = 2  # in 5% of every type: the sample's
    dense[:n:20, 1] = 2  # only in type 0: a program
    dense[fine == 2, 2] = 2  # only in the small type
    wide = confidence.sample_wide(sp.csr_matrix(dense), fine, 3)
    assert wide.tolist() == [True, False, False]
    dense[fine == 1, 0] = 2  # now most of type 1 expresses it: a program, though every type has it
    assert not confidence.sample_wide(sp.csr_matrix(dense), fine, 3).any()
    # a query on one reference type cannot show what the sample shares
    assert not confidence.sample_wide(sp.csr_matrix(dense), np.zeros(fine.size, dtype=np.int64), 3).any()


def test_spreading_skips_rejected_cells():
    p0 = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    nbr = np.array([[1, 2], [0, 2], [0, 1]])
    keep = np.array([True, False, True])
    p = consensus.spread(p0, nbr, keep=keep)
    assert p[1].tolist() == [0.0, 0.0]
    # cell 0 hears only cell 2 and cell 2 only cell 0: what cell 1 says never arrives
    p_without = consensus.spread(p0[[0, 2]], np.array([[1, -1], [0, -1]]))
    np.testing.assert_allclose(p[[0, 2]], p_without)


def test_a_technology_shift_alone_does_not_reject_a_sample(tmp_path):
    """An inDrop mouse lung sample (Zilionis) against the 10x-made built-in mouse model: every type
    carries ~10x the reference's diffuse foreign-gene load (the chemistry), but no foreign program,
    so its T, NK and B cells keep their labels (it was 800/800 Unassigned with the load alone)."""
    import anndata as ad

    path = shared_path("data", "mouse_tissue", "zilionis_mouse_lung_immune_800cells.h5ad")
    truth = ad.read_h5ad(path, backed="r").obs["celltypes"].astype(str).to_numpy()
    res = pipeline.run("z", path, models=["mouse_immune_v1"], output_dir=tmp_path, settings=config.resolve(scheduler="threads"),
                       log=lambda m: None, progress=False)
    rec = json.loads((res[0].model_dir / "run.json").read_text())["confidence"]
    rejected = res[0].calls["depth"] == DEPTH_NONE
    assert rec["rejected"] == int(rejected.sum())
    lymph = np.isin(truth, ["T cells", "NK cells", "B cells"])
    assert lymph.sum() > 400
    assert (~rejected[lymph]).mean() >= 0.95, (~rejected[lymph]).mean()
    assert rejected.mean() <= 0.1, rejected.mean()
    # the load alone still flags (nearly) every cell: the program test is what keeps them
    assert rec["cells_over_load_threshold"] >= 0.9 * 800
    assert rec["cells_with_foreign_program"] == rec["rejected"]


def test_another_tissue_on_several_reference_types_stays_unassigned(tmp_path):
    """E15 mouse pancreas (Bastidas-Ponce) against the built-in mouse immune model: its cells
    fall on two populated reference types (monocyte, NK) and share their tissue's genes across
    both; shared programs still count, so the sample stays Unassigned."""
    res = pipeline.run("p", shared_path("data", "mouse_tissue", "bastidas_mouse_pancreas_e15_739cells.h5ad"),
                       models=["mouse_immune_v1"], output_dir=tmp_path, settings=config.resolve(scheduler="threads"),
                       log=lambda m: None, progress=False)
    rec = json.loads((res[0].model_dir / "run.json").read_text())["confidence"]
    assert sum(v["cells"] >= confidence.MIN_GROUP_CELLS for v in rec["rejected_by_nearest_type"].values()) >= 2
    assert rec["rejected"] / 739 >= 0.9, rec["rejected"]


def test_a_mostly_unassigned_run_says_why_in_the_log_and_run_json(tmp_path):
    """A brain tumour against the built-in PBMC model (a whole foreign tissue: its cells share
    foreign programs) stays mostly Unassigned, and the run says so instead of staying silent."""
    said: list[str] = []
    brain = Path(__file__).resolve().parent / "data" / "tenx_h5_format_tests" / "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5"
    res = pipeline.run("b", brain, models=["human_pbmc_v1"], output_dir=tmp_path, settings=config.resolve(scheduler="threads"),
                       log=said.append, progress=False)
    rec = json.loads((res[0].model_dir / "run.json").read_text())
    frac = rec["confidence"]["rejected"] / 182
    assert frac > 0.5
    warn = [w for w in rec.get("warnings", []) if "Unassigned" in w]
    assert len(warn) == 1 and "--reject none" in warn[0] and f"{frac:.0%}" in warn[0]
    assert any(line.startswith("warning: human_pbmc_v1") for line in said)
    assert "--reject none" in (res[0].model_dir / "web_summary.html").read_text()
