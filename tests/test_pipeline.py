"""The annotate pipeline end to end on real data, on real schedulers (layers 2, 3, 5)."""
from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_annot import config, h5, pipeline
from dask_annot.cli import example_path, main
from dask_annot.outputs import CLOUD_COLUMNS, HIERARCHICAL_COLUMNS, LOW_UMI

from .conftest import shared_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dask_annot", *args], capture_output=True, text=True, timeout=600)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def annotate_dir(tmp: Path, run_id: str = "t", **flags) -> Path:
    s = config.resolve(**{k: v for k, v in flags.items() if k != "matrix" and k != "model"})
    res = pipeline.annotate(run_id, flags.get("matrix", example_path()), model=flags.get("model", "auto"),
                            output_dir=tmp, settings=s, log=lambda m: None)
    return res.model_dir


@pytest.fixture(scope="module")
def threaded_run(tmp_path_factory) -> Path:
    return annotate_dir(tmp_path_factory.mktemp("threads"), scheduler="threads")


def test_cli_writes_the_10x_layout(tmp_path):
    r = run_cli("annotate", "--id", "demo", "--matrix", str(example_path()), "--output-dir", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    mdir = tmp_path / "demo" / "outs" / "segmented_outs" / "cell_types" / "human_pbmc_v1"
    # no model named: the kNN auto model and the species' marker model, each in its own folder (as Space Ranger
    # writes 10x_Cloud/ and Azimuth/)
    assert [Path(x) for x in r.stdout.split()] == [mdir, mdir.parent / "pan_human_v1"]
    pan = mdir.parent / "pan_human_v1"
    assert {p.name for p in pan.iterdir()} == {"cell_types.csv", "cell_annotation_differential_expression.csv", "run.json", "web_summary.html"}
    assert read_rows(pan / "cell_types.csv")[0].keys() == set(HIERARCHICAL_COLUMNS)
    assert json.loads((pan / "run.json").read_text())["reference"]["kind"] == "markers"
    assert {p.name for p in mdir.iterdir()} >= {
        "cell_types.csv", "cell_annotation_results.json.gz", "cell_annotation_differential_expression.csv", "run.json"}
    rows = read_rows(mdir / "cell_types.csv")
    assert list(rows[0]) == CLOUD_COLUMNS
    info = h5.open_matrix(example_path())
    assert [r["barcode"] for r in rows] == list(info.barcodes)  # matrix order
    umi = np.asarray(h5.read_cells(info, 0, info.n_cells).sum(axis=1)).ravel()
    assert [int(r["umi_count"]) for r in rows] == umi.tolist()
    record = json.loads((mdir / "run.json").read_text())
    assert record["complete"] and record["cells"] == 800
    assert record["parameters"]["k_requested"] == 500 and record["parameters"]["k_used"] == 35
    assert record["reference"]["name"] == "human_pbmc_v1"
    assert record["parameters"]["knn_method"] == "exact"
    matches = json.loads(gzip.decompress((mdir / "cell_annotation_results.json.gz").read_bytes()))
    assert [m["barcode"] for m in matches] == list(info.barcodes)
    for row, m in zip(rows, matches):
        top = m["matches"][0]
        counts = [x["cell_count_in_model"] for x in m["matches"]]
        assert counts == sorted(counts, reverse=True) and sum(counts) == 35
        assert sum(d["count_per_dataset"] for d in top["dataset_ids_with_counts"]) == top["cell_count_in_model"]
        # the raw count of reference neighbours carrying the final label: 0 when the small-reference
        # consensus took the label from the cell's query neighbours
        assert int(row["cell_count_in_model"]) == next((x["cell_count_in_model"] for x in m["matches"] if x["cell_type"] == row["fine_cell_type"]), 0)
    assert record["parameters"]["consensus"]["applied"] is True


def test_labels_are_sensible_on_real_pbmc(threaded_run):
    """The example is 800 real pbmc4k cells; SoupX's labels are the truth at the coarse level."""
    import anndata

    truth = anndata.read_h5ad(shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")).obs["Annotation"]
    truth.index = [f"{b}-1" for b in truth.index]
    expect = {"B": "B cell", "MNP": "monocyte", "NK": "natural killer cell", "T_CD4": "T cell", "T_CD8": "T cell"}
    rows = [r for r in read_rows(threaded_run / "cell_types.csv") if truth[r["barcode"]] in expect]
    acc = np.mean([r["coarse_cell_type"] == expect[truth[r["barcode"]]] for r in rows])
    assert acc > 0.9


def test_local_cluster_gives_byte_identical_outputs(threaded_run, tmp_path, local_cluster_client):
    mdir = annotate_dir(tmp_path, scheduler=local_cluster_client.scheduler.address)
    for name in ("cell_types.csv", "cell_annotation_differential_expression.csv"):
        assert (mdir / name).read_bytes() == (threaded_run / name).read_bytes(), name
    assert gzip.decompress((mdir / "cell_annotation_results.json.gz").read_bytes()) == gzip.decompress(
        (threaded_run / "cell_annotation_results.json.gz").read_bytes())


def test_processes_scheduler_gives_byte_identical_outputs(threaded_run, tmp_path):
    mdir = annotate_dir(tmp_path, scheduler="processes", n_workers=2)
    assert (mdir / "cell_types.csv").read_bytes() == (threaded_run / "cell_types.csv").read_bytes()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(min_value=1, max_value=900))
def test_chunk_size_does_not_change_labels(threaded_run, tmp_path_factory, chunk):
    mdir = annotate_dir(tmp_path_factory.mktemp("chunk"), chunk_cells=chunk, layout="cloud")
    assert (mdir / "cell_types.csv").read_bytes() == (threaded_run / "cell_types.csv").read_bytes()
    assert gzip.decompress((mdir / "cell_annotation_results.json.gz").read_bytes()) == gzip.decompress(
        (threaded_run / "cell_annotation_results.json.gz").read_bytes())


def test_store_is_reused_on_a_second_run(tmp_path):
    annotate_dir(tmp_path)
    record = json.loads(next(tmp_path.glob("t/outs/segmented_outs/cell_types/*/run.json")).read_text())
    assert record["input"]["store_reused"] is False
    annotate_dir(tmp_path)
    record = json.loads(next(tmp_path.glob("t/outs/segmented_outs/cell_types/*/run.json")).read_text())
    assert record["input"]["store_reused"] is True and "convert" in record["timings_s"]


def test_low_umi_cells_keep_fine_and_unfiltered_labels(tmp_path, rng):
    info = h5.open_matrix(example_path())
    X = h5.read_cells(info, 0, info.n_cells).tolil()
    low = np.arange(0, 800, 40)
    for i in low:  # thin 20 real cells down to fewer than 100 UMIs
        row = X.getrow(i).toarray().ravel()
        keep = rng.binomial(row, min(1.0, 60 / row.sum()))
        X[i] = keep
    path = tmp_path / "low.h5"
    h5.write_10x_h5(path, sp.csr_matrix(X), barcodes=info.barcodes, feature_ids=info.feature_ids, feature_names=info.feature_names)
    mdir = annotate_dir(tmp_path, matrix=path, layout="hierarchical")
    rows = read_rows(mdir / "cell_types.csv")
    assert list(rows[0]) == HIERARCHICAL_COLUMNS
    for i, r in enumerate(rows):
        if int(r["umi_count"]) < 100:
            assert i in set(low)
            assert r["coarse_cell_type"] == LOW_UMI and r["broad_cell_type"] == LOW_UMI
            assert r["coarse_cell_type_unfiltered"] not in ("", LOW_UMI) and r["fine_cell_type"] != LOW_UMI
        else:
            assert r["coarse_cell_type"] == r["coarse_cell_type_unfiltered"] != LOW_UMI
        assert r["full_hierarchical_labels"].split("|")[-1] == r["fine_cell_type"]
        assert 0 < float(r["final_level_softmax_prob"]) <= 1
    header = (mdir / "cell_annotation_differential_expression.csv").read_text().split("\n", 1)[0]
    assert f"{LOW_UMI} Mean Counts" in header


def test_auto_picks_the_mouse_model_for_mouse_cells(tmp_path):
    src = shared_path("data", "mouse_immune_actinn", "actinn_train_1000cells.h5ad")
    mdir = annotate_dir(tmp_path, matrix=src)
    assert mdir.name == "mouse_immune_v1"
    record = json.loads((mdir / "run.json").read_text())
    assert record["reference"]["gene_overlap_by_model"]["mouse_immune_v1"] > record["reference"]["gene_overlap_by_model"].get("human_pbmc_v1", 0)


def test_build_reference_then_annotate_with_it(tmp_path):
    src = shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")
    maps = Path(__file__).resolve().parent.parent / "dask_annot" / "data" / "maps" / "pbmc4k_soupx.csv"
    assert main(["build-reference", "--input", str(src), "--label-column", "Annotation", "--name", "pbmc4k_ref",
                 "--output", str(tmp_path / "ref"), "--ontology-map", str(maps), "--exclude-label", "?"]) == 0
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert meta["n_cells"] == 2150 and meta["source"]["n_cells_excluded"] == 20
    assert meta["labels"] == sorted(["B cell", "mononuclear phagocyte", "natural killer cell",
                                     "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell"])
    coarse = {lv["fine"]: lv["coarse"] for lv in meta["levels"]}
    assert coarse["CD8-positive, alpha-beta T cell"] == "T cell" and coarse["mononuclear phagocyte"] == "mononuclear phagocyte"
    mdir = annotate_dir(tmp_path / "out", model=str(tmp_path / "ref"))
    assert mdir.name == "pbmc4k_ref"
    assert json.loads((mdir / "run.json").read_text())["parameters"]["k_used"] == 21


def test_several_models_each_write_their_own_folder_from_one_conversion(tmp_path):
    """`--cell-annotation-model A,B`: one store, one folder per model under cell_types/, each a complete run."""
    src = shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")
    maps = Path(__file__).resolve().parent.parent / "dask_annot" / "data" / "maps" / "pbmc4k_soupx.csv"
    ref = tmp_path / "pbmc4k_ref"
    assert main(["build-reference", "--input", str(src), "--label-column", "Annotation", "--name", "pbmc4k_ref",
                 "--output", str(ref), "--ontology-map", str(maps), "--exclude-label", "?"]) == 0
    r = run_cli("annotate", "--id", "two", "--matrix", str(example_path()), "--output-dir", str(tmp_path / "out"), "--quiet",
                "--cell-annotation-model", f"human_pbmc_v1, {ref}")
    assert r.returncode == 0, r.stderr
    base = tmp_path / "out" / "two" / "outs" / "segmented_outs" / "cell_types"
    assert r.stdout.split() == [str(base / "human_pbmc_v1"), str(base / "pbmc4k_ref")]
    assert r.stderr.count("converted to") == 1
    for name in ("human_pbmc_v1", "pbmc4k_ref"):
        record = json.loads((base / name / "run.json").read_text())
        assert record["complete"] and record["reference"]["name"] == name
        assert [row["barcode"] for row in read_rows(base / name / "cell_types.csv")] == list(h5.open_matrix(example_path()).barcodes)
    r = run_cli("annotate", "--id", "dup", "--matrix", str(example_path()), "--output-dir", str(tmp_path / "out"),
                "--cell-annotation-model", "human_pbmc_v1,human_pbmc_v1")
    assert r.returncode == 2 and "names the model 'human_pbmc_v1' twice" in r.stderr
    assert not (tmp_path / "out" / "dup" / "outs").exists()


def test_checkpoints_are_keyed_on_the_code_that_made_them(tmp_path, monkeypatch):
    """Issue 13 item 9: a changed build must never reuse another build's chunk results."""
    annotate_dir(tmp_path, chunk_cells=300)
    chunks = tmp_path / "t" / "work" / "chunks"
    before = {p.name for p in chunks.iterdir()}
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "another-build")
    logs = []
    s = config.resolve(chunk_cells=300)
    pipeline.annotate("t", example_path(), output_dir=tmp_path, settings=s, log=logs.append)
    after = {p.name for p in chunks.iterdir()}
    assert len(after - before) == 1 and not any("resuming" in m for m in logs)
    monkeypatch.undo()
    pipeline.annotate("t", example_path(), output_dir=tmp_path, settings=s, log=logs.append)
    assert any("resuming: 3 of 3 chunks" in m for m in logs)  # the same code finds its own chunks again


def test_de_command_takes_the_bundled_example(tmp_path):
    """Issue 13 item 10: `dask-annot de --matrix example` failed at 0fac772 while annotate accepted it."""
    info = h5.open_matrix(example_path())
    groups = tmp_path / "g.csv"
    groups.write_text("barcode,group\n" + "".join(f"{b},{'A' if i % 2 else 'B'}\n" for i, b in enumerate(info.barcodes)))
    r = run_cli("de", "--matrix", "example", "--groups", str(groups), "--output", str(tmp_path / "de.csv"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "de.csv").read_text().startswith("Feature ID,Feature Name,A Mean Counts,")
