"""Settings: one YAML of defaults in ``dask.config`` under ``annot``, resolved once.

Precedence: command-line flag > dask config / ``DASK_ANNOT__*`` environment > defaults.
The resolved :class:`Settings` is frozen and passed explicitly; nothing reads the
global config after that.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import dask.config
import yaml

from .errors import ConfigError

_defaults: dict | None = None


def _ensure_defaults() -> dict:
    """Merge the package defaults under ``dask.config`` once (what a user set, in YAML,
    the environment or with ``dask.config.set``, stays on top); returns them."""
    global _defaults
    if _defaults is None:
        with resources.files("dask_annot").joinpath("annotate.yaml").open("r") as fh:
            _defaults = yaml.safe_load(fh)
        dask.config.update_defaults(_defaults)
    return _defaults


def _from_config(key: str, default: Any) -> Any:
    """``annot.<key>`` from dask.config; a ``DASK_ANNOT__<KEY>`` environment variable set after
    dask was imported (dask reads the environment once, at import) counts when the config
    still holds the package default."""
    value = dask.config.get(f"annot.{key}", default=default)
    env = os.environ.get(f"DASK_ANNOT__{key.upper().replace('-', '_')}")
    packaged = (_ensure_defaults().get("annot") or {}).get(key, default)
    if env is not None and value == packaged:
        return yaml.safe_load(env)
    return value


@dataclass(frozen=True)
class Settings:
    k: int = 500
    chunk_cells: int = 10_000
    knn_method: str = "auto"
    ann_epsilon: float = 0.2
    layout: str = "cloud"
    consensus: str = "auto"
    reject: str = "auto"
    scheduler: str = "auto"
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    min_cells: int = 100
    max_cells: int = 1_200_000
    force: bool = False
    cluster_config: str | None = None
    worker_timeout: float | None = None
    job_options: dict = field(default_factory=dict)
    organs: tuple = ()  # marker models: only the cell types of these organs are candidates (--organ)


def resolve(**flags: Any) -> Settings:
    """Settings from flags (``None`` = not given) over config over defaults, checked."""
    _ensure_defaults()
    values = {}
    for f in dataclasses.fields(Settings):
        flag = flags.get(f.name)
        if flag is not None:
            values[f.name] = flag
            continue
        if f.name in ("force", "job_options"):
            values[f.name] = False if f.name == "force" else {}
            continue
        values[f.name] = _from_config(f.name.replace("_", "-"), f.default)
    s = Settings(**values)
    if int(s.k) < 1:
        raise ConfigError(f"--k must be at least 1, got {s.k}")
    if int(s.chunk_cells) < 1:
        raise ConfigError(f"--chunk-cells must be at least 1, got {s.chunk_cells}")
    if s.knn_method not in ("auto", "exact", "ann", "ivf"):
        raise ConfigError(f"--knn-method must be auto, exact, ivf or ann, got '{s.knn_method}'")
    if s.consensus not in ("auto", "spread", "none"):
        raise ConfigError(f"--consensus must be auto, spread or none, got '{s.consensus}'")
    if s.reject not in ("auto", "none"):
        raise ConfigError(f"--reject must be auto or none, got '{s.reject}'")
    if s.layout not in ("cloud", "hierarchical"):
        raise ConfigError(f"--layout must be cloud or hierarchical, got '{s.layout}'")
    return dataclasses.replace(s, k=int(s.k), chunk_cells=int(s.chunk_cells), organs=_organ_list(s.organs))


def _organ_list(value: Any) -> tuple:
    """``--organ`` / ``organs:`` as a tuple of lower-case names (a comma-separated string or a list)."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ConfigError(f"organs: give organ names as a list or a comma-separated string, got {value!r}")
    return tuple(dict.fromkeys(x.strip().lower() for x in items if x.strip()))
