"""Cell Ontology levels: a fine label's coarse and broad display nodes.

10x maps each fine label to a curated coarse "display node" and a broad type; those
tables are not public, so dask-annot keeps its own (``data/display_nodes.csv``).
A term's coarse (broad) type is its nearest ancestor, itself included, among the
coarse (broad) display nodes, using the ancestor distances of the Cell Ontology
release shipped in ``data/`` (CC BY 4.0, obophenotype/cell-ontology).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import ConfigError

CL_RELEASE = "2026-03-26"


@lru_cache(maxsize=1)
def cell_ontology() -> dict[str, dict]:
    """id -> {label, ancestors: {id: distance}} for the shipped Cell Ontology release."""
    with resources.files("dask_annot").joinpath(f"data/cl-{CL_RELEASE}-slim.json.gz").open("rb") as fh:
        return json.loads(gzip.decompress(fh.read()))


@lru_cache(maxsize=1)
def display_nodes() -> dict[str, list[tuple[str, str]]]:
    """level ('coarse' / 'broad') -> [(CL id, display name)] in file order."""
    out: dict[str, list[tuple[str, str]]] = {"coarse": [], "broad": []}
    with resources.files("dask_annot").joinpath("data/display_nodes.csv").open("r") as fh:
        for row in csv.DictReader(fh):
            out[row["level"]].append((row["ontology_id"], row["display_name"]))
    return out


@dataclass(frozen=True)
class Levels:
    """The hierarchy of one fine label."""

    fine: str
    coarse: str
    broad: str
    ontology_id: str | None

    @property
    def path(self) -> str:
        """``broad|coarse|fine`` with consecutive repeats folded."""
        parts: list[str] = []
        for p in (self.broad, self.coarse, self.fine):
            if not parts or parts[-1] != p:
                parts.append(p)
        return "|".join(parts)


def _nearest(term: str, level: str) -> str | None:
    cl = cell_ontology()
    ancestors = dict(cl[term]["ancestors"])
    ancestors[term] = 0
    best: tuple[int, int, str] | None = None
    for order, (node, name) in enumerate(display_nodes()[level]):
        if node in ancestors:
            cand = (ancestors[node], order, name)
            if best is None or cand < best:
                best = cand
    return best[2] if best else None


def levels_for(label: str, ontology_id: str | None) -> Levels:
    """Coarse and broad levels of a label mapped (or not) to a CL term.

    The fine name is the CL term's label when mapped; without a mapping,
    coarse = broad = fine.
    """
    if not ontology_id:
        return Levels(fine=label, coarse=label, broad=label, ontology_id=None)
    cl = cell_ontology()
    if ontology_id not in cl:
        raise ConfigError(
            f"ontology id '{ontology_id}' (label '{label}') is not in the Cell Ontology release {CL_RELEASE}; "
            "fix the --ontology-map entry (ids look like CL:0000236)"
        )
    fine = cl[ontology_id]["label"]
    coarse = _nearest(ontology_id, "coarse") or fine
    broad = _nearest(ontology_id, "broad") or coarse
    return Levels(fine=fine, coarse=coarse, broad=broad, ontology_id=ontology_id)


def read_ontology_map(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``label,ontology_id`` CSV (header required) into a dict."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: ontology map not found; pass a CSV with columns label,ontology_id")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"label", "ontology_id"} <= set(reader.fieldnames):
            raise ConfigError(f"{p}: the ontology map needs a header 'label,ontology_id', found {reader.fieldnames}")
        return {row["label"]: row["ontology_id"].strip() for row in reader if row["ontology_id"].strip()}
