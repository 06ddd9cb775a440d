"""One ``make_client`` for every place dask-annot runs.

``threads`` (default: the local threaded scheduler, no setup), ``processes``
(the local multiprocessing scheduler), ``local`` (a ``distributed.LocalCluster``
with a dashboard and memory limits), ``tcp://HOST:PORT`` (an existing cluster),
and ``slurm`` / ``pbs`` / ``sge`` / ``lsf``: a dask-jobqueue cluster whose workers
are batch jobs.

A batch-system cluster is configured, in this order of precedence, from keyword
arguments, a cluster config file (``cluster_config``, see ``deploy/*.yaml``), the
user's dask config (``jobqueue.<system>``, dask-jobqueue's own keys) and the
defaults below, which work on a single node. Workers read the zarr store and the
reference from their paths, so every node must mount them at the same place:
:func:`check_shared_paths` checks it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import yaml
from dask.utils import parse_bytes

from .errors import ClusterError

LOCAL_SCHEDULERS = ("threads", "processes", "local")


@dataclass(frozen=True)
class _System:
    cluster: str          # dask-jobqueue cluster class
    submit: str           # the submit command that must be on PATH
    queue_command: str    # what the user runs to see their jobs
    account_key: str      # dask-jobqueue's name for the account / project
    walltime: str         # default walltime in the system's format


SYSTEMS: dict[str, _System] = {
    "slurm": _System("SLURMCluster", "sbatch", "squeue", "account", "01:00:00"),
    "pbs": _System("PBSCluster", "qsub", "qstat", "account", "01:00:00"),
    "sge": _System("SGECluster", "qsub", "qstat", "project", "01:00:00"),
    "lsf": _System("LSFCluster", "bsub", "bjobs", "project", "01:00"),
}

DEFAULT_CORES = 2
DEFAULT_PROCESSES = 1
DEFAULT_MEMORY_BYTES = 4 * 2**30
DEFAULT_WORKER_TIMEOUT = 600.0
DEFAULT_JOB_NAME = "dask-annot"
# Keys of a cluster config file's ``annot`` section (dask-annot's own, not dask-jobqueue's).
ANNOT_KEYS = ("n-workers", "worker-timeout")
# dask-jobqueue keys that configure the cluster (scheduler), not the worker job.
_CLUSTER_ONLY_KEYS = ("scheduler-options", "shared-temp-directory")
_PLACEHOLDER_ADDRESS = "tcp://SCHEDULER-ADDRESS:8786"


def _known() -> str:
    return "threads, processes, local, slurm, pbs, sge, lsf or tcp://HOST:PORT"


def _is_address(scheduler: str) -> bool:
    return "://" in scheduler or ":" in scheduler


def default_log_directory() -> Path:
    """Where batch workers write their logs unless told otherwise: ``~/.dask-annot/logs``."""
    return Path("~/.dask-annot/logs").expanduser()


def _default_memory() -> str:
    """4 GiB per job, or a quarter of this machine's memory if that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    n = min(DEFAULT_MEMORY_BYTES, total // 4) if total > 0 else DEFAULT_MEMORY_BYTES
    return f"{max(n // 2**20, 256)}MiB" if n < DEFAULT_MEMORY_BYTES else "4GiB"


