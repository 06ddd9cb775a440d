"""A killed worker or a killed run loses nothing: outputs are byte-identical to an uninterrupted run."""
from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dask_annot import config, h5, pipeline
from dask_annot.cli import example_path

N_COPIES = 15  # 12,000 real cells: the example tiled, each copy a new barcode suffix
CHUNK = 300


@pytest.fixture(scope="module")
def big_matrix(tmp_path_factory) -> Path:
    info = h5.open_matrix(example_path())
    X = h5.read_cells(info, 0, info.n_cells)
    bcs = [b.replace("-1", f"-{c + 1}") for c in range(N_COPIES) for b in info.barcodes]
    path = tmp_path_factory.mktemp("big") / "tiled.h5"
    h5.write_10x_h5(path, sp.vstack([X] * N_COPIES).tocsr(), barcodes=bcs, feature_ids=info.feature_ids, feature_names=info.feature_names)
    return path


@pytest.fixture(scope="module")
def reference_run(big_matrix, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    s = config.resolve(chunk_cells=CHUNK, scheduler="threads")
    return pipeline.annotate("run", big_matrix, output_dir=out, settings=s, log=lambda m: None).model_dir


def same_outputs(a: Path, b: Path) -> None:
    for name in ("cell_types.csv", "cell_annotation_differential_expression.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert gzip.decompress((a / "cell_annotation_results.json.gz").read_bytes()) == gzip.decompress(
        (b / "cell_annotation_results.json.gz").read_bytes())


def wait_for_chunks(out: Path, n: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if len(list(out.glob("run/work/chunks/*/chunk_*.npz"))) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} chunks finished within {timeout} s")


@pytest.mark.timeout(600)
def test_killing_a_worker_mid_annotation_loses_nothing(big_matrix, reference_run, tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        s = config.resolve(chunk_cells=CHUNK, scheduler=cluster.scheduler_address)
        result: dict = {}

        def run():
            try:
                result["dir"] = pipeline.annotate("run", big_matrix, output_dir=tmp_path, settings=s, log=lambda m: None).model_dir
            except BaseException as exc:  # surfaced below
                result["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        wait_for_chunks(tmp_path, 3)
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=500)
        assert not t.is_alive()
        assert "error" not in result, result.get("error")
        total = -(-N_COPIES * 800 // CHUNK)
        assert len(list(tmp_path.glob("run/work/chunks/*/chunk_*.npz"))) == total
    same_outputs(result["dir"], reference_run)


@pytest.mark.timeout(600)
def test_sigkill_of_the_whole_run_then_rerun_is_byte_identical(big_matrix, reference_run, tmp_path):
    cmd = [sys.executable, "-m", "dask_annot", "annotate", "--id", "run", "--matrix", str(big_matrix),
           "--output-dir", str(tmp_path), "--chunk-cells", str(CHUNK), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_chunks(tmp_path, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(list(tmp_path.glob("run/work/chunks/*/chunk_*.npz")))
    total = -(-N_COPIES * 800 // CHUNK)
    assert 5 <= done <= total, done  # almost always fewer; a very fast machine may finish them all
    # nothing that looks complete was left behind
    assert not list(tmp_path.glob("run/outs/**/run.json"))
    assert not list(tmp_path.glob("run/outs/**/cell_types.csv"))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {done} of {total} chunks" in rerun.stderr
    same_outputs(Path(rerun.stdout.split()[0]), reference_run)  # the kNN model's folder (the default run also writes pan_human_v1/)
