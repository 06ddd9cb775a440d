"""make_client on every scheduler that needs no batch system, and the batch-system
configuration: every deploy/*.yaml loads and yields a job script, with the documented
precedence, without submitting anything."""
from __future__ import annotations

import sys
from pathlib import Path

import dask
import dask.array as da
import pytest

from dask_annot import cluster
from dask_annot.cluster import check_shared_paths, job_script, load_cluster_config, make_client
from dask_annot.errors import ClusterError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SYSTEMS = ("slurm", "pbs", "sge", "lsf")


def _sum() -> int:
    return int(da.arange(1000, chunks=100).sum().compute())


# ---------------------------------------------------------------------------
# threads / processes / local / address / client
# ---------------------------------------------------------------------------


def test_threads_yields_no_client_and_sets_the_threaded_scheduler():
    with make_client("threads", n_workers=3) as client:
        assert client is None
        assert dask.config.get("scheduler") == "threads"
        assert dask.config.get("num_workers") == 3
        assert _sum() == 499500
    assert dask.config.get("num_workers", None) != 3


def test_processes_yields_no_client():
    with make_client("processes", n_workers=2) as client:
        assert client is None
        assert dask.config.get("scheduler") == "processes"


def test_local_cluster_logs_the_dashboard_and_checks_shared_paths(tmp_path):
    lines: list[str] = []
    with make_client("local", n_workers=1, log=lines.append, shared_paths=[tmp_path]) as client:
        assert client is not None
        assert _sum() == 499500
        assert check_shared_paths(client, [tmp_path]) == sorted(client.scheduler_info()["workers"])
        missing = tmp_path / "not-there.zarr"
        with pytest.raises(ClusterError, match=rf"{missing}.*does not exist on worker tcp://.*shared filesystem"):
            check_shared_paths(client, [tmp_path, missing])
    assert any(line.startswith("Dask dashboard: http") for line in lines)


def test_local_cluster_refuses_a_path_its_workers_cannot_see(tmp_path):
    with pytest.raises(ClusterError, match="shared filesystem"):
        with make_client("local", n_workers=1, shared_paths=[tmp_path / "nope"]):
            pytest.fail("make_client yielded although a shared path is missing")


def test_address_connects_to_a_running_scheduler(local_cluster_client):
    lines: list[str] = []
    address = local_cluster_client.scheduler.address
    with make_client(address, n_workers=2, log=lines.append, worker_timeout=30) as client:
        assert client.scheduler.address == address
        assert _sum() == 499500
    assert lines and lines[0].startswith("Dask dashboard:")
    assert local_cluster_client.status == "running"


def test_address_waits_for_workers_with_a_clear_error(local_cluster_client):
    address = local_cluster_client.scheduler.address
    with pytest.raises(ClusterError, match=r"fewer than 5 worker\(s\) joined .* within 1 s; start workers"):
        with make_client(address, n_workers=5, worker_timeout=1):
            pytest.fail("yielded without enough workers")


def test_an_existing_client_is_used_and_left_open(local_cluster_client, tmp_path):
    lines: list[str] = []
    with make_client("threads", client=local_cluster_client, log=lines.append, shared_paths=[tmp_path]) as client:
        assert client is local_cluster_client
        assert _sum() == 499500
    assert local_cluster_client.status == "running"
    assert lines[0].startswith("Dask dashboard:")


@pytest.mark.parametrize("name", ["thread", "SLURM", "", "kubernetes", "dask"])
def test_an_unknown_scheduler_is_a_cluster_error(name):
    with pytest.raises(ClusterError, match="threads, processes, local, slurm, pbs, sge, lsf or tcp://HOST:PORT"):
        with make_client(name):
            pass


def test_a_cluster_config_needs_a_batch_scheduler():
    with pytest.raises(ClusterError, match="--cluster-config is for --scheduler slurm, pbs, sge, lsf"):
        with make_client("local", cluster_config=DEPLOY / "slurm.yaml"):
            pass


def test_a_batch_scheduler_without_its_submit_command_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch, qsub or bsub
    for name, command in [("slurm", "sbatch"), ("pbs", "qsub"), ("sge", "qsub"), ("lsf", "bsub")]:
        with pytest.raises(ClusterError, match=rf"submits jobs with `{command}`, which is not on PATH"):
            with make_client(name, log_directory=tmp_path / "logs"):
                pass


