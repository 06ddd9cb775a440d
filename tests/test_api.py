"""The notebook API: the same labels as the command line, from a path or an AnnData, on threads or a real LocalCluster."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import dask_annot
from dask_annot import api, build, config, pipeline, reference
from dask_annot.cli import example_path
from dask_annot.errors import ConfigError, InputFormatError
from dask_annot.summary import read_cell_types


def _example_adata():
    """The bundled example as an AnnData with raw counts (symbols as var_names, ids in var)."""
    import anndata

    from dask_annot import h5

    info = h5.open_matrix(example_path())
    X = h5.read_cells(info, 0, info.n_cells)
    var = pd.DataFrame({"gene_ids": np.asarray(info.feature_ids, dtype=str)}, index=pd.Index(np.asarray(info.feature_names, dtype=str)))
    var.index = pd.Index(anndata.utils.make_index_unique(var.index.to_series()).to_numpy())
    return anndata.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(np.asarray(info.barcodes, dtype=str))), var=var)


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    """What `dask-annot annotate --matrix example` writes (through the pipeline it calls)."""
    out = tmp_path_factory.mktemp("cli")
    res = pipeline.annotate("ex", example_path(), output_dir=out, settings=config.resolve(), log=lambda m: None)
    return read_cell_types(res.model_dir / "cell_types.csv").set_index("barcode")


@pytest.fixture(scope="module")
def from_path():
    return dask_annot.annotate(str(example_path()), quiet=True)


def test_import_stays_cheap():
    code = ("import sys, dask_annot; heavy = [m for m in ('dask', 'numpy', 'pandas', 'anndata', 'distributed', 'scipy') if m in sys.modules];"
            "print(','.join(heavy)); dask_annot.annotate; print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == ""  # nothing heavy at import
    assert out[1] == "True"  # the API loads on first use
    assert dask_annot.__version__
    assert set(dask_annot.__all__) >= {"annotate", "add_to_anndata", "build_reference", "write_loupe_csv"}


def test_path_gives_the_command_line_labels(from_path, cli_result):
    pd.testing.assert_frame_equal(from_path[cli_result.columns], cli_result)
    assert from_path.index.name == "barcode"
    assert list(from_path.columns) == ["coarse_cell_type", "fine_cell_type", "cell_count_in_model", "coarse_cell_type_unfiltered", "umi_count",
                                       "final_level_softmax_prob", "rejected"]  # the last two: issue 11
    assert (from_path["rejected"] == (from_path["fine_cell_type"] == "Unassigned")).all()
    assert from_path["final_level_softmax_prob"].between(0, 1).all()
    meta = from_path.attrs["dask_annot"]
    assert meta["model_dir"] is None  # outputs were in a temporary directory, now gone
    assert meta["run"]["reference"]["name"] == "human_pbmc_v1"
    emb = meta["embedding2d"]
    assert emb.shape == (len(from_path), 2) and emb.dtype == np.float32 and np.isfinite(emb).all()


def test_embedding_separates_the_types(from_path):
    emb = from_path.attrs["dask_annot"]["embedding2d"]
    coarse = from_path["coarse_cell_type"].to_numpy()
    centroids = {t: emb[coarse == t].mean(axis=0) for t in np.unique(coarse)}
    spread = np.median(np.linalg.norm(emb - emb.mean(axis=0), axis=1))
    # T cells and monocytes sit far apart on the first two reference PCs
    assert np.linalg.norm(centroids["T cell"] - centroids["monocyte"]) > spread


def test_anndata_gives_the_same_labels_and_lands_in_obs(from_path, tmp_path):
    adata = _example_adata()
    df = dask_annot.annotate(adata, output_dir=tmp_path, run_id="nb", quiet=True)
    pd.testing.assert_frame_equal(df, from_path)
    np.testing.assert_array_equal(df.attrs["dask_annot"]["embedding2d"], from_path.attrs["dask_annot"]["embedding2d"])
    model_dir = tmp_path / "nb" / "outs" / "segmented_outs" / "cell_types" / "human_pbmc_v1"
    assert df.attrs["dask_annot"]["model_dir"] == str(model_dir)
    assert (model_dir / "cell_types.csv").is_file() and (model_dir / "run.json").is_file()

    # add_to_anndata matches by barcode: shuffle the cells first
    order = np.random.default_rng(0).permutation(adata.n_obs)
    shuffled = adata[order].copy()
    dask_annot.add_to_anndata(shuffled, df)
    for col in ("coarse_cell_type", "fine_cell_type", "coarse_cell_type_unfiltered"):
        assert isinstance(shuffled.obs[col].dtype, pd.CategoricalDtype)
        np.testing.assert_array_equal(shuffled.obs[col].astype(str).to_numpy(), df.loc[shuffled.obs_names, col].to_numpy())
    np.testing.assert_array_equal(shuffled.obs["umi_count"].to_numpy(), df.loc[shuffled.obs_names, "umi_count"].to_numpy())
    assert shuffled.obs["cell_count_in_model"].dtype.kind == "i"
    emb = df.attrs["dask_annot"]["embedding2d"]
    np.testing.assert_array_equal(shuffled.obsm["X_dask_annot_pca"], emb[order])

    # a prefix keeps a second model's labels apart; an explicit embedding wins
    dask_annot.add_to_anndata(shuffled, df, key_prefix="ref2_", embedding=np.zeros((len(df), 2)))
    assert "ref2_fine_cell_type" in shuffled.obs and (shuffled.obsm["X_ref2_dask_annot_pca"] == 0).all()


def test_add_to_anndata_refuses_cells_without_a_row(from_path):
    adata = _example_adata()
    with pytest.raises(InputFormatError, match="1 of the AnnData's 800 cells have no row"):
        dask_annot.add_to_anndata(adata, from_path.iloc[1:])


def test_normalized_x_is_refused_and_layer_used(from_path):
    adata = _example_adata()
    adata.layers["counts"] = adata.X.copy()
    X = adata.X.astype(np.float32)
    X.data = np.log1p(X.data)
    adata.X = X
    with pytest.raises(InputFormatError, match="layer="):
        dask_annot.annotate(adata, quiet=True)
    with pytest.raises(ConfigError, match="no layer 'raw'"):
        dask_annot.annotate(adata, layer="raw", quiet=True)
    df = dask_annot.annotate(adata, layer="counts", quiet=True)
    pd.testing.assert_frame_equal(df, from_path)


def test_hierarchical_layout_and_k(tmp_path):
    df = dask_annot.annotate("example", layout="hierarchical", k=15, quiet=True)
    assert list(df.columns) == ["broad_cell_type", "coarse_cell_type", "fine_cell_type", "full_hierarchical_labels",
                                "final_level_softmax_prob", "coarse_cell_type_unfiltered", "umi_count", "rejected"]
    assert df.attrs["dask_annot"]["run"]["parameters"]["k_used"] == 15
    # the small-reference rule is keyed on the reference (3,500 cells), not on --k (issue 13.3)
    assert df.attrs["dask_annot"]["run"]["parameters"]["vote"].startswith("class-balanced")
    assert df.attrs["dask_annot"]["run"]["parameters"]["consensus"]["applied"] is True
    assert df["final_level_softmax_prob"].between(0, 1).all()


def test_existing_client_gives_the_same_result(local_cluster_client, from_path):
    """A real LocalCluster Client: the pipeline runs on it, with the same labels and embedding."""
    from distributed import get_task_stream

    client = local_cluster_client
    with get_task_stream(client) as stream:
        df = dask_annot.annotate(str(example_path()), client=client, quiet=True)
    pd.testing.assert_frame_equal(df, from_path)
    np.testing.assert_array_equal(df.attrs["dask_annot"]["embedding2d"], from_path.attrs["dask_annot"]["embedding2d"])
    assert len(stream.data) > 0  # the work ran on the cluster's workers
    assert client.status == "running"  # and the user's client is still usable


def test_build_reference_is_the_reference_builder():
    assert dask_annot.build_reference is build.build_reference
    assert api.example_path() == example_path()


def test_write_loupe_csv(from_path, tmp_path):
    out = dask_annot.write_loupe_csv(from_path, tmp_path / "loupe.csv", column="fine_cell_type", group_name="dask-annot fine")
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(back.columns) == ["barcode", "dask-annot fine"]
    np.testing.assert_array_equal(back["barcode"], from_path.index)
    np.testing.assert_array_equal(back["dask-annot fine"], from_path["fine_cell_type"])
    assert '"CD4-positive, alpha-beta memory T cell"' in out.read_text()  # commas in labels are quoted
    with pytest.raises(ConfigError, match="no column 'nope'"):
        dask_annot.write_loupe_csv(from_path, tmp_path / "x.csv", column="nope")


def test_write_loupe_csv_from_files(tmp_path):
    res = pipeline.annotate("l", example_path(), output_dir=tmp_path, settings=config.resolve(), log=lambda m: None)
    a = dask_annot.write_loupe_csv(res.model_dir, tmp_path / "a.csv")
    b = dask_annot.write_loupe_csv(res.model_dir / "cell_types.csv", tmp_path / "b.csv")
    assert a.read_text() == b.read_text()
    assert a.read_text().startswith("barcode,coarse_cell_type\n")
    assert len(a.read_text().splitlines()) == 801


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ConfigError, match="AnnData or a path"):
        dask_annot.annotate(42)
    with pytest.raises(ConfigError, match="layer= applies to an AnnData"):
        dask_annot.annotate("example", layer="counts")


def test_dask_config_set_reaches_the_settings_and_the_api():
    """Issue 13 item 8: dask.config.refresh() used to wipe a user's dask.config.set, and the API
    passed k/layout/consensus explicitly, so configuration never reached Python callers."""
    import dask

    with dask.config.set({"annot.k": 40, "annot.layout": "hierarchical"}):
        s = config.resolve()
        assert (s.k, s.layout) == (40, "hierarchical")
        assert config.resolve(k=7).k == 7  # a flag still wins
        df = dask_annot.annotate("example", quiet=True)
    assert "final_level_softmax_prob" in df.columns
    assert df.attrs["dask_annot"]["run"]["parameters"]["k_requested"] == 40


def test_environment_variables_set_after_import_count(monkeypatch):
    monkeypatch.setenv("DASK_ANNOT__CHUNK_CELLS", "123")
    assert config.resolve().chunk_cells == 123
