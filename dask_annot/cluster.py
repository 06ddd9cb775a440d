"""One ``make_client`` for every place dask-annot runs.

``threads`` (default: the local threaded scheduler, no setup), ``processes``
(the local multiprocessing scheduler), ``local`` (a ``distributed.LocalCluster``
with a dashboard and memory limits), ``tcp://HOST:PORT`` (an existing cluster).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask

from .errors import ClusterError


@contextlib.contextmanager
def make_client(scheduler: str = "threads", *, n_workers: int | None = None, threads_per_worker: int = 1,
                memory_limit: str = "auto", log=None) -> Iterator[object | None]:
    """Context in which ``dask.compute`` runs on the chosen scheduler; yields the Client or None."""
    cores = os.cpu_count() or 1
    if scheduler == "threads":
        with dask.config.set(scheduler="threads", num_workers=n_workers or cores):
            yield None
        return
    if scheduler == "processes":
        with dask.config.set(scheduler="processes", num_workers=n_workers or cores):
            yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        try:
            cluster = LocalCluster(
                n_workers=n_workers or max(1, cores // max(1, threads_per_worker)),
                threads_per_worker=threads_per_worker, memory_limit=memory_limit, processes=True,
            )
        except Exception as exc:
            raise ClusterError(f"the LocalCluster could not start ({exc}); try --scheduler threads") from exc
        with cluster, Client(cluster) as client:
            if log:
                log(f"Dask dashboard: {client.dashboard_link}")
            yield client
        return
    if "://" in scheduler or ":" in scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except Exception as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); check the address and that it is running") from exc
        with client:
            if log:
                log(f"Dask dashboard: {client.dashboard_link}")
            yield client
        return
    raise ClusterError(
        f"--scheduler '{scheduler}' is not known; use threads, processes, local or tcp://HOST:PORT"
    )