# ---------------------------------------------------------------------------
# deploy/*.yaml and job scripts (no batch system needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYSTEMS)
def test_every_deploy_example_loads_and_gives_a_job_script(name, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no batch-system command is needed to print the script
    section, annot = load_cluster_config(DEPLOY / f"{name}.yaml", name)
    assert section["cores"] == 4 and section["memory"] == "16GiB"
    assert set(annot) == {"n-workers", "worker-timeout"}
    script = job_script(name, cluster_config=DEPLOY / f"{name}.yaml")
    directive = {"slurm": "#SBATCH", "pbs": "#PBS", "sge": "#$", "lsf": "#BSUB"}[name]
    assert script.startswith("#!/usr/bin/env bash")
    assert f"{directive} " in script
    assert "distributed.cli.dask_worker tcp://SCHEDULER-ADDRESS:8786" in script
    assert "--nthreads 4" in script and "--memory-limit 16.00GiB" in script
    assert sys.executable in script
    assert str(Path("~/.dask-annot/logs").expanduser()) in script  # ~ expanded on the client
    walltime = {"slurm": "#SBATCH -t 02:00:00", "pbs": "#PBS -l walltime=02:00:00",
                "sge": "#$ -l h_rt=02:00:00", "lsf": "#BSUB -W 02:00"}[name]
    assert walltime in script


def test_the_deploy_directory_has_an_example_for_every_batch_system():
    assert sorted(p.stem for p in DEPLOY.glob("*.yaml")) == sorted(SYSTEMS)


def test_slurm_defaults_work_on_a_single_node(tmp_path):
    script = job_script("slurm")
    expected_memory = cluster._default_memory()
    assert "#SBATCH --cpus-per-task=2" in script
    assert "#SBATCH -t 01:00:00" in script
    assert "#SBATCH -J dask-annot" in script
    assert f"#SBATCH -o {cluster.default_log_directory()}/dask-annot-%J.out" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    limit = dask.utils.format_bytes(dask.utils.parse_bytes(expected_memory)).replace(" ", "")
    assert f"--nthreads 2 --memory-limit {limit}" in script
    assert "#SBATCH -p" not in script  # the default partition


def test_keyword_arguments_beat_the_file_which_beats_dask_config(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("jobqueue:\n  slurm:\n    walltime: '00:20:00'\n    cores: 3\n    queue: from-file\n")
    with dask.config.set({"jobqueue.slurm.walltime": "05:00:00", "jobqueue.slurm.queue": "from-config",
                          "jobqueue.slurm.account": "lab-from-config"}):
        script = job_script("slurm", cluster_config=cfg, queue="from-kwarg")
        plain = job_script("slurm")
    assert "#SBATCH -p from-kwarg" in script
    assert "#SBATCH -t 00:20:00" in script and "#SBATCH --cpus-per-task=3" in script
    assert "#SBATCH -A lab-from-config" in script
    # the user's dask config beats dask-annot's defaults
    assert "#SBATCH -t 05:00:00" in plain and "#SBATCH -p from-config" in plain


def test_account_maps_to_each_systems_own_option():
    assert "#SBATCH -A lab" in job_script("slurm", account="lab")
    assert "#PBS -A lab" in job_script("pbs", account="lab")
    assert "#$ -P lab" in job_script("sge", account="lab")
    assert '#BSUB -P "lab"' in job_script("lsf", account="lab")


def test_memory_limit_per_worker_sets_the_job_memory():
    script = job_script("slurm", memory_limit="3GiB", processes=2, cores=2)
    assert "#SBATCH --mem=6G" in script and "--nworkers 2" in script and "--memory-limit 3.00GiB" in script


def test_job_script_options_reach_the_script(tmp_path):
    script = job_script("slurm", cores=1, memory="1GiB", walltime="00:05:00", log_directory=tmp_path,
                        job_extra_directives=["--qos=test"], job_script_prologue=["echo prologue-ran"],
                        n_workers=7, log=print)
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=1G" in script
    assert "#SBATCH -t 00:05:00" in script and "#SBATCH --qos=test" in script
    assert f"#SBATCH -e {tmp_path}/dask-annot-%J.err" in script
    assert "echo prologue-ran" in script


@pytest.mark.parametrize("text, message", [
    ("jobqueue:\n  pbs:\n    cores: 2\n", r"has no 'jobqueue: slurm:' section \(it has: pbs\)"),
    ("jobqueue:\n  slurm:\n    coers: 2\n", r"unknown key\(s\) coers under jobqueue.slurm"),
    ("annot:\n  k: 5\njobqueue:\n  slurm: {}\n", r"unknown key\(s\) k under annot"),
    ("cluster:\n  cores: 2\n", r"sections 'jobqueue' and 'annot'; found cluster"),
    ("jobqueue: [\n", "cannot read the cluster config"),
])
def test_a_bad_cluster_config_names_the_problem(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ClusterError, match=message):
        job_script("slurm", cluster_config=cfg)


def test_a_missing_cluster_config_is_a_cluster_error(tmp_path):
    with pytest.raises(ClusterError, match="no such cluster config file"):
        job_script("slurm", cluster_config=tmp_path / "none.yaml")


def test_job_script_is_only_for_batch_systems():
    with pytest.raises(ClusterError, match="not a batch system"):
        job_script("local")


def test_an_option_job_script_does_not_know_is_a_type_error():
    with pytest.raises(TypeError):
        job_script("slurm", resource_spec="x")  # a typo or an option for another system is not ignored


def test_cluster_errors_are_also_runtime_errors():
    with pytest.raises(RuntimeError):
        job_script("nope")


def test_the_deploy_readme_states_the_shared_filesystem_requirement():
    assert "shared filesystem" in (DEPLOY / "README.md").read_text().lower()


def test_cli_prints_the_job_script_and_runs_nothing(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "dask_annot", "annotate", "--id", "x", "--matrix", "example",
                        "--output-dir", str(tmp_path), "--scheduler", "slurm", "--print-job-script", "--walltime", "02:00:00",
                        "--cores", "4", "--memory", "8GiB"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH -t 02:00:00" in r.stdout and "--cpus-per-task=4" in r.stdout
    assert not any(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "dask_annot", "de", "--matrix", "example", "--groups", "g.csv", "--output", "o.csv",
                        "--scheduler", "pbs", "--cluster-config", str(repo / "deploy" / "pbs.yaml"), "--print-job-script"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "#PBS" in r.stdout
