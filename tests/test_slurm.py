"""A real SLURM (munged + slurmctld + slurmd on localhost, from Debian packages, started by
deploy/slurm-local.sh): dask-jobqueue workers submitted with sbatch, and the single-allocation
batch template, each giving the threaded run's outputs byte for byte."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import pytest

from dask_annot.cluster import check_shared_paths, job_script, make_client
from dask_annot.errors import ClusterError

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OUTPUTS = ("cell_types.csv", "cell_annotation_differential_expression.csv", "cell_annotation_results.json.gz")
# Short waits: on this single node a worker job starts in seconds.
ENV = {**os.environ, "DASK_ANNOT__WORKER_TIMEOUT": "120"}


def _run(cmd: list[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def _ping() -> bool:
    if shutil.which("scontrol") is None:
        return False
    return "is UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def slurm():
    """SLURM on this machine, started by deploy/slurm-local.sh (and stopped again if this started it)."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start slurmctld, slurmd and munged from Debian packages: run them as root")
    if not all(shutil.which(c) or Path("/usr/sbin", c).exists() for c in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.fail("SLURM is not installed: run `bash scripts/test-prereqs.sh` as root before the tests (the suite installs nothing)")
    was_up = _ping()
    done = subprocess.run(["bash", str(DEPLOY / "slurm-local.sh"), "start"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"deploy/slurm-local.sh start failed:\n{done.stdout}\n{done.stderr}")
    yield
    if not was_up:
        subprocess.run(["bash", str(DEPLOY / "slurm-local.sh"), "stop"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def example() -> Path:
    out = subprocess.run([sys.executable, "-m", "dask_annot", "example-path"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def threaded(tmp_path_factory, example) -> dict[str, bytes]:
    """The reference outputs: the same command on the threaded scheduler."""
    out = tmp_path_factory.mktemp("threads")
    _run(_annotate(example, out, "threads"), cwd=out)
    return _outputs(out)


def _annotate(matrix: Path, out: Path, scheduler: str) -> list[str]:
    return [sys.executable, "-m", "dask_annot", "annotate", "--id", "t", "--matrix", str(matrix),
            "--scheduler", scheduler, "--n-workers", "1", "--output-dir", str(out), "--quiet"]


def _outputs(out: Path) -> dict[str, bytes]:
    model_dir = out / "t" / "outs" / "segmented_outs" / "cell_types" / "human_pbmc_v1"  # the default run also writes pan_human_v1/
    got = {name: (model_dir / name).read_bytes() for name in OUTPUTS}
    got["cell_annotation_results.json"] = gzip.decompress(got.pop("cell_annotation_results.json.gz"))
    return got


def _no_jobs_left(wait: float = 30) -> bool:
    """True once squeue lists no job (cancelling is asynchronous: a job shows as completing for a while)."""
    deadline = time.monotonic() + wait
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_annotate_on_slurm_workers_matches_threads_byte_for_byte(slurm, threaded, example, tmp_path):
    elsewhere = tmp_path / "somewhere-else"  # run from a directory unrelated to the project and the outputs
    elsewhere.mkdir()
    out = tmp_path / "out"
    done = _run(_annotate(example, out, "slurm"), cwd=elsewhere)
    assert "submitted slurm job(s) for 1 worker(s)" in done.stderr
    assert "Dask dashboard: http" in done.stderr
    got = _outputs(out)
    assert set(got) == set(threaded)
    for name in threaded:
        assert got[name] == threaded[name], f"{name} differs between --scheduler slurm and --scheduler threads"
    assert _no_jobs_left()


def test_single_allocation_template_runs_annotate_inside_one_job(slurm, threaded, example, tmp_path):
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    out = tmp_path / "out"
    done = _run(["sbatch", "--parsable", "--time=00:10:00", str(DEPLOY / "annotate-single-allocation.sbatch"),
                 "--id", "t", "--matrix", str(example), "--output-dir", str(out)], cwd=submit_dir, timeout=60)
    job_id = done.stdout.strip().split(";")[0]
    log_file = submit_dir / f"dask-annot-{job_id}.out"
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still queued or running after 300 s; its log:\n"
                        + (log_file.read_text() if log_file.exists() else "(none)"))
        time.sleep(1)
    log = log_file.read_text()
    assert (out / "t" / "outs").is_dir(), f"the job wrote no outputs; its log:\n{log}"
    assert "dask-annot: scheduler at tcp://" in log and "starting 1 worker(s)" in log
    assert "Dask dashboard:" in log
    assert not any(p.name.startswith(".dask-annot-") for p in submit_dir.iterdir()), "the run directory was not removed"
    got = _outputs(out)
    for name in threaded:
        assert got[name] == threaded[name], f"{name} differs between the single-allocation job and --scheduler threads"


def test_the_printed_job_script_is_one_slurm_accepts(slurm, tmp_path):
    script = job_script("slurm", cores=1, memory="512MiB", log_directory=tmp_path)
    done = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _no_jobs_left()


def test_workers_check_the_shared_paths(slurm, tmp_path):
    lines: list[str] = []
    with make_client("slurm", cores=1, memory="1GiB", log_directory=tmp_path / "logs", worker_timeout=120,
                     log=lines.append, shared_paths=[tmp_path]) as client:
        assert int(da.arange(100, chunks=10).sum().compute()) == 4950
        with pytest.raises(ClusterError, match=rf"{tmp_path / 'absent.zarr'} does not exist on worker tcp://.*\(host "):
            check_shared_paths(client, [tmp_path / "absent.zarr"])
    assert any(f"worker logs in {tmp_path / 'logs'}" in line for line in lines)
    assert list((tmp_path / "logs").glob("dask-annot-*.err")), "the worker job wrote no log"


def test_a_job_slurm_rejects_fails_at_once(slurm, tmp_path):
    with pytest.raises(ClusterError, match="SLURM rejects the worker job: .*partition"):
        with make_client("slurm", queue="no-such-partition", log_directory=tmp_path):
            pytest.fail("yielded a client for a rejected job")
    assert _no_jobs_left()


def test_no_worker_within_the_timeout_is_a_clear_error_and_the_job_is_cancelled(slurm, tmp_path):
    # a job that may not start for an hour: it stays pending
    with pytest.raises(ClusterError, match=rf"no worker joined within 3 s \(job \d+\); check `squeue` and the job logs in {tmp_path}"):
        with make_client("slurm", cores=1, memory="256MiB", job_extra_directives=["--begin=now+1hour"],
                         log_directory=tmp_path, worker_timeout=3):
            pytest.fail("yielded without a worker")
    assert _no_jobs_left(), "the pending worker job was not cancelled"
