"""Atlas-scale references (issue 15): the reference lives with the workers, not in the graph;
shards; the IVF search. Real LocalCluster, real references."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import cloudpickle
import dask
import numpy as np
import pytest

from dask_annot import config, pipeline, refcache
from dask_annot.cli import example_path
from dask_annot.errors import ReferenceArtifactError
from dask_annot.models import resolve_model
from dask_annot.reference import load_reference


def _pid_and_cells(model) -> tuple[int, int, str]:
    return os.getpid(), model.n_cells, model.path


def test_a_model_pickles_as_a_handle_and_each_worker_loads_it_once(local_cluster_client):
    client = local_cluster_client
    model = resolve_model("human_pbmc_v1")
    blob = pickle.dumps(model)
    assert len(blob) < 1_000 < model.embedding.nbytes  # a path and a digest, not the arrays
    assert model.embedding.tobytes()[:4096] not in blob
    workers = sorted(client.scheduler_info()["workers"])
    futs = [client.submit(_pid_and_cells, model, workers=[w], pure=False) for w in workers for _ in range(3)]
    got = client.gather(futs)
    assert {g[1:] for g in got} == {(model.n_cells, model.path)}
    assert len({g[0] for g in got}) == len(workers)  # really other processes
    loads = client.run(lambda: {str(k): v for k, v in refcache.LOADS.items() if k[1] == model.path})
    for w in workers:
        assert list(loads[w].values()) == [1], loads[w]  # one load per process, whatever the task count


def test_a_reference_changed_on_disk_is_refused_by_a_worker(tmp_path):
    src = resolve_model("human_pbmc_v1").path
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    blob = pickle.dumps(load_reference(ref))
    refcache.clear()
    meta = json.loads((ref / "reference.json").read_text())
    arrays = dict(np.load(ref / "arrays.npz"))
    arrays["embedding"] = arrays["embedding"][::-1].copy()  # a rebuilt reference: other cells
    np.savez_compressed(ref / "arrays.npz", **arrays)
    from dask_annot.store import file_fingerprint

    meta["checksums"]["arrays.npz"] = file_fingerprint(ref / "arrays.npz")["sha256"]
    (ref / "reference.json").write_text(json.dumps(meta))
    with pytest.raises(ReferenceArtifactError, match="changed on disk"):
        pickle.loads(blob)


def test_annotate_graphs_stay_small_on_a_local_cluster(tmp_path, local_cluster_client):
    """No submission carries the reference: distributed's large-graph warning, set to 1 MB
    (the whole model pickles to 0.75 MB), stays silent and run.json records the bytes."""
    model = resolve_model("human_pbmc_v1")
    settings = config.resolve(scheduler=local_cluster_client.scheduler.address, chunk_cells=200)
    with warnings.catch_warnings(record=True) as caught, dask.config.set({"distributed.admin.large-graph-warning-threshold": "1MB"}):
        warnings.simplefilter("always")
        res = pipeline.annotate("g", example_path(), model="human_pbmc_v1", output_dir=tmp_path, settings=settings,
                                log=lambda m: None, client=local_cluster_client)
    assert not [w for w in caught if "large graph" in str(w.message)]
    gb = res.record["graph_bytes"]
    assert 0 < gb["annotate"] < 1_000_000 and 0 < gb["de"] < 1_000_000
    # the recorded size is the graph's, and the graph does not hold the reference embedding
    settings_t = config.resolve(scheduler="threads", chunk_cells=200)
    from dask_annot import store

    st = store.open_store(res.record["input"]["store"])
    al = pipeline.align_to_model(st, model)
    emb = pipeline.embedding(st, model, al, chunk_cells=settings_t.chunk_cells)
    blob = cloudpickle.dumps(dict(emb.__dask_graph__()))
    assert model.embedding.tobytes()[:4096] not in blob
    assert refcache.graph_bytes(emb) == len(blob)


# --------------------------------------------------------------------------------------
# shards and inverted lists on a real reference (the 2,150 labelled pbmc4k cells)
# --------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from dask_annot import knn  # noqa: E402
from dask_annot.cli import main  # noqa: E402

from .conftest import shared_path  # noqa: E402

MAPS = Path(__file__).resolve().parent.parent / "dask_annot" / "data" / "maps" / "pbmc4k_soupx.csv"


def _build(out: Path, *extra: str) -> Path:
    src = shared_path("data", "pbmc4k_soupx", "pbmc4k_2170cells_soupx_labels.h5ad")
    assert main(["build-reference", "--input", str(src), "--label-column", "Annotation", "--name", "pbmc4k_ref",
                 "--output", str(out), "--ontology-map", str(MAPS), "--exclude-label", "?", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refs")
    return {"plain": _build(root / "plain"), "shards4": _build(root / "shards4", "--shard-cells", "600"),
            "ivf": _build(root / "ivf", "--shard-cells", "600", "--ivf-lists", "12", "--ivf-probes", "12")}


def _outputs(mdir: Path) -> dict[str, bytes]:
    import gzip

    return {"cell_types.csv": (mdir / "cell_types.csv").read_bytes(),
            "de": (mdir / "cell_annotation_differential_expression.csv").read_bytes(),
            "json": gzip.decompress((mdir / "cell_annotation_results.json.gz").read_bytes())}


def _annotate(tmp: Path, ref: Path, **flags) -> Path:
    s = config.resolve(**{"scheduler": "threads", **flags})
    return pipeline.annotate("s", example_path(), model=str(ref), output_dir=tmp, settings=s, log=lambda m: None).model_dir


def test_four_shards_give_byte_identical_outputs_to_one(references, tmp_path, local_cluster_client):
    meta = json.loads((references["shards4"] / "reference.json").read_text())
    assert meta["shards"]["bounds"] == [[0, 600], [600, 1200], [1200, 1800], [1800, 2150]]
    model = load_reference(references["shards4"])
    assert [(s.start, s.stop) for s in model.shards] == [tuple(b) for b in meta["shards"]["bounds"]]
    assert isinstance(model.shards[0].embedding_unit, np.memmap)  # memory-mapped, not read into memory
    one = _outputs(_annotate(tmp_path / "one", references["plain"], knn_method="exact", chunk_cells=300))
    four = _annotate(tmp_path / "four", references["shards4"], knn_method="exact", chunk_cells=170)
    assert _outputs(four) == one
    rec = json.loads((four / "run.json").read_text())
    assert rec["parameters"]["shards"] == 4 and rec["parameters"]["knn_method"] == "exact"
    # the same on a real LocalCluster: shards are memory-mapped by each worker process
    dist = _annotate(tmp_path / "dist", references["shards4"], knn_method="exact",
                     scheduler=local_cluster_client.scheduler.address, chunk_cells=250)
    assert _outputs(dist) == one


def test_ivf_probing_every_list_is_the_exact_search_and_fewer_lists_keep_recall(references, rng):
    model = load_reference(references["ivf"])
    assert model.has_ivf and len(model.shards) == 4
    q = model.embedding[rng.integers(0, model.n_cells, 400)] + rng.normal(size=(400, model.n_pcs)).astype(np.float32) * 0.5
    import dask.array as da

    emb = da.from_array(q, chunks=(130, -1))
    exact = knn.neighbors(emb, load_reference(references["plain"]), k=21, method="exact").compute(scheduler="threads")
    every = knn.sharded_neighbors(emb, model.shards, k=21, method="ivf", probes=12).compute(scheduler="threads")
    assert (every == exact).all()  # 12 of 12 lists: the candidate set is the whole reference
    few = knn.sharded_neighbors(emb, model.shards, k=21, method="ivf", probes=4).compute(scheduler="threads")
    recall = np.mean([len(set(a) & set(b)) / 21 for a, b in zip(few["idx"], exact["idx"])])
    assert 0.9 < recall < 1.0  # approximate, but close
    # independent of the shard count: the lists are global (the same build in one shard, and re-sharded in 3)
    one = _build(references["ivf"].parent / "ivf1", "--shard-cells", "5000", "--ivf-lists", "12")
    few1 = knn.sharded_neighbors(emb, load_reference(one).shards, k=21, method="ivf", probes=4).compute(scheduler="threads")
    assert (few1 == few).all()
    assert main(["reshard-reference", "--reference", str(one), "--output", str(one.parent / "ivf3"), "--shard-cells", "800"]) == 0
    three = load_reference(one.parent / "ivf3")
    assert len(three.shards) == 3 and three.has_ivf and three.meta["shards"]["ivf"] == load_reference(one).meta["shards"]["ivf"]
    few3 = knn.sharded_neighbors(emb, three.shards, k=21, method="ivf", probes=4).compute(scheduler="threads")
    assert (few3 == few).all()


def test_ivf_on_a_reference_without_lists_is_a_clear_error(references, tmp_path):
    from dask_annot.errors import ConfigError

    with pytest.raises(ConfigError, match="no inverted lists.*--knn-method ivf"):
        _annotate(tmp_path, references["plain"], knn_method="ivf")
    with pytest.raises(ValueError, match="--shard-cells 0: must be a positive"):
        knn.plan_shards(np.zeros((10, 2), np.float32), n_cells=10, shard_cells=0)


def test_on_a_cluster_each_worker_maps_only_its_own_shards(references, tmp_path, local_cluster_client):
    """4 shards on 2 workers: shard i's searches run on the i-th worker (cyclic), so a cluster can
    hold a reference no single worker could; the outputs are those of the threaded run."""
    client = local_cluster_client
    ref = tmp_path / "ivf_copy"  # a path no earlier test's workers have loaded
    shutil.copytree(references["ivf"], ref)
    threads = _annotate(tmp_path / "t", ref, knn_method="ivf", chunk_cells=300)
    dist = _annotate(tmp_path / "d", ref, knn_method="ivf", scheduler=client.scheduler.address, chunk_cells=300)
    assert _outputs(dist) == _outputs(threads)
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    rec = json.loads((dist / "run.json").read_text())
    assert rec["parameters"]["shard_placement"] == [workers[i % 2] for i in range(4)]
    path = str(ref.resolve())

    def searched_shards(path=path):
        from dask_annot import refcache as rc
        return sorted(int(k[2].split("_")[-1].split(".")[0]) for k in rc.LOADS if k[0] == "shard-bylist32" and k[1] == path)

    loaded = client.run(searched_shards)
    assert loaded == {workers[0]: [0, 2], workers[1]: [1, 3]}


def test_self_neighbours_of_a_large_set_are_bounded_and_match_the_exact_graph(rng):
    """Above 50,000 cells the reference's own kNN graph (novelty pooling) goes through inverted
    lists instead of all pairs (quadratic, and 17 GB of blocks at 1M cells): real PBMC
    embedding tiled with noise to 60,000 cells; against the exact graph on a sample."""
    from dask_annot import confidence, knn

    base = resolve_model("human_pbmc_v1").embedding.astype(np.float64)
    x = np.concatenate([base + rng.normal(scale=0.3, size=base.shape) for _ in range(-(-60_000 // base.shape[0]))])[:60_000]
    graph = confidence.self_graph(x)
    assert graph.shape == (60_000, confidence.POOL_K) and (graph >= 0).all()
    assert not (graph == np.arange(60_000)[:, None]).any()
    u = knn.unit_rows(x)
    pick = rng.choice(60_000, 300, replace=False)
    d = u[pick] @ u.T
    d[np.arange(300), pick] = -np.inf
    exact = np.argsort(-d, axis=1, kind="stable")[:, : confidence.POOL_K]
    recall = np.mean([np.intersect1d(a, b).size / a.size for a, b in zip(exact, graph[pick])])
    assert recall > 0.95
    assert np.array_equal(knn.self_neighbors(x[:20_000], 15), knn.self_neighbors(x[:20_000], 15, block=3000))


def test_a_damaged_shard_is_refused_when_it_is_mapped(references, tmp_path):
    """Shard files are checked by the process that maps them (a worker never reads the shards it
    does not hold); a damaged one stops the run with one clear line and writes no outputs."""
    ref = tmp_path / "damaged"
    shutil.copytree(references["ivf"], ref)
    unit = ref / "shards" / "unit_00002.npy"
    blob = bytearray(unit.read_bytes())
    blob[-8:] = b"\x00" * 8
    unit.write_bytes(bytes(blob))
    load_reference(ref)  # the reference itself still loads: its other files are intact
    with pytest.raises(ReferenceArtifactError, match=r"unit_00002\.npy: its checksum differs.*rebuild it"):
        _annotate(tmp_path / "out", ref, knn_method="ivf", chunk_cells=300)
    assert not list((tmp_path / "out").rglob("cell_types.csv"))


def test_ivf_with_more_tied_cells_than_its_buffer_is_still_the_exact_top_k(rng):
    """Thousands of reference cells with one embedding (empty-ish cells project to one point)
    overflow the per-query candidate buffer; those queries are searched again with a buffer
    of all their candidates, and the result is the exact search's, ties by index."""
    from dask_annot import knn

    base = resolve_model("human_pbmc_v1").embedding.astype(np.float64)
    ref = np.concatenate([base, np.repeat(base[:1], 3000, axis=0), base[::-1]])
    unit = knn.unit_rows(ref)
    cent, members, offsets = knn.inverted_lists(unit, 8, seed=0)
    ref64 = np.ascontiguousarray(unit[members])
    q = np.concatenate([base[:1] + rng.normal(scale=0.01, size=(5, base.shape[1])), base[1:40]])
    probed = np.tile(np.arange(8, dtype=np.int32), (q.shape[0], 1))  # every list: the exact search
    vals, idx = knn.ivf_search(q, probed, members, offsets, ref64.astype(np.float32), ref64, 500)
    ev, ei = knn.exact_search(q, unit, 500)
    np.testing.assert_array_equal(idx, ei)
    np.testing.assert_array_equal(vals, ev)