def load_cluster_config(path: str | os.PathLike, scheduler: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a cluster config file; return its ``jobqueue.<scheduler>`` and ``annot`` sections.

    The file is a dask config file (see ``deploy/slurm.yaml``): dask-jobqueue's keys
    under ``jobqueue.<system>``, and dask-annot's ``n-workers`` and ``worker-timeout``
    under ``annot``. Unknown keys are an error, so a typo does not go unnoticed.
    """
    path = Path(path)
    if scheduler not in SYSTEMS:
        raise ClusterError(f"a cluster config file is for --scheduler {', '.join(SYSTEMS)}; got --scheduler '{scheduler}'")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ClusterError(f"{path}: no such cluster config file; see deploy/ for examples") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"{path}: cannot read the cluster config ({exc}); it must be YAML like deploy/{scheduler}.yaml") from exc
    data = data or {}
    if not isinstance(data, dict) or set(data) - {"jobqueue", "annot"}:
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ClusterError(f"{path}: a cluster config has the sections 'jobqueue' and 'annot'; found {found}")
    systems = data.get("jobqueue") or {}
    if scheduler not in systems:
        raise ClusterError(
            f"{path} has no 'jobqueue: {scheduler}:' section (it has: {', '.join(systems) or 'none'}); "
            f"use a config for {scheduler}, e.g. deploy/{scheduler}.yaml"
        )
    section = dict(systems[scheduler] or {})
    valid = _jobqueue_keys(scheduler)
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ClusterError(f"{path}: unknown key(s) {', '.join(unknown)} under jobqueue.{scheduler}; "
                           f"dask-jobqueue knows: {', '.join(sorted(valid))}")
    annot = dict(data.get("annot") or {})
    unknown = sorted(set(annot) - set(ANNOT_KEYS))
    if unknown:
        raise ClusterError(f"{path}: unknown key(s) {', '.join(unknown)} under annot; a cluster config may set {', '.join(ANNOT_KEYS)}")
    return section, annot


def _import_jobqueue():
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ClusterError("the batch-system schedulers need dask-jobqueue: pip install dask-jobqueue") from exc
    return dask_jobqueue


def _jobqueue_keys(scheduler: str) -> set[str]:
    _import_jobqueue()  # registers dask-jobqueue's defaults in dask.config
    return set(dask.config.get(f"jobqueue.{scheduler}"))


def _user_config(scheduler: str, key: str) -> Any:
    """``jobqueue.<scheduler>.<key>`` when the user's dask config sets it (not just dask-jobqueue's default)."""
    value = dask.config.get(f"jobqueue.{scheduler}.{key}", default=None)
    shipped = dask.config.get(f"jobqueue.{scheduler}.{key}", default=None, config=dask.config.merge(*dask.config.defaults))
    return None if value == shipped else value


def _jobqueue_kwargs(scheduler: str, *, cluster_config: str | os.PathLike | None, memory_limit: str,
                     explicit: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """dask-jobqueue keyword arguments and dask-annot's cluster options, with precedence applied."""
    if scheduler not in SYSTEMS:
        raise ClusterError(f"--scheduler '{scheduler}' is not a batch system; use {', '.join(SYSTEMS)}")
    system = SYSTEMS[scheduler]
    valid = _jobqueue_keys(scheduler)
    from_file, annot = load_cluster_config(cluster_config, scheduler) if cluster_config else ({}, {})
    given = {k.replace("_", "-"): v for k, v in explicit.items() if v is not None}
    if "account" in given:
        given[system.account_key] = given.pop("account")
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ClusterError(f"option(s) {', '.join(unknown)} do not apply to {scheduler}")
    options = {**from_file, **given}

    def pick(key: str, default: Any) -> Any:
        if options.get(key) is not None:
            return options[key]
        user = _user_config(scheduler, key)
        return default if user is None else user

    options["cores"] = int(pick("cores", DEFAULT_CORES))
    options["processes"] = int(pick("processes", DEFAULT_PROCESSES))
    per_worker = None if memory_limit in (None, "auto") else parse_bytes(memory_limit)
    options["memory"] = pick("memory", f"{per_worker * options['processes']}B" if per_worker else _default_memory())
    options["walltime"] = pick("walltime", system.walltime)
    options["name"] = pick("name", DEFAULT_JOB_NAME)
    options["python"] = pick("python", sys.executable)
    log_dir = pick("log-directory", None)
    options["log-directory"] = str(Path(log_dir).expanduser().absolute() if log_dir else default_log_directory())
    kwargs = {("job_name" if k == "name" else k.replace("-", "_")): v for k, v in options.items()}
    return kwargs, annot


def _split(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster_only = {k.replace("-", "_") for k in _CLUSTER_ONLY_KEYS}
    return ({k: v for k, v in kwargs.items() if k not in cluster_only},
            {k: v for k, v in kwargs.items() if k in cluster_only})


def job_script(scheduler: str, *, cluster_config: str | os.PathLike | None = None, memory_limit: str = "auto",
               cores: int | None = None, processes: int | None = None, memory: str | None = None,
               walltime: str | None = None, queue: str | None = None, account: str | None = None,
               log_directory: str | os.PathLike | None = None, python: str | None = None,
               interface: str | None = None, job_extra_directives: list[str] | None = None,
               job_script_prologue: list[str] | None = None, n_workers: int | None = None,
               threads_per_worker: int | None = None, log: Callable[[str], Any] | None = None,
               worker_timeout: float | None = None, shared_paths: Iterable = (), client=None) -> str:
    """The batch script ``make_client`` would submit for each worker job, submitting nothing.

    Takes the same options as :func:`make_client`; those that do not shape the job
    script (``n_workers``, ``log``, ``worker_timeout``, ...) are accepted and ignored.
    The scheduler address in the script is a placeholder: the real one exists only
    once the cluster starts. No batch-system command is needed.
    """
    kwargs, _ = _jobqueue_kwargs(scheduler, cluster_config=cluster_config, memory_limit=memory_limit, explicit=dict(
        cores=cores, processes=processes, memory=memory, walltime=walltime, queue=queue, account=account,
        log_directory=log_directory, python=python, interface=interface,
        job_extra_directives=job_extra_directives, job_script_prologue=job_script_prologue))
    job_kwargs, _ = _split(kwargs)
    job_cls = getattr(_import_jobqueue(), SYSTEMS[scheduler].cluster).job_cls
    try:
        return job_cls(_PLACEHOLDER_ADDRESS, name="dask-annot-worker", **job_kwargs).job_script()
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"cannot build a {scheduler} job script from these options ({exc})") from exc


