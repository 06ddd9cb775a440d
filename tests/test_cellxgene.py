"""References from CELLxGENE (issue 14): schema-native h5ad files and a real local SOMA
experiment (the Census's format), written here from the real data in ../shared.

Reference: the FACS-sorted PBMC of Zheng 2017 (one file, dataset id from its file name)
and the first half of 10x's pbmc4k (dataset id in ``uns``), in the CELLxGENE schema:
Ensembl ``var`` index (symbols mapped by the GRCh38 feature table of a real Cell Ranger
file in tests/data) with ``feature_name``, log-normalized ``X``, counts in ``raw.X``,
``cell_type_ontology_term_id`` = Cell Ontology ids (hand-mapped from the sources' labels).
Query: the other half of pbmc4k, as a Cell Ranger v3 H5 (not in the reference).
"""
from __future__ import annotations

import argparse
import gzip
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dask_annot import align, h5, sources
from dask_annot.build import build_reference
from dask_annot.errors import ConfigError, InputFormatError
from dask_annot.reference import read_artifact

from .conftest import FORMATS, shared_path

ad = pytest.importorskip("anndata")

GRCH38 = FORMATS / "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5"
SORTED_CL = {"B": "CL:0000236", "CD4TCM": "CL:0000897", "CD4TN": "CL:0000895", "CD4Treg": "CL:0000792",
             "CD8TN": "CL:0000900", "Monocyte": "CL:0001054", "NK": "CL:0000623"}
PBMC4K_CL = {"T_CD4": "CL:0000624", "T_CD8": "CL:0000625", "B": "CL:0000236", "NK": "CL:0000623", "MNP": "CL:0000576",
             "?": "unknown"}
PBMC4K_DATASET = "pbmc4k-10x-half-a"
SORTED_FILE = "zheng2017-sorted.h5ad"
NOT_PRIMARY = 40  # pbmc4k cells marked is_primary_data == False (the filter drops them)


def _with_ids(path):
    """Counts, barcodes, Ensembl ids and symbols of a real h5ad, keeping the genes the GRCh38 table names once."""
    info = h5.open_matrix(path)
    t = h5.open_matrix(GRCH38)
    ids = align.ensembl_ids_for_symbols(info.feature_names, table_ids=t.feature_ids, table_names=t.feature_names)
    ok = np.flatnonzero(ids != "")
    X = h5.read_cells(info, 0, info.n_cells)
    return X[:, ok], info.barcodes, ids[ok], np.asarray(info.feature_names)[ok]


def _cellxgene_h5ad(X, barcodes, ids, names, labels, *, path, obs_extra=None, uns=None):
    lib = np.asarray(X.sum(axis=1)).ravel()
    norm = sp.csr_matrix(sp.diags(1e4 / np.maximum(lib, 1)) @ X.astype(np.float32))
    norm.data = np.log1p(norm.data)
    var = pd.DataFrame({"feature_name": list(names)}, index=pd.Index(list(ids)))
    obs = pd.DataFrame({"cell_type_ontology_term_id": pd.Categorical(labels), "tissue_general": "blood",
                        **(obs_extra or {})}, index=pd.Index(list(barcodes)))
    a = ad.AnnData(X=norm.astype(np.float32), obs=obs, var=var, uns=uns or {})
    a.raw = ad.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    a.write_h5ad(path)
    return a


