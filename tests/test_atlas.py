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