def _missing_paths(paths: list[str]) -> tuple[str, list[str]]:
    """Run on a worker: this host's name and which of ``paths`` it cannot see."""
    return socket.gethostname(), [p for p in paths if not os.path.exists(p)]


def check_shared_paths(client, paths: Iterable[str | os.PathLike]) -> list[str]:
    """Check on every connected worker that each path exists there; return the workers checked.

    Workers read the zarr store and the reference themselves, from their paths, so
    they must be on a filesystem every node mounts at the same place. Relative paths
    are made absolute here, on the client.
    """
    wanted = [str(Path(p).absolute()) for p in paths]
    if not wanted:
        return []
    try:
        seen = client.run(_missing_paths, wanted)
    except Exception as exc:
        raise ClusterError(f"could not check the input paths on the workers ({exc})") from exc
    for worker, (host, missing) in sorted(seen.items()):
        if missing:
            raise ClusterError(
                f"{missing[0]} does not exist on worker {worker} (host {host}); workers must see the zarr store "
                "and the reference on a shared filesystem: put --output-dir and the model on a path every node mounts"
            )
    return sorted(seen)


def _sbatch_test_only(script: str) -> None:
    """Let SLURM validate the job script (partition, account, limits) without submitting it.

    dask-jobqueue submits in the background, where a rejected job only shows up as a
    logged traceback and a wait for workers that never come.
    """
    import subprocess

    try:
        done = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"`sbatch --test-only` did not run ({exc}); is SLURM up? check `sinfo`") from exc
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise ClusterError(f"SLURM rejects the worker job: {why}; fix the options (print the job script to see them)")


def _announce(client, log: Callable[[str], Any] | None, shared_paths: Iterable) -> None:
    if log:
        log(f"Dask dashboard: {client.dashboard_link}")
    check_shared_paths(client, shared_paths)


@contextlib.contextmanager
def _jobqueue_client(scheduler: str, *, n_workers: int | None, memory_limit: str, log, shared_paths,
                     cluster_config, worker_timeout: float | None, explicit: Mapping[str, Any]) -> Iterator[object]:
    system = SYSTEMS[scheduler]
    kwargs, annot = _jobqueue_kwargs(scheduler, cluster_config=cluster_config, memory_limit=memory_limit,
                                     explicit=explicit)
    if n_workers is None:
        n_workers = annot.get("n-workers")
    if worker_timeout is None:
        worker_timeout = annot.get("worker-timeout") or dask.config.get("annot.worker-timeout", default=None)
    worker_timeout = float(worker_timeout or DEFAULT_WORKER_TIMEOUT)
    if shutil.which(system.submit) is None:
        raise ClusterError(f"--scheduler {scheduler} submits jobs with `{system.submit}`, which is not on PATH; "
                           f"run dask-annot on a {scheduler} login node (or use --scheduler local)")
    log_dir = Path(kwargs["log_directory"])
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot create the worker log directory {log_dir} ({exc}); set log-directory in the cluster config") from exc
    from distributed import Client

    cluster_cls = getattr(_import_jobqueue(), system.cluster)
    try:
        cluster = cluster_cls(**kwargs)
    except Exception as exc:
        raise ClusterError(f"the {system.cluster} could not start ({exc}); print the job script to check the options") from exc
    with cluster, Client(cluster) as client:
        if scheduler == "slurm":
            _sbatch_test_only(cluster.job_script())
        if n_workers:
            cluster.scale(n=int(n_workers))
        else:
            cluster.scale(jobs=1)
        if log:
            log(f"submitted {scheduler} job(s) for {int(n_workers) if n_workers else kwargs['processes']} worker(s) "
                f"({kwargs['cores']} cores, {kwargs['memory']}, {kwargs['walltime']} each); worker logs in {log_dir}")
        try:
            client.wait_for_workers(1, timeout=worker_timeout)
        except (TimeoutError, OSError) as exc:
            ids = sorted(str(j.job_id) for j in cluster.workers.values() if getattr(j, "job_id", None))
            jobs = f" (job {', '.join(ids)})" if ids else " (no job was submitted: see the errors above)"
            raise ClusterError(f"no worker joined within {worker_timeout:g} s{jobs}; "
                               f"check `{system.queue_command}` and the job logs in {log_dir}") from exc
        _announce(client, log, shared_paths)
        yield client


