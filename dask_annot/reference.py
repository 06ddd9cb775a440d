"""Reference models: the artifact on disk and loading it to annotate against (built by :mod:`dask_annot.build`).

A reference is a directory, a frozen versioned artifact::

    REF_DIR/reference.json   format, version, name, species, parameters, labels and
                             their Cell Ontology levels, datasets, checksums
    REF_DIR/arrays.npz       genes (ids, symbols), per-gene mean/std, PCA loadings,
                             embedding of every reference cell, label and dataset codes
    REF_DIR/index.pkl        pynndescent index (large references only); rebuilt from
                             the embedding and seed when it cannot be unpickled

It is fitted small on the driver (streaming sums, HVGs, PCA) and applied big on
the workers: :class:`Model` holds what the block kernels need and is shipped to
each worker once.
"""
from __future__ import annotations

import json
import os
import pickle
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import refcache
from .errors import ReferenceArtifactError, check_format
from .knn import SHARD_DIR, Shard, build_ann_index, screen_arrays, shards_of, unit_rows
from .ontology import Levels

FORMAT = "dask-annot-reference"
FORMAT_VERSION = 2
MISSING_LABELS = frozenset({"", "nan", "NaN", "None", "<NA>"})


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded kNN reference: everything the normalize/project/knn/vote kernels need.

    ``universe_ids`` / ``universe_names``: every gene of the reference's input (a query is
    scaled by its total over these); ``hvg_index``: the selected genes (PCA input) in it.
    """

    name: str
    version: str
    species: str
    path: str
    universe_ids: np.ndarray
    universe_names: np.ndarray
    hvg_index: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    loadings: np.ndarray
    embedding: np.ndarray
    label_codes: np.ndarray
    labels: tuple[str, ...]
    levels: tuple[Levels, ...]
    dataset_codes: np.ndarray
    datasets: tuple[str, ...]
    meta: dict = field(repr=False)
    extra: dict = field(default_factory=dict, repr=False)  # arrays of optional sections, e.g. conf_* (dask_annot.confidence)
    target_sum: float = 1e4
    clip: float = 10.0

    kind = "knn"

    @property
    def gene_ids(self) -> np.ndarray:
        """Ids of the selected genes (the PCA's input), in loading order."""
        return self.universe_ids[self.hvg_index]

    @property
    def gene_names(self) -> np.ndarray:
        return self.universe_names[self.hvg_index]

    @property
    def n_cells(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def n_pcs(self) -> int:
        return int(self.loadings.shape[1])

    @cached_property
    def loadings64(self) -> np.ndarray:
        return self.loadings.astype(np.float64)

    @cached_property
    def embedding64(self) -> np.ndarray:
        return self.embedding.astype(np.float64)

    @cached_property
    def embedding_unit(self) -> np.ndarray:
        """Reference cells on the unit sphere: kNN uses cosine (angular) distance."""
        return unit_rows(self.embedding64)

    @cached_property
    def class_sizes(self) -> np.ndarray:
        return np.bincount(self.label_codes, minlength=len(self.labels))

    @cached_property
    def shards(self) -> tuple[Shard, ...]:
        """The reference's shards (each with its own files; empty when unsharded)."""
        return shards_of(self.meta, self.path)

    @property
    def has_ivf(self) -> bool:
        return bool(self.shards) and all(s.has_ivf for s in self.shards)

    def ann_index(self):
        """The pynndescent index, unpickled once per process (rebuilt if it cannot be)."""
        return _ann_index(self)

    @cached_property
    def screen_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """For the exact search's float32 screen: the unit embedding transposed
        (PCs x cells), and the same for about 2,048 evenly spaced cells."""
        return screen_arrays(self.embedding_unit)

    @property
    def handle(self) -> tuple[str, str] | None:
        """What a task graph carries instead of the model: (directory, digest of its files'
        checksums); ``None`` for a model with no artifact on disk (pickled whole)."""
        checksums = self.meta.get("checksums") if isinstance(self.meta, dict) else None
        if not checksums or not (Path(self.path) / "reference.json").is_file():
            return None
        return (self.path, refcache.digest(checksums))

    def __reduce__(self):
        """Pickled as a handle: the receiving process loads the reference from its path once
        (see :mod:`dask_annot.refcache`), so graphs stay small whatever the reference size."""
        handle = self.handle
        if handle is None:
            return (_model_from_state, (self.__getstate__(),))
        refcache.put(("model", *handle), self)
        return (model_from_handle, handle)

    def __getstate__(self):
        state = self.__dict__.copy()  # caches (and indexes) are rebuilt where the model lands
        for key in ("loadings64", "embedding64", "embedding_unit", "screen_arrays", "shards"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


def _model_from_state(state: dict) -> Model:
    model = object.__new__(Model)
    model.__setstate__(state)
    return model


def model_from_handle(path: str, digest: str) -> Model:
    """The reference at ``path``, loaded once per process; refuses one whose files changed
    since the handle was made (the run would otherwise mix two references)."""
    model = refcache.cached(("model", path, digest), lambda: load_reference(path))
    found = refcache.digest(model.meta.get("checksums", {}))
    if found != digest:
        raise ReferenceArtifactError(f"{path}: the reference changed on disk while the run was using it "
                                     f"(checksums {found} != {digest}); run annotate again")
    return model


_INDEX_BYTES: dict[tuple[str, str], bytes] = {}
_INDEX_CACHE: dict[tuple[str, str, int], object] = {}
_INDEX_LOCK = threading.Lock()


def _ann_index(model: Model):
    """One index object per (reference, thread): pynndescent's search writes to
    buffers held by the index, so threads must not share one. The pickled index
    is read (or, if it cannot be unpickled here, rebuilt from the embedding and
    seed) once per process."""
    ref_key = (model.path, model.meta.get("checksums", {}).get("index.pkl", ""))
    key = (*ref_key, threading.get_ident())
    with _INDEX_LOCK:
        if key in _INDEX_CACHE:
            return _INDEX_CACHE[key]
        blob = _INDEX_BYTES.get(ref_key)
        if blob is None:
            blob = _index_bytes(model)
            _INDEX_BYTES[ref_key] = blob
    index = pickle.loads(blob)
    with _INDEX_LOCK:
        _INDEX_CACHE[key] = index
    return index


def _index_bytes(model: Model) -> bytes:
    p = Path(model.path) / "index.pkl"
    if p.exists():
        blob = p.read_bytes()
        try:
            pickle.loads(blob)
            return blob
        except Exception:  # another pynndescent/numba version: rebuild below
            pass
    knn = model.meta["knn"]
    index = build_ann_index(model.embedding, seed=int(knn["seed"]), n_neighbors=int(knn["n_neighbors"]))
    return pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)


def _sha256(path: Path) -> str:
    from .store import file_fingerprint

    return file_fingerprint(path)["sha256"]


def read_artifact(path: str | os.PathLike, *, kind: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The checked ``reference.json`` and ``arrays.npz`` of a reference directory of any kind
    (format name and version, checksums of every file it lists; ``kind`` if given)."""
    p = Path(path)
    meta_path = p / "reference.json"
    if not meta_path.is_file():
        raise ReferenceArtifactError(
            f"{p}: not a dask-annot reference (no reference.json); build one with `dask-annot build-reference` "
            "or pass a built-in model name (see `dask-annot models`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ReferenceArtifactError(f"{meta_path}: cannot be read as JSON ({exc}); rebuild the reference") from exc
    check_format(meta, format=FORMAT, version=FORMAT_VERSION, where=str(p),
                 remedy="rebuild it with `dask-annot build-reference`", error=ReferenceArtifactError)
    if kind is not None and meta.get("kind") != kind:
        raise ReferenceArtifactError(f"{p}: a '{meta.get('kind')}' model, expected a '{kind}' model")
    for name, digest in meta.get("checksums", {}).items():
        if name.startswith(f"{SHARD_DIR}/"):
            continue  # checked by the process that maps the shard (knn.Shard), not by every loader
        f = p / name
        if not f.is_file() or _sha256(f) != digest:
            raise ReferenceArtifactError(f"{f}: missing or its checksum differs from reference.json; the reference is damaged, rebuild it")
    try:
        with np.load(p / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ReferenceArtifactError(f"{p / 'arrays.npz'}: cannot be read ({exc}); rebuild the reference") from exc
    return meta, arrays


def load_reference(path: str | os.PathLike) -> Model:
    """Load and check a kNN reference directory (format, version, kind, checksums)."""
    p = Path(path)
    meta, arrays = read_artifact(p, kind="knn")
    labels = tuple(meta["labels"])
    levels = tuple(Levels(**lv) for lv in meta["levels"])
    norm = meta["normalization"]
    return Model(
        name=meta["name"], version=str(meta["version"]), species=meta.get("species", "unknown"), path=str(p.resolve()),
        universe_ids=arrays["universe_ids"].astype(object), universe_names=arrays["universe_names"].astype(object),
        hvg_index=arrays["hvg_index"].astype(np.int64),
        mean=arrays["mean"], std=arrays["std"], loadings=arrays["loadings"], embedding=arrays["embedding"],
        label_codes=arrays["label_codes"], labels=labels, levels=levels,
        dataset_codes=arrays["dataset_codes"], datasets=tuple(meta["datasets"]), meta=meta,
        extra={k: v for k, v in arrays.items() if k.startswith("conf_")},
        target_sum=float(norm["target_sum"]), clip=float(norm["clip"]),
    )
