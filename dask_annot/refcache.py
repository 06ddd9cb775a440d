"""The reference lives with the workers: a per-process cache of loaded references and shards.

A task graph carries only a small handle for a reference (its directory and a digest of
the checksums its ``reference.json`` lists); each worker process loads what the handle
names once, memory-mapped where the file allows, and reuses it for every later task.
So a graph's size does not grow with the reference, and a reference is read from disk
at most once per process (the driver's copy is never pickled into the graph).

This module knows nothing about the reference format: callers give a loader.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import threading
from collections.abc import Callable
from typing import Any

_CACHE: dict[tuple, Any] = {}
_LOCKS: dict[tuple, threading.Lock] = {}
_GUARD = threading.Lock()
LOADS: dict[tuple, int] = {}  # how many times each key was loaded in this process (1 when the cache works)


def digest(checksums: dict) -> str:
    """A short digest of a reference's file checksums: the identity a handle carries."""
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()[:32]


def cached(key: tuple, loader: Callable[[], Any]) -> Any:
    """``loader()``'s value, computed once per process for ``key`` (threads wait for the first load)."""
    try:
        return _CACHE[key]
    except KeyError:
        pass
    with _GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            _CACHE[key] = loader()
            LOADS[key] = LOADS.get(key, 0) + 1
        return _CACHE[key]


def put(key: tuple, value: Any) -> None:
    """Seed the cache (the driver already holds the reference it loaded)."""
    with _GUARD:
        _CACHE.setdefault(key, value)


def clear() -> None:
    """Forget every cached reference of this process (tests; freeing memory)."""
    with _GUARD:
        _CACHE.clear()
        _LOCKS.clear()
        LOADS.clear()


def graph_bytes(*collections) -> int:
    """Bytes of the pickled task graph of ``collections`` as one submission would carry it
    (cloudpickle, as distributed serialises tasks)."""
    import cloudpickle
    import dask

    items = [c for c in collections if dask.is_dask_collection(c)]
    for c in collections:
        if isinstance(c, (list, tuple)):
            items.extend(x for x in c if dask.is_dask_collection(x))
    dsk: dict = {}
    for c in items:
        dsk.update(dict(c.__dask_graph__()))
    if not dsk:
        return 0
    return len(cloudpickle.dumps(dsk, protocol=pickle.HIGHEST_PROTOCOL))