@contextlib.contextmanager
def make_client(scheduler: str = "threads", *, n_workers: int | None = None, threads_per_worker: int = 1,
                memory_limit: str = "auto", log: Callable[[str], Any] | None = None, client=None,
                cluster_config: str | os.PathLike | None = None, shared_paths: Iterable[str | os.PathLike] = (),
                worker_timeout: float | None = None, cores: int | None = None, processes: int | None = None,
                memory: str | None = None, walltime: str | None = None, queue: str | None = None,
                account: str | None = None, log_directory: str | os.PathLike | None = None,
                python: str | None = None, interface: str | None = None,
                job_extra_directives: list[str] | None = None,
                job_script_prologue: list[str] | None = None) -> Iterator[object | None]:
    """Context in which ``dask.compute`` runs on the chosen scheduler; yields the Client or None.

    Parameters
    ----------
    scheduler
        ``threads``, ``processes``, ``local``, ``tcp://HOST:PORT``, or a batch system:
        ``slurm``, ``pbs``, ``sge``, ``lsf``.
    n_workers
        Local: workers (default: cores). Batch: Dask workers to ask for (default:
        one job). Address: workers to wait for (default 1).
    threads_per_worker, memory_limit
        For ``local``; for a batch system a ``memory_limit`` other than ``auto`` is
        the per-worker memory when ``memory`` is not set.
    client
        An existing ``distributed.Client`` to use as it is (never closed here).
    cluster_config
        A YAML cluster config for a batch system (see ``deploy/``).
    shared_paths
        Paths every worker must see (the zarr store, the reference); checked once
        the first worker has joined.
    worker_timeout
        Seconds to wait for the first worker (default 600, or ``annot.worker-timeout``).
    cores, processes, memory, walltime, queue, account, log_directory, python, interface, job_extra_directives, job_script_prologue
        Batch-system job options (dask-jobqueue's meaning; ``memory`` and ``cores``
        are per job). They override the cluster config and the dask config.
    """
    if client is not None:
        _announce(client, log, shared_paths)
        yield client
        return
    if not isinstance(scheduler, str) or not scheduler:
        raise ClusterError(f"--scheduler must be one of {_known()}; got {scheduler!r}")
    cores_here = os.cpu_count() or 1
    if scheduler == "threads":
        from threadpoolctl import threadpool_limits

        threads = n_workers or cores_here
        # Dask's threads each run a BLAS product at a time: a multi-threaded BLAS under
        # each of them oversubscribes the cores (the kNN screen ran 1.6x slower with
        # OpenBLAS on 2 threads under 2 Dask threads, measured). Distributed workers get
        # the same from the nanny's OPENBLAS/OMP/MKL_NUM_THREADS=1.
        with dask.config.set(scheduler="threads", num_workers=threads), \
                threadpool_limits(limits=1 if threads > 1 else None, user_api="blas"):
            yield None
        return
    if scheduler == "processes":
        with dask.config.set(scheduler="processes", num_workers=n_workers or cores_here):
            yield None
        return
    if scheduler in SYSTEMS:
        with _jobqueue_client(scheduler, n_workers=n_workers, memory_limit=memory_limit, log=log,
                              shared_paths=shared_paths, cluster_config=cluster_config,
                              worker_timeout=worker_timeout, explicit=dict(
                                  cores=cores, processes=processes, memory=memory, walltime=walltime, queue=queue,
                                  account=account, log_directory=log_directory,
                                  python=python, interface=interface, job_extra_directives=job_extra_directives,
                                  job_script_prologue=job_script_prologue)) as c:
            yield c
        return
    if cluster_config is not None:
        raise ClusterError(f"--cluster-config is for --scheduler {', '.join(SYSTEMS)}; got --scheduler '{scheduler}'")
    from distributed import Client, LocalCluster

    if scheduler == "local":
        try:
            cluster = LocalCluster(
                n_workers=n_workers or max(1, cores_here // max(1, threads_per_worker)),
                threads_per_worker=threads_per_worker, memory_limit=memory_limit, processes=True,
            )
        except Exception as exc:
            raise ClusterError(f"the LocalCluster could not start ({exc}); try --scheduler threads") from exc
        with cluster, Client(cluster) as c:
            _announce(c, log, shared_paths)
            yield c
        return
    if _is_address(scheduler):
        try:
            c = Client(scheduler, timeout="30s")
        except Exception as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); check the address and that it is running") from exc
        with c:
            timeout = float(worker_timeout or DEFAULT_WORKER_TIMEOUT)
            try:
                c.wait_for_workers(n_workers or 1, timeout=timeout)
            except (TimeoutError, OSError) as exc:
                raise ClusterError(f"fewer than {n_workers or 1} worker(s) joined the scheduler at {scheduler} "
                                   f"within {timeout:g} s; start workers with `dask worker {scheduler}`") from exc
            _announce(c, log, shared_paths)
            yield c
        return
    raise ClusterError(f"--scheduler '{scheduler}' is not known; use {_known()}")