@pytest.fixture(scope="module")
def cxg(tmp_path_factory):
    d = tmp_path_factory.mktemp("cxg")
    Xs, bs, ids_s, names_s = _with_ids(shared_path("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"))
    obs_s = ad.read_h5ad(shared_path("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"), backed="r").obs
    lab_s = np.array([SORTED_CL[x] for x in obs_s["trueLabel"].astype(str)], dtype=object)
    Xp, bp, ids_p, names_p = _with_ids(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad"))
    obs_p = ad.read_h5ad(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad"), backed="r").obs
    lab_p = np.array([PBMC4K_CL[x] for x in obs_p["Annotation"].astype(str)], dtype=object)
    half = Xp.shape[0] // 2
    primary = np.ones(half, dtype=bool)
    primary[np.random.default_rng(7).choice(half, NOT_PRIMARY, replace=False)] = False
    f_sorted = d / SORTED_FILE
    a_s = _cellxgene_h5ad(Xs, bs, ids_s, names_s, lab_s, path=f_sorted, obs_extra={"is_primary_data": np.ones(len(bs), bool)})
    f_4k = d / "pbmc4k_a.h5ad"
    a_p = _cellxgene_h5ad(Xp[:half], [f"{b}-1" for b in bp[:half]], ids_p, names_p, lab_p[:half], path=f_4k,
                          obs_extra={"is_primary_data": primary}, uns={"dataset_id": PBMC4K_DATASET})
    # the query: the other half of pbmc4k as Cell Ranger writes it
    query = d / "pbmc4k_b.h5"
    h5.write_10x_h5(query, Xp[half:], barcodes=[f"{b}-1" for b in bp[half:]], feature_ids=ids_p, feature_names=names_p, genome="GRCh38")
    # the same cells, as one table: the union of genes in order of first appearance, datasets in file order
    uni_ids = list(dict.fromkeys([*ids_s, *ids_p]))
    pos = {g: i for i, g in enumerate(uni_ids)}
    names = dict(zip(ids_s, names_s)) | {g: n for g, n in zip(ids_p, names_p) if g not in set(ids_s)}

    def onto_union(X, ids):
        cols = np.array([pos[g] for g in ids])
        return sp.csr_matrix(X @ sp.csr_matrix((np.ones(cols.size), (np.arange(cols.size), cols)), shape=(cols.size, len(uni_ids))))

    Xall = sp.vstack([onto_union(Xs, ids_s), onto_union(Xp[:half], ids_p)]).tocsr()
    obs_all = pd.DataFrame({
        "cell_type_ontology_term_id": np.concatenate([lab_s, lab_p[:half]]),
        "dataset_id": [SORTED_FILE.removesuffix(".h5ad")] * len(bs) + [PBMC4K_DATASET] * half,
        "is_primary_data": np.concatenate([np.ones(len(bs), bool), primary]),
        "hand_label": np.concatenate([obs_s["trueLabel"].astype(str), obs_p["Annotation"].astype(str)[:half]]),
    }, index=pd.Index([*bs, *(f"{b}-1" for b in bp[:half])]))
    var_all = pd.DataFrame({"feature_id": uni_ids, "feature_name": [names[g] for g in uni_ids]}, index=pd.Index(uni_ids))
    return dict(dir=d, files=[f_sorted, f_4k], query=query, X=Xall, obs=obs_all, var=var_all, n_sorted=len(bs), half=half)


@pytest.fixture(scope="module")
def soma_uri(cxg):
    """A Census-shaped local SOMA store: census_data/homo_sapiens with X['raw'] and census_info/summary."""
    soma = pytest.importorskip("tiledbsoma")
    import pyarrow as pa
    import tiledbsoma.io

    uri = str(cxg["dir"] / "census")
    obs = cxg["obs"].drop(columns=["hand_label"]).copy()
    obs["cell_type_ontology_term_id"] = obs["cell_type_ontology_term_id"].astype(str)
    a = ad.AnnData(X=cxg["X"].astype(np.float32), obs=obs, var=cxg["var"])
    with soma.Collection.create(uri) as root:
        root.add_new_collection("census_data")
        info = root.add_new_collection("census_info")
        schema = pa.schema([("label", pa.large_string()), ("value", pa.large_string())])
        summ = info.add_new_dataframe("summary", schema=schema, index_column_names=["soma_joinid"], domain=[(0, 1)])
        summ.write(pa.table({"soma_joinid": pa.array([0, 1], pa.int64()), "label": ["census_schema_version", "census_build_date"],
                             "value": ["test", "2026-12-07"]}))
    exp_uri = f"{uri}/census_data/homo_sapiens"
    tiledbsoma.io.from_anndata(exp_uri, a, measurement_name="RNA", X_layer_name="raw")
    with soma.Collection.open(f"{uri}/census_data", "w") as cd, soma.Experiment.open(exp_uri) as exp:
        cd.set("homo_sapiens", exp, use_relative_uri=True)
    return uri


def _arrays(path):
    return read_artifact(path)[1]


def _build(tmp, name, cells=None, **kw):
    return build_reference(None, label_column=sources.LABEL_COLUMN, name="cxg", output=tmp / name, cells=cells, **kw)


# ------------------------------------------------------------------ selection kernel

def test_select_cells_drops_small_classes_and_subsamples_by_dataset():
    labels = np.array(["CL:0000236"] * 100 + ["CL:0000623"] * 30 + ["CL:0000576"] * 4 + ["unknown"] * 9, dtype=object)
    datasets = np.array(["a"] * 75 + ["b"] * 25 + ["a"] * 30 + ["b"] * 4 + ["a"] * 9, dtype=object)
    keep, rep = sources.select_cells(labels, datasets, max_cells_per_type=20, min_cells_per_type=5, seed=3)
    assert rep["dropped_types"] == {"CL:0000576": 4} and rep["n_not_cell_ontology"] == 9
    assert keep[:75].sum() == 15 and keep[75:100].sum() == 5          # 20 split 3:1 like the datasets
    assert keep[100:130].sum() == 20 and not keep[130:].any()
    # seeded; a class's draw does not depend on the other classes
    others = labels.copy()
    others[100:130] = "CL:0000084"
    assert np.array_equal(keep[:100], sources.select_cells(others, datasets, max_cells_per_type=20, min_cells_per_type=5, seed=3)[0][:100])
    assert not np.array_equal(keep, sources.select_cells(labels, datasets, max_cells_per_type=20, min_cells_per_type=5, seed=4)[0])
    assert np.array_equal(keep, sources.select_cells(labels, datasets, max_cells_per_type=20, min_cells_per_type=5, seed=3)[0])


def test_detects_the_cellxgene_schema(cxg, tmp_path):
    assert all(sources.is_cellxgene_h5ad(f) for f in cxg["files"])
    plain = tmp_path / "plain.h5ad"
    ad.AnnData(X=cxg["X"][:20].astype(np.float32), var=pd.DataFrame(index=cxg["var"]["feature_name"].to_numpy())).write_h5ad(plain)
    assert not sources.is_cellxgene_h5ad(plain)
    with pytest.raises(InputFormatError, match="not a CELLxGENE-schema"):
        sources.open_cellxgene_files([cxg["files"][0], plain])


# ------------------------------------------------------------------ acceptance

@pytest.fixture(scope="module")
def refs(cxg, soma_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("refs")
    files = sources.open_cellxgene_files(cxg["files"], obs_filter="is_primary_data == True")
    census = sources.open_census("is_primary_data == True", organism="homo_sapiens", census_uri=soma_uri)
    # today's way: one h5ad with the source labels and a hand-written ontology map
    obs = cxg["obs"]
    hand = ad.AnnData(X=cxg["X"].astype(np.int32), obs=obs[["hand_label", "dataset_id", "is_primary_data"]].copy(),
                      var=pd.DataFrame({"gene_ids": cxg["var"]["feature_id"].to_numpy()}, index=cxg["var"]["feature_name"].to_numpy()))
    hand.var_names_make_unique()
    hand = hand[(obs["is_primary_data"] & (obs["hand_label"] != "?")).to_numpy()].copy()
    hand.write_h5ad(out / "hand.h5ad")
    omap = out / "map.csv"
    pd.DataFrame({"label": [*SORTED_CL, *(k for k in PBMC4K_CL if k != "?")],
                  "ontology_id": [*SORTED_CL.values(), *(v for k, v in PBMC4K_CL.items() if k != "?")]}).to_csv(omap, index=False)
    return dict(
        files=_build(out, "files", files), census=_build(out, "census", census), files_cells=files, census_cells=census,
        hand=build_reference(out / "hand.h5ad", label_column="hand_label", dataset_column="dataset_id", name="cxg",
                             output=out / "hand", ontology_map=omap),
    )


def test_census_build_equals_h5ad_build(refs):
    a, b = _arrays(refs["files"]), _arrays(refs["census"])
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma, mb = read_artifact(refs["files"])[0], read_artifact(refs["census"])[0]
    assert ma["labels"] == mb["labels"] and ma["datasets"] == mb["datasets"] == sorted([SORTED_FILE.removesuffix(".h5ad"), PBMC4K_DATASET])


@pytest.mark.parametrize("where", ["local_cluster", "threads"])
def test_census_read_in_dask_slices_equals_the_serial_h5ad_build(cxg, soma_uri, tmp_path, request, where):
    """The Census is read by Dask tasks, one per slice of soma_joinids (here 7 slices of at most
    700 cells; per-type subsampling, so the slices' kept cells are not contiguous), on a real
    2-worker LocalCluster or 2 threads; the reference is the one the files give read here in turn."""
    import dask

    kw = dict(max_cells_per_type=300, min_cells_per_type=10)
    files = sources.open_cellxgene_files(cxg["files"], **kw)
    serial = _build(tmp_path, "files", files, cells_per_block=700)
    census = sources.open_census("", organism="homo_sapiens", census_uri=soma_uri, **kw)
    assert np.array_equal(census.keep, files.keep) and census.keep.sum() < census.keep.size
    if where == "local_cluster":
        from distributed import get_task_stream

        client = request.getfixturevalue("local_cluster_client")
        with get_task_stream(client) as ts:
            parallel = _build(tmp_path, "census", census, cells_per_block=700)
        slices = [t for t in ts.data if t["key"].startswith("_census_slice_task")]
        # three passes plus confidence's two reads, 7 slices each, on both workers
        assert len(slices) == 5 * 7 and len({t["worker"] for t in slices}) == 2
    else:
        with dask.config.set(scheduler="threads", num_workers=2):
            parallel = _build(tmp_path, "census", census, cells_per_block=700)
    a, b = _arrays(serial), _arrays(parallel)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_embedding_product_does_not_depend_on_the_blas_threads():
    """A Dask worker runs BLAS on one thread (the nanny's OPENBLAS_NUM_THREADS=1), the driver on
    all cores; OpenBLAS splits ``z @ w`` differently over threads, so the kernel pins one thread."""
    from threadpoolctl import threadpool_limits

    from dask_annot import build
    from dask_annot.normalize import mean_var

    info = h5.open_matrix(shared_path("data", "pbmc_sorted_zheng2017", "pbmc_sorted_3500.h5ad"))
    X = h5.read_cells(info, 0, info.n_cells)
    s1, s2, nexpr, n = build._block_moments(X, 1e4)
    mean, var = mean_var(s1, s2, n)
    hvg = build.select_hvg(mean, var, nexpr, 1000)
    w = np.random.default_rng(0).standard_normal((hvg.size, 30))
    z = build._block_zscores(X, hvg, mean[hvg], np.sqrt(var[hvg]), 1e4, 10.0)
    with threadpool_limits(limits=1, user_api="blas"):
        one = build.project_one_thread(z, w)
    with threadpool_limits(limits=2, user_api="blas"):
        two = build.project_one_thread(z, w)
    np.testing.assert_array_equal(one, two)  # float64: the float32 embedding would hide most differences


def test_command_line_census_build_on_a_chosen_scheduler(refs, soma_uri, tmp_path):
    from dask_annot.cli import main

    out = tmp_path / "cli"
    assert main(["build-reference", "--census", "is_primary_data == True", "--census-uri", soma_uri, "--name", "cxg",
                 "--output", str(out), "--scheduler", "threads", "--n-workers", "2"]) == 0
    a, b = _arrays(refs["census"]), _arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_reference_records_sources_filter_datasets_and_counts(refs, cxg):
    meta = read_artifact(refs["census"])[0]
    src = meta["source"]
    assert src["kind"] == "census" and src["census_filter"] == "is_primary_data == True"
    assert src["census_schema_version"] == "test" and src["census_uri"].endswith("census")
    n_ref = cxg["n_sorted"] + cxg["half"] - NOT_PRIMARY - int((cxg["obs"]["hand_label"] == "?").sum())
    assert sum(src["datasets"].values()) == meta["n_cells"] == n_ref
    f = read_artifact(refs["files"])[0]["source"]
    assert [x["file"] for x in f["files"]] == [SORTED_FILE, "pbmc4k_a.h5ad"] and f["obs_filter"] == "is_primary_data == True"
    assert [x["dataset_id_from"] for x in f["files"]] == ["file name", "uns"] and [x["counts"] for x in f["files"]] == ["raw/X"] * 2
    assert f["selection"]["n_filtered_out"] == NOT_PRIMARY and f["selection"]["n_not_cell_ontology"] > 0


def test_same_arrays_as_the_hand_mapped_reference_of_the_same_cells(refs):
    a, h = _arrays(refs["files"]), _arrays(refs["hand"])
    for k in ("embedding", "loadings", "label_codes", "dataset_codes", "hvg_index", "mean", "std"):
        np.testing.assert_array_equal(a[k], h[k], err_msg=k)
    assert read_artifact(refs["files"])[0]["labels"] == read_artifact(refs["hand"])[0]["labels"]


def test_annotating_pbmc4k_gives_the_hand_mapped_labels_and_lists_dataset_ids(refs, cxg, tmp_path):
    from dask_annot import config, pipeline

    settings = config.resolve(scheduler="threads", n_workers=1)
    res = {}
    for name in ("files", "hand"):
        r = pipeline.run(name, cxg["query"], models=[str(refs[name])], output_dir=tmp_path, settings=settings, log=lambda m: None,
                         progress=False)[0]
        res[name] = r.model_dir
    a = pd.read_csv(res["files"] / "cell_types.csv")
    b = pd.read_csv(res["hand"] / "cell_types.csv")
    pd.testing.assert_frame_equal(a, b)
    # in-sample check that the labels mean something: pbmc4k's own labels of the query half
    truth = ad.read_h5ad(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad"), backed="r").obs["Annotation"].astype(str)[cxg["half"]:]
    coarse = {"T_CD4": "T cell", "T_CD8": "T cell", "B": "B cell", "NK": "natural killer cell", "MNP": "monocyte"}
    ok = truth.to_numpy() != "?"
    acc = np.mean(a["coarse_cell_type_unfiltered"].to_numpy()[ok] == np.array([coarse[t] for t in truth.to_numpy()[ok]]))
    assert acc > 0.8, acc
    with gzip.open(res["files"] / "cell_annotation_results.json.gz", "rt") as fh:
        ev = json.load(fh)
    ds = {d["dataset_id"] for c in ev for m in c["matches"] for d in m["dataset_ids_with_counts"]}
    assert ds == {SORTED_FILE.removesuffix(".h5ad"), PBMC4K_DATASET}


def test_labels_mapping_to_one_term_are_not_merged_silently(refs, tmp_path):
    src = refs["hand"].parent / "hand.h5ad"
    omap = tmp_path / "map.csv"
    # pbmc4k's mononuclear phagocytes mapped to the sorted data's CD14+ monocyte term
    pd.DataFrame({"label": [*SORTED_CL, "T_CD4", "T_CD8", "MNP"],
                  "ontology_id": [*SORTED_CL.values(), "CL:0000624", "CL:0000625", "CL:0001054"]}).to_csv(omap, index=False)
    with pytest.raises(ConfigError, match=r"'MNP', 'Monocyte' map to the same Cell Ontology term \('CD14-positive monocyte'\).*--merge-same-term"):
        build_reference(src, label_column="hand_label", name="x", output=tmp_path / "x", ontology_map=omap)
    assert not (tmp_path / "x").exists()


def _cli_args(**kw):
    base = dict(input=None, census=None, census_uri=None, census_version=None, organism="homo_sapiens", obs_filter=None,
                max_cells_per_type=None, min_cells_per_type=None, label_column=None, seed=0, ontology_map=None)
    return argparse.Namespace(**(base | kw))


def test_max_cells_per_type_and_dropped_types_through_the_census(soma_uri):
    cells = sources.open_reference_input(_cli_args(census="", census_uri=soma_uri, max_cells_per_type=100,
                                                   min_cells_per_type=300), log=lambda m: None)
    sel = cells.provenance["selection"]
    kept = pd.Series(cells.labels[cells.keep]).value_counts()
    assert (kept == 100).all() and sel["n_subsampled_out"] > 0
    assert set(sel["dropped_types"]) and all(v < 300 for v in sel["dropped_types"].values())
    assert not set(sel["dropped_types"]) & set(kept.index)


def test_command_line_errors_are_one_clear_line(cxg, soma_uri):
    with pytest.raises(ConfigError, match="--census and --input both given"):
        sources.open_reference_input(_cli_args(input=[str(cxg["files"][0])], census=""))
    with pytest.raises(ConfigError, match="cannot be evaluated"):
        sources.open_cellxgene_files(cxg["files"], obs_filter="no_such_column == 1")
    with pytest.raises(ConfigError, match="no experiment for --organism mus_musculus; it has homo_sapiens"):
        sources.open_census("", organism="mus_musculus", census_uri=soma_uri)
