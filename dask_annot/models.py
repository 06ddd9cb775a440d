"""The model catalogue: built-in models, loading any kind of model, and the defaults.

Two kinds share the versioned reference format (:mod:`dask_annot.reference`): ``knn``
(reference cells, PCA and index; the 10x Cloud analogue) and ``markers`` (Cell
Ontology terms with marker genes; the Azimuth analogue). This module is the one place
that knows both.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from .errors import ConfigError, ReferenceArtifactError
from .reference import load_reference

BUILTIN_DIR = "data/models"


def builtin_models() -> dict[str, Path]:
    """Built-in model name -> directory inside the installed package."""
    root = resources.files("dask_annot").joinpath(BUILTIN_DIR)
    out: dict[str, Path] = {}
    if root.is_dir():
        for d in sorted(root.iterdir(), key=lambda x: x.name):
            if d.joinpath("reference.json").is_file():
                out[d.name] = Path(str(d))
    return out


def model_kind(path: str | os.PathLike) -> str:
    """The ``kind`` a reference directory declares (``knn`` when it says nothing)."""
    meta_path = Path(path) / "reference.json"
    try:
        return str(json.loads(meta_path.read_text()).get("kind", "knn"))
    except (OSError, ValueError) as exc:
        raise ReferenceArtifactError(
            f"{meta_path}: not a readable dask-annot reference ({exc}); build one with `dask-annot build-reference` "
            "or pass a built-in model name (see `dask-annot models`)"
        ) from exc


def load_model(path: str | os.PathLike):
    """Load a model of any kind from its directory."""
    kind = model_kind(path)
    if kind == "knn":
        return load_reference(path)
    if kind == "markers":
        from .markers import load_marker_model

        return load_marker_model(path)
    raise ReferenceArtifactError(f"{path}: model kind '{kind}' is not known to this dask-annot; upgrade dask-annot or rebuild the model")


def resolve_model(spec: str):
    """A model from a built-in name or a reference directory path."""
    builtins = builtin_models()
    if spec in builtins:
        return load_model(builtins[spec])
    p = Path(spec)
    if p.exists():
        return load_model(p)
    raise ConfigError(
        f"--cell-annotation-model '{spec}': neither a built-in model ({', '.join(builtins) or 'none installed'}) "
        "nor a reference directory; use `dask-annot models` to list them"
    )
