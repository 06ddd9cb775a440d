"""Nearest reference cells of each query cell, in the reference PCA space.

Distances are between embeddings scaled to unit length (cosine, or angular,
distance): a cell's depth and quality shift its embedding along a common
direction, which the angle ignores (measured on the PBMC data: +2 to +6 points
of accuracy over Euclidean). Two searches, chosen per reference size: exact (a
float32 BLAS screen, then float64 re-scoring of the few per cent of candidates)
and approximate (pynndescent, for references above 400,000 cells). Each block kernel is pure and
row-wise, so a cell's neighbours do not depend on which chunk it is in.
Results are a record array per cell: ``idx`` (int32, -1 where no neighbour was
found) and ``dist`` (float32, ``inf`` there), sorted by (distance, index).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal

import dask
import dask.array as da
import numba
import numpy as np

from . import refcache
from .errors import ReferenceArtifactError
from .normalize import check_cell_chunked

Method = Literal["exact", "ann", "ivf"]
EXACT_MAX_REFERENCE_CELLS = 400_000
ANN_BATCH_CELLS = 2048
# exact search: query cells per BLAS tile, reference cells per tile, and the screen
_Q_TILE = 256
_R_TILE = 8192
_SCREEN_SAMPLE = 2048  # reference cells (evenly spaced) that set each query's screening threshold
_SCREEN_MARGIN = 1e-4  # screen below the threshold by this much (float32 dot error is < 2e-6)
_F32_DOT_ERROR = 1e-5  # a bound on |float32 BLAS dot - float64 dot| for unit vectors of <= 100 dims


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def neighbor_dtype(k: int) -> np.dtype:
    return np.dtype([("idx", np.int32, (k,)), ("dist", np.float32, (k,))])


def choose_method(n_reference_cells: int, requested: str = "auto", *, has_ivf: bool = False) -> Method:
    """The search for a reference size: ``exact`` up to :data:`EXACT_MAX_REFERENCE_CELLS`
    reference cells, above it ``ivf`` when the reference has inverted lists (see
    :func:`shard_files`), else ``ann`` (pynndescent).

    Measured against a 100,000-cell reference at k=500, one thread per chunk
    (benchmarks/bench_scale.py): exact 2.9 s per 10k query cells; faiss' flat index
    (float32) took 8.8 s, pynndescent 12.2 s. The exact search releases the GIL, so
    it scales with Dask threads; pynndescent's search does not.
    """
    if requested in ("exact", "ann", "ivf"):
        return requested  # type: ignore[return-value]
    if requested not in ("auto", None):
        raise ValueError(f"unknown kNN method {requested!r}: auto, exact, ivf or ann")
    if n_reference_cells <= EXACT_MAX_REFERENCE_CELLS:
        return "exact"
    return "ivf" if has_ivf else "ann"


def screen_arrays(embedding_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact search's float32 screen: the unit embedding transposed (PCs x cells),
    and the same for about :data:`_SCREEN_SAMPLE` evenly spaced reference cells."""
    t = np.ascontiguousarray(np.asarray(embedding_unit).T, dtype=np.float32)
    step = max(1, t.shape[1] // _SCREEN_SAMPLE)
    return t, np.ascontiguousarray(t[:, ::step])


@numba.njit(nogil=True, cache=True)
def _screen_tile(dots, floor, offset, q64, ref64, cand, cval, count):  # pragma: no cover - compiled
    """Keep, for each query, the reference cells of this tile whose float32 dot is >= its
    floor, re-scored in float64 in a fixed order (while the tile is in cache)."""
    n, m = dots.shape
    d = q64.shape[1]
    cap = cand.shape[1]
    for i in range(n):
        f = floor[i]
        c = count[i]
        for j in range(m):
            if dots[i, j] >= f:
                if c < cap:
                    r = offset + j
                    s = 0.0
                    for t in range(d):
                        s += q64[i, t] * ref64[r, t]
                    cand[i, c] = r
                    cval[i, c] = s
                c += 1
        count[i] = c


@numba.njit(nogil=True, cache=True)
def _full_dots(q64, ref64):  # pragma: no cover - compiled
    """Float64 dots in the same fixed order as :func:`_screen_tile` (the rare full search)."""
    n, d = q64.shape
    out = np.empty((n, ref64.shape[0]), np.float64)
    for i in range(n):
        for r in range(ref64.shape[0]):
            s = 0.0
            for t in range(d):
                s += q64[i, t] * ref64[r, t]
            out[i, r] = s
    return out


def _top_k_rows(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest ``vals`` ordered by (value descending, index ascending).

    ``idx`` must increase along each row, so that among values tied with the k-th
    the first columns are the lowest indices: the selection then does not depend
    on the row's width or on how a partition orders ties.
    """
    if vals.shape[1] > k:
        kth = -np.partition(-vals, k - 1, axis=1)[:, k - 1 : k]
        above = vals > kth
        tied = vals == kth
        need = k - above.sum(axis=1, keepdims=True)
        take = above | (tied & (np.cumsum(tied, axis=1) <= need))
        rows, cols = np.nonzero(take)  # row-major: exactly k per row, columns ascending
        cols = cols.reshape(vals.shape[0], k)
        vals = np.take_along_axis(vals, cols, axis=1)
        idx = np.take_along_axis(idx, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # columns ascend in index: ties stay by index
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _exact_block(q: np.ndarray, model, k: int) -> np.ndarray:
    """Exact k nearest reference cells as neighbour records (see :func:`_exact_top`)."""
    n_ref = np.asarray(model.embedding_unit).shape[0]
    vals, ids = _exact_top(q, model, min(k, n_ref))
    return _records_from_dots(vals, ids, k)


def _records_from_dots(vals: np.ndarray, ids: np.ndarray, k_out: int) -> np.ndarray:
    """Neighbour records from float64 cosine similarities ordered by (value desc, index asc)."""
    n, k = vals.shape
    out = np.empty(n, dtype=neighbor_dtype(k_out))
    found = np.isfinite(vals)
    out["idx"][:, :k] = np.where(found, ids, -1)
    out["dist"][:, :k] = np.where(found, np.sqrt(np.maximum(2.0 - 2.0 * np.where(found, vals, 1.0), 0.0)), np.inf)
    out["idx"][:, k:] = -1
    out["dist"][:, k:] = np.inf
    return out


def _exact_top(q: np.ndarray, model, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest reference cells (cosine), in float64, ties by reference index.

    A float32 BLAS pass over the whole reference screens candidates: each query's
    threshold is its ``m``-th best dot among :data:`_SCREEN_SAMPLE` evenly spaced
    reference cells, with ``m`` set so about 2k reference cells pass; every cell
    above threshold minus a margin is kept (a few per cent of the reference).
    Candidates are then re-scored in float64 in a fixed order (numba), and the
    screen is checked to have kept the true top k (else that query is searched in
    full). The float32 values vary with BLAS tiling and thread count, the result
    does not: it is the float64 top k whatever the chunking, scheduler or BLAS.
    """
    ref64 = np.ascontiguousarray(model.embedding_unit)  # a no-op on the Model's (C-ordered) array
    n_ref = ref64.shape[0]
    k = min(k, n_ref)
    q64 = np.ascontiguousarray(unit_rows(np.asarray(q, dtype=np.float64)))
    ref_t32, sample_t32 = model.screen_arrays
    n = q64.shape[0]
    n_sample = sample_t32.shape[1]
    stride = n_ref / n_sample
    m = int(np.ceil(2 * k / stride)) + 2
    cap = int(min(n_ref, max(4096, 8 * k)))
    out_idx = np.empty((n, k), np.int64)
    out_val = np.empty((n, k), np.float64)
    for lo in range(0, n, _Q_TILE):
        qs64 = q64[lo : lo + _Q_TILE]
        qs = qs64.astype(np.float32)
        nq = qs.shape[0]
        if m >= n_sample:
            floor = np.full(nq, -np.inf, dtype=np.float32)
            sure = np.full(nq, -np.inf)
        else:
            sd = qs @ sample_t32
            thr = -np.partition(-sd, m - 1, axis=1)[:, m - 1].astype(np.float64)
            floor = (thr - _SCREEN_MARGIN).astype(np.float32)
            sure = floor.astype(np.float64) + _F32_DOT_ERROR
        cand = np.empty((nq, cap), np.int32)
        cval = np.empty((nq, cap), np.float64)
        count = np.zeros(nq, np.int64)
        for r0 in range(0, n_ref, _R_TILE):
            _screen_tile(qs @ ref_t32[:, r0 : r0 + _R_TILE], floor, r0, qs64, ref64, cand, cval, count)
        width = int(min(cap, max(k, count.max())))
        pos = np.arange(width)
        keep = pos[None, :] < count[:, None]
        vals = np.where(keep, cval[:, :width], -np.inf)
        ids = np.where(keep, cand[:, :width], np.iinfo(np.int32).max)
        vals, ids = _top_k_rows(vals, ids, k)
        # the screen kept the true top k if the k-th best is above the floor + the float32 error
        redo = np.flatnonzero((count > cap) | (count < k) | (vals[:, k - 1] < sure))
        if redo.size:
            full = _full_dots(qs64[redo], ref64)
            vals[redo], ids[redo] = _top_k_rows(full, np.broadcast_to(np.arange(n_ref, dtype=np.int32), full.shape), k)
        out_idx[lo : lo + nq] = ids
        out_val[lo : lo + nq] = vals
    return out_val, out_idx + np.int64(offset)


def exact_search(q: np.ndarray, ref_unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_exact_top` of ``q`` among the unit rows ``ref_unit`` (float64 similarities and
    indices, ties by index), in memory bounded by its tiles whatever the reference size."""
    from types import SimpleNamespace

    return _exact_top(q, SimpleNamespace(embedding_unit=ref_unit, screen_arrays=screen_arrays(ref_unit)), k)


def records_from_dots(vals: np.ndarray, ids: np.ndarray, k_out: int) -> np.ndarray:
    """Neighbour records (:func:`neighbor_dtype`) from float64 cosine similarities ordered by
    (value desc, index asc); missing entries (-inf) become index -1, distance inf."""
    return _records_from_dots(vals, ids, k_out)


def _sorted_records(idx, dist, k: int) -> np.ndarray:
    """Neighbour records sorted by (distance, index); missing neighbours (index < 0 or a
    non-finite distance) last, as index -1 and distance inf."""
    idx = np.asarray(idx, dtype=np.int64).copy()
    dist = np.asarray(dist, dtype=np.float64).copy()
    bad = ~np.isfinite(dist) | (idx < 0)
    dist[bad] = np.inf
    idx[bad] = np.iinfo(np.int32).max
    order = np.lexsort((idx, dist), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    idx[~np.isfinite(dist)] = -1
    out = np.empty(idx.shape[0], dtype=neighbor_dtype(k))
    out["idx"] = idx
    out["dist"] = dist.astype(np.float32)
    return out


def _ann_block(q: np.ndarray, model, k: int, epsilon: float) -> np.ndarray:
    idx, dist = model.ann_index().query(unit_rows(q).astype(np.float32), k=k, epsilon=epsilon)
    return _sorted_records(idx, dist, k)


def _neighbors_block(q: np.ndarray, model, k: int, method: str, epsilon: float) -> np.ndarray:
    if q.shape[0] == 0:
        return np.empty(0, dtype=neighbor_dtype(k))
    if method == "exact":
        return _exact_block(q, model, k)
    return _ann_block(q, model, k, epsilon)


def neighbors(emb: da.Array, model, *, k: int, method: Method, epsilon: float = 0.2) -> da.Array:
    """Lazy per-cell record array of the ``k`` nearest reference cells.

    pynndescent's serial search carries one random state through a batch, so a
    cell's approximate neighbours depend on its place in the batch. The ANN
    search therefore runs on fixed batches of :data:`ANN_BATCH_CELLS` cells at
    fixed positions of the matrix, whatever ``--chunk-cells`` or the number of
    workers. The exact search's result does not depend on the batch (see
    :func:`_exact_block`) and keeps the given chunks.
    """
    check_cell_chunked(emb, "neighbors")
    if method == "ann":
        from .store import cell_chunks

        emb = emb.rechunk({0: cell_chunks(emb.shape[0], ANN_BATCH_CELLS), 1: -1})
    return da.map_blocks(
        _neighbors_block, emb, model, k, method, epsilon,
        dtype=neighbor_dtype(k), chunks=(emb.chunks[0],), drop_axis=1,
        meta=np.empty(0, dtype=neighbor_dtype(k)),
    )


def neighbourhood(k: int, n_reference_cells: int) -> tuple[int, str]:
    """The neighbourhood actually used for a requested ``k``, and the rule that set it.

    10x votes among 500 neighbours in references of tens of millions of cells.
    In a small reference, 500 cells are a large share of it and the biggest
    classes win every vote (measured on the PBMC data: 0.52 accuracy at k=500
    against 0.95 at k=30 with a 2,150-cell reference). So a neighbourhood never
    exceeds 1% of the reference (and never falls below 15 cells): from 50,000
    reference cells up, k=500 is used as requested.
    """
    cap = max(15, n_reference_cells // 100)
    if k <= cap:
        return k, "as requested"
    return min(k, cap, n_reference_cells), f"small reference: k capped at max(15, 1% of {n_reference_cells} reference cells)"


def build_ann_index(embedding: np.ndarray, *, seed: int, n_neighbors: int = 30):
    """A pynndescent index over the reference embedding, deterministic for a seed."""
    from pynndescent import NNDescent

    index = NNDescent(
        unit_rows(embedding).astype(np.float32), metric="euclidean", n_neighbors=n_neighbors,
        random_state=seed, n_jobs=1, low_memory=True, compressed=False, parallel_batch_queries=False,
    )
    index.prepare()
    return index


# --------------------------------------------------------------------------------------
# Shards and inverted lists (IVF): references larger than one process's memory
# --------------------------------------------------------------------------------------
SHARD_DIR = "shards"
IVF_CENTROIDS = f"{SHARD_DIR}/ivf_centroids.npy"
DEFAULT_PROBES = 48  # recall@500 0.998 vs 0.973 at 24 (200k simulated reference, 200 lists, 2,000 queries: benchmarks/results/atlas_probes.json)


def default_probes(n_lists: int) -> int:
    """Lists probed per query: at least :data:`DEFAULT_PROBES`, and a tenth of the lists.
    Measured (simulated PBMC, k=500, lists of ~1,000 cells): 200 lists, 48 probes: recall@500
    0.998; 1,000 lists: 48 probes 0.965, 64 0.983, 96 0.995, 128 0.998 (benchmarks/results/atlas.md),
    at about the same CPU (the per-query costs that do not grow with probes dominate there).
    Beyond 1,000 lists the tenth is an extrapolation; ``--ivf-probes`` sets it."""
    return int(min(n_lists, max(DEFAULT_PROBES, round(n_lists / 10))))
_KMEANS_SAMPLE = 100_000
_KMEANS_ITER = 12


@dataclass(frozen=True)
class Shard:
    """Reference cells ``start:stop`` with their own files, searched on their own.

    This is what a task graph carries (a path, numbers and checksums): each process
    memory-maps the shard's arrays once (:mod:`dask_annot.refcache`) and reuses them.
    """

    path: str
    number: int
    start: int
    stop: int
    checksums: tuple[tuple[str, str], ...]  # (file name, sha256) of the files the shard reads

    def _array(self, name: str) -> np.ndarray:
        digest = dict(self.checksums)[name]
        return refcache.cached(("shard", self.path, name, digest), lambda: _load_checked(os.path.join(self.path, name), digest))

    @property
    def embedding_unit(self) -> np.ndarray:
        return self._array(shard_file("unit", self.number))

    @property
    def screen_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        name = shard_file("unit", self.number)
        key = ("shard-screen", self.path, name, dict(self.checksums)[name])
        return refcache.cached(key, lambda: screen_arrays(self.embedding_unit))

    @property
    def has_ivf(self) -> bool:
        return IVF_CENTROIDS in dict(self.checksums)

    def by_list32(self) -> np.ndarray:
        """This shard's unit embedding in list order, float32 (the IVF screen's operand)."""
        name = shard_file("members", self.number)
        key = ("shard-bylist32", self.path, name, dict(self.checksums)[name])
        return refcache.cached(key, lambda: np.ascontiguousarray(np.asarray(self.embedding_unit)[np.asarray(self.ivf()[1])], dtype=np.float32))

    def by_list64(self) -> np.ndarray:
        """This shard's unit embedding in list order, float64 (the IVF re-scoring reads it
        list by list instead of jumping across the whole embedding)."""
        name = shard_file("members", self.number)
        key = ("shard-bylist64", self.path, name, dict(self.checksums)[name])
        return refcache.cached(key, lambda: np.ascontiguousarray(np.asarray(self.embedding_unit)[np.asarray(self.ivf()[1])]))

    def ivf(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global list centroids (lists x PCs, unit, float64); this shard's members of each
        list (local indices, ascending within a list) and list offsets."""
        return (self._array(IVF_CENTROIDS), self._array(shard_file("members", self.number)),
                self._array(shard_file("offsets", self.number)))


def _load_checked(path: str, digest: str) -> np.ndarray:
    """A shard file, memory-mapped, after checking its sha256 against the reference's record:
    shard files are checked here, by the process that maps them, not when the reference is
    loaded (a worker holding one shard never reads the others)."""
    from .store import file_fingerprint

    try:
        found = file_fingerprint(path)["sha256"]
    except OSError as exc:
        raise ReferenceArtifactError(f"{path}: cannot be read ({exc}); the reference is damaged, rebuild it") from exc
    if found != digest:
        raise ReferenceArtifactError(f"{path}: its checksum differs from reference.json; the reference is damaged, rebuild it")
    return np.load(path, mmap_mode="r")


def shard_file(kind: str, number: int) -> str:
    return f"{SHARD_DIR}/{kind}_{number:05d}.npy"


def shards_of(meta: dict, path: str) -> tuple[Shard, ...]:
    """The shards a reference's ``reference.json`` lists (empty for an unsharded reference)."""
    checks = meta.get("checksums", {})
    out = []
    for i, (start, stop) in enumerate(meta.get("shards", {}).get("bounds", [])):
        names = [shard_file(kind, i) for kind in ("unit", "members", "offsets")] + [IVF_CENTROIDS]
        out.append(Shard(path=path, number=i, start=int(start), stop=int(stop),
                         checksums=tuple((n, checks[n]) for n in names if n in checks)))
    return tuple(out)


def spherical_kmeans(x_unit: np.ndarray, n_lists: int, *, seed: int) -> np.ndarray:
    """List centroids (unit, float64) of a spherical k-means on an evenly spaced sample of
    at most :data:`_KMEANS_SAMPLE` cells; deterministic for a seed (fit once at build time)."""
    step = max(1, x_unit.shape[0] // _KMEANS_SAMPLE)
    sample = np.asarray(x_unit[::step], dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_lists = min(n_lists, sample.shape[0])
    cent = sample[np.sort(rng.choice(sample.shape[0], n_lists, replace=False))].copy()
    for _ in range(_KMEANS_ITER):
        assign = _assign(sample, cent)
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, sample)
        empty = np.bincount(assign, minlength=n_lists) == 0
        sums[empty] = cent[empty]  # an empty list keeps its centroid
        cent = unit_rows(sums)
    return np.ascontiguousarray(cent)


def _assign(x: np.ndarray, cent: np.ndarray, block: int = 65_536) -> np.ndarray:
    """Index of each row's most similar centroid (float64; ties to the lowest index)."""
    out = np.empty(x.shape[0], np.int64)
    for lo in range(0, x.shape[0], block):
        out[lo : lo + block] = np.argmax(np.asarray(x[lo : lo + block], np.float64) @ cent.T, axis=1)
    return out


def shard_writers(embedding: np.ndarray, *, shard_cells: int, n_lists: int | None, seed: int,
                  centroids: np.ndarray | None = None) -> tuple[dict, dict]:
    """Files of a sharded reference (name -> writer(path)) and the ``shards`` entry of its
    reference.json. Every shard holds its cells' unit embedding (float64, memory-mappable);
    with ``n_lists``, one global spherical k-means gives inverted lists, and each shard stores
    its members of every list, so a search probes the same lists whatever the sharding.
    ``centroids``: lists of an existing reference (re-sharding it keeps its search)."""
    unit = unit_rows(embedding)
    n = unit.shape[0]
    shard_cells = max(1, int(shard_cells))
    bounds = [(lo, min(lo + shard_cells, n)) for lo in range(0, n, shard_cells)]
    files: dict = {}

    def saver(arr):
        def write(path) -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, arr)
        return write

    for i, (lo, hi) in enumerate(bounds):
        files[shard_file("unit", i)] = saver(np.ascontiguousarray(unit[lo:hi]))
    meta = {"bounds": bounds, "shard_cells": shard_cells, "ivf": None}
    if n_lists or centroids is not None:
        cent = spherical_kmeans(unit, n_lists, seed=seed) if centroids is None else np.ascontiguousarray(centroids, np.float64)
        assign = _assign(unit, cent)
        files[IVF_CENTROIDS] = saver(cent)
        for i, (lo, hi) in enumerate(bounds):
            a = assign[lo:hi]
            members, offsets = _list_members(a, cent.shape[0])
            files[shard_file("members", i)] = saver(members)
            files[shard_file("offsets", i)] = saver(offsets)
        meta["ivf"] = {"n_lists": int(cent.shape[0]), "probes": default_probes(int(cent.shape[0])), "seed": seed,
                       "kmeans": f"spherical, {_KMEANS_ITER} iterations on <= {_KMEANS_SAMPLE} evenly spaced cells"}
    return files, meta


DEFAULT_SHARD_CELLS = 1_000_000


def plan_shards(embedding: np.ndarray, *, n_cells: int, knn_method: str = "auto", shard_cells: int | None = None,
                ivf_lists: int | None = None, ivf_probes: int | None = None, seed: int = 0) -> tuple[dict, dict | None]:
    """What ``build-reference`` writes for the search: shard files and their reference.json
    entry, or nothing for an unsharded reference. A reference is sharded when asked
    (``shard_cells``, ``ivf_lists`` or ``--knn-method ivf``) or when it is larger than
    :data:`EXACT_MAX_REFERENCE_CELLS` and no pynndescent index was asked for; then it
    gets inverted lists too unless the exact search was asked for."""
    for name, v in (("--shard-cells", shard_cells), ("--ivf-lists", ivf_lists), ("--ivf-probes", ivf_probes)):
        if v is not None and v < 1:
            raise ValueError(f"{name} {v}: must be a positive number")
    big = n_cells > EXACT_MAX_REFERENCE_CELLS and knn_method in ("auto", None)
    wants_ivf = knn_method == "ivf" or ivf_lists is not None or (big and knn_method != "exact")
    if not (shard_cells or wants_ivf or big) or knn_method == "ann":
        return {}, None
    files, meta = shard_writers(embedding, shard_cells=shard_cells or DEFAULT_SHARD_CELLS,
                                n_lists=(ivf_lists or default_lists(n_cells)) if wants_ivf else None, seed=seed)
    if meta["ivf"] is not None and ivf_probes is not None:
        meta["ivf"]["probes"] = int(ivf_probes)
    return files, meta


def probes_of(meta: dict) -> int:
    """The inverted lists an IVF search probes per query (set at build time)."""
    ivf = (meta.get("shards") or {}).get("ivf") or {}
    return int(ivf.get("probes", DEFAULT_PROBES))


def default_lists(n_cells: int) -> int:
    """Inverted lists for a reference: about 1,000 cells per list (at least 1)."""
    return max(1, int(round(n_cells / 1000)))


@numba.njit(nogil=True, cache=True)
def _probe_tile(q64, cent, probes):  # pragma: no cover - compiled
    """Per query, the ``probes`` lists with the most similar centroids, most similar first
    (float64 dots in a fixed order, ties by list index)."""
    n, d = q64.shape
    n_lists = cent.shape[0]
    probes = min(probes, n_lists)
    out = np.empty((n, probes), np.int32)
    cd = np.empty(n_lists)
    sel = np.empty(n_lists, np.int64)
    for i in range(n):
        for c in range(n_lists):
            s = 0.0
            for t in range(d):
                s += q64[i, t] * cent[c, t]
            cd[c] = -s
        kth = np.partition(cd, probes - 1)[probes - 1]
        m = 0
        for c in range(n_lists):  # the lists better than the probes-th, then the tied ones by index
            if cd[c] < kth:
                sel[m] = c
                m += 1
        for c in range(n_lists):
            if m == probes:
                break
            if cd[c] == kth:
                sel[m] = c
                m += 1
        order = np.argsort(cd[sel[:probes]], kind="mergesort")
        for j in range(probes):
            out[i, j] = sel[order[j]]
    return out


def _probe_block(q: np.ndarray, shard: Shard, probes: int) -> np.ndarray:
    """The lists each query probes (int32, queries x probes), once per chunk for all shards."""
    q64 = np.ascontiguousarray(unit_rows(np.asarray(q, dtype=np.float64)))
    cent = np.asarray(shard.ivf()[0])
    if q64.shape[0] == 0:
        return np.empty((0, min(probes, cent.shape[0])), np.int32)
    return _probe_tile(q64, cent, int(probes))


_IVF_Q_TILE = 1024
_IVF_FLOOR_CELLS = 4  # x k: members of each query's nearest lists that set its screening floor
_IVF_BUFFER = 4  # x k: candidates held per query before compacting (small buffers: no page zeroing)


@numba.njit(nogil=True, cache=True)
def _scatter_vals(val32, qi, fill, dots):  # pragma: no cover - compiled
    """Append one list's float32 similarities (rows: the queries ``qi`` probing it) to each query's row."""
    width = dots.shape[1]
    for j in range(qi.shape[0]):
        i = qi[j]
        f = fill[i]
        for u in range(width):
            val32[i, f + u] = dots[j, u]
        fill[i] = f + width


@numba.njit(nogil=True, cache=True)
def _compact(cand, cval, c, k, err):  # pragma: no cover - compiled
    """Keep, of one query's ``c`` > k candidates, those within ``err`` (twice the float32
    error) of the k-th best float32 similarity among them (in place, order kept); returns
    how many are kept and that floor (float64). Every member of the float64 top k of these
    candidates is kept, and so is every later member that could still enter it."""
    kth = -np.partition(-cval[:c].astype(np.float64), k - 1)[k - 1]
    floor = kth - err
    m = 0
    for u in range(c):
        if cval[u] >= floor:
            cand[m] = cand[u]
            cval[m] = cval[u]
            m += 1
    return m, floor


@numba.njit(nogil=True, cache=True)
def _keep_list(dots, qi, floor, o0, cand, cval, count, k, err, full):  # pragma: no cover - compiled
    """Append to each query's candidates the positions (list order) and float32 similarities
    of one list's members at or above its floor (float64). A query whose buffer is full is
    compacted (:func:`_compact`), which raises its floor; one still full after that (more
    than the buffer within the error of its k-th: tied cells) is flagged in ``full`` for a
    search with a buffer as wide as its candidates."""
    cap = cand.shape[1]
    for j in range(qi.shape[0]):
        i = qi[j]
        if full[i]:
            continue
        f = floor[i]
        c = count[i]
        for u in range(dots.shape[1]):
            v = dots[j, u]
            if v >= f:
                if c == cap:
                    c, f2 = _compact(cand[i], cval[i], c, k, err)
                    f = max(f, f2)
                    if c == cap:
                        full[i] = True
                        break
                    if v < f:
                        continue
                cand[i, c] = o0 + u
                cval[i, c] = v
                c += 1
        count[i] = c
        floor[i] = f


@numba.njit(nogil=True, cache=True)
def _tighten(cand, cval, count, k, err):  # pragma: no cover - compiled
    """:func:`_compact` every query with more than k candidates (fewer are re-scored)."""
    for i in range(cand.shape[0]):
        if count[i] > k:
            count[i] = _compact(cand[i], cval[i], count[i], k, err)[0]


@numba.njit(nogil=True, cache=True)
def _rescore_lists(q64, ref64_by_list, members, cand, count, k):  # pragma: no cover - compiled
    """Per query, its ``count[i]`` candidates ``cand[i]`` (positions in list order) re-scored
    exactly in float64 (fixed order) from the list-ordered copy (memory-local), and the top k
    by (similarity desc, reference index asc, indices from ``members``): everything above the
    k-th value, then the lowest indices among those equal to it. Rows with fewer than k
    candidates pad with -inf / -1."""
    n, d = q64.shape
    out_val = np.full((n, k), -np.inf)
    out_idx = np.full((n, k), -1, np.int64)
    for i in range(n):
        m = count[i]
        if m == 0:
            continue
        vals = np.empty(m)
        ids = np.empty(m, np.int64)
        for u in range(m):
            r = cand[i, u]
            s = 0.0
            for t in range(d):
                s += q64[i, t] * ref64_by_list[r, t]
            vals[u] = s
            ids[u] = members[r]
        kk = min(k, m)
        kth = -np.partition(-vals, kk - 1)[kk - 1]
        sel_v = np.empty(kk)
        sel_i = np.empty(kk, np.int64)
        n_sel = 0
        n_tie = 0
        for u in range(m):
            if vals[u] > kth:
                sel_v[n_sel] = vals[u]
                sel_i[n_sel] = ids[u]
                n_sel += 1
            elif vals[u] == kth:
                n_tie += 1
        tied = np.empty(n_tie, np.int64)
        n_tie = 0
        for u in range(m):
            if vals[u] == kth:
                tied[n_tie] = ids[u]
                n_tie += 1
        tied.sort()
        for u in range(kk - n_sel):
            sel_v[n_sel + u] = kth
            sel_i[n_sel + u] = tied[u]
        by_id = np.argsort(sel_i, kind="mergesort")
        sel_v = sel_v[by_id]
        sel_i = sel_i[by_id]
        o = np.argsort(-sel_v, kind="mergesort")
        for u in range(kk):
            out_val[i, u] = sel_v[o[u]]
            out_idx[i, u] = sel_i[o[u]]
    return out_val, out_idx


def _by_list(pairs_l: np.ndarray, pairs_q: np.ndarray):
    """(list, queries probing it) groups of (list, query) pairs, lists ascending."""
    order = np.argsort(pairs_l, kind="stable")
    fl, fq = pairs_l[order], pairs_q[order]
    starts = np.flatnonzero(np.r_[True, fl[1:] != fl[:-1]]) if fl.size else np.empty(0, np.int64)
    for a, b in zip(starts, np.r_[starts[1:], fl.size]):
        yield int(fl[a]), fq[a:b]


def _ivf_top(q: np.ndarray, probed: np.ndarray, shard: Shard, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact float64 top k among the members of each query's probed lists in this shard
    (global indices): :func:`ivf_search` on the shard's memory-mapped lists."""
    _, members, offsets = shard.ivf()
    vals, idx = ivf_search(q, probed, np.asarray(members), np.asarray(offsets), shard.by_list32(), shard.by_list64(), k)
    return vals, np.where(idx >= 0, idx + shard.start, -1)


def ivf_search(q: np.ndarray, probed: np.ndarray, members: np.ndarray, offsets: np.ndarray, ref32: np.ndarray,
               ref64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact float64 top k among the members of each query's probed lists (``members``:
    reference rows in list order, list ``l`` at ``offsets[l]:offsets[l+1]``; ``ref32`` /
    ``ref64``: the unit reference rows in that order), ties by reference index.

    Two float32 BLAS passes, list by list (the queries probing a list against its members,
    stored contiguously in list order): the first, over each query's nearest lists only
    (about :data:`_IVF_FLOOR_CELLS` x k members), gives its k-th best float32 similarity
    there, a lower bound of the final k-th best; the second keeps every member of every
    probed list within twice the float32 error of that bound, in a buffer of
    :data:`_IVF_BUFFER` x k per query which, when full, keeps only those within twice the
    error of the k-th best float32 similarity among them (raising the bound; :func:`_compact`).
    The survivors are re-scored in float64 in a fixed order (:func:`_rescore_lists`). So the result is the
    float64 top k of the probed lists, whatever the tiling, BLAS or thread count.
    """
    q64 = np.ascontiguousarray(unit_rows(np.asarray(q, dtype=np.float64)))
    n = q64.shape[0]
    out_val = np.full((n, k), -np.inf)
    out_idx = np.full((n, k), -1, np.int64)
    for lo in range(0, n, _IVF_Q_TILE):
        hi = min(lo + _IVF_Q_TILE, n)
        pr = np.asarray(probed[lo:hi], dtype=np.int64)
        vals, ids, full = _ivf_tile(q64[lo:hi], pr, members, offsets, ref32, ref64, k, _IVF_BUFFER * k)
        for i in np.flatnonzero(full):  # tied cells beyond the buffer: this query alone, a buffer of all its candidates
            width = max(int(np.diff(offsets)[pr[i]].sum()), 1)
            vals[i], ids[i], _ = _ivf_tile(q64[lo + i : lo + i + 1], pr[i : i + 1], members, offsets, ref32, ref64, k, width)
        out_val[lo:hi], out_idx[lo:hi] = vals, ids
    return out_val, out_idx


def _ivf_tile(qs64: np.ndarray, pr: np.ndarray, members, offsets, ref32, ref64, k: int, cap: int):
    """:func:`ivf_search` of one tile of queries with candidate buffers of ``cap`` entries;
    also returns which queries overflowed them (searched again with a wider buffer)."""
    sizes = np.diff(offsets)
    qs32 = qs64.astype(np.float32)
    nq, n_pr = pr.shape
    err = 2 * _F32_DOT_ERROR
    cum = np.cumsum(sizes[pr], axis=1) if n_pr else np.zeros((nq, 1), np.int64)
    # pass 1: each query's nearest lists up to _IVF_FLOOR_CELLS x k members (all if fewer)
    first = np.minimum((cum < _IVF_FLOOR_CELLS * k).sum(axis=1) + 1, n_pr)
    near = np.arange(n_pr)[None, :] < first[:, None]
    w1 = max(int(np.where(near, sizes[pr], 0).sum(axis=1).max()) if nq else 0, 1)
    val32 = np.full((nq, w1), -np.inf, np.float32)
    fill = np.zeros(nq, np.int64)
    rows, cols = np.nonzero(near)
    for lst, qi in _by_list(pr[rows, cols], rows):
        o0, o1 = offsets[lst], offsets[lst + 1]
        if o1 > o0:
            _scatter_vals(val32, qi, fill, qs32[qi] @ ref32[o0:o1].T)
    floor = np.full(nq, -np.inf)
    enough = fill >= k
    if enough.any():
        floor[enough] = np.partition(val32[enough], w1 - k, axis=1)[:, w1 - k].astype(np.float64) - err
    # pass 2: every probed list, keeping the members at or above the (rising) floor
    cap = max(int(cap), k)
    cand = np.empty((nq, cap), np.int32)
    cval = np.empty((nq, cap), np.float32)
    count = np.zeros(nq, np.int64)
    full = np.zeros(nq, np.bool_)
    for lst, qi in _by_list(pr.ravel(), np.repeat(np.arange(nq), n_pr)):
        o0, o1 = offsets[lst], offsets[lst + 1]
        if o1 > o0:
            _keep_list(qs32[qi] @ ref32[o0:o1].T, qi, floor, o0, cand, cval, count, k, err, full)
    _tighten(cand, cval, count, k, err)
    vals, ids = _rescore_lists(qs64, ref64, members, cand, count, k)
    return vals, ids, full


def inverted_lists(unit: np.ndarray, n_lists: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids (spherical k-means), members (rows in list order) and offsets of ``unit`` rows."""
    cent = spherical_kmeans(unit, n_lists, seed=seed)
    return (cent, *_list_members(_assign(unit, cent), cent.shape[0]))


def _list_members(assign: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows in list order (by list, then ascending index) and each list's offsets in it."""
    members = np.argsort(assign, kind="stable").astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=n_lists))]).astype(np.int64)
    return members, offsets


SELF_PROBES = 8


def self_neighbors(embedding: np.ndarray, k: int, *, seed: int = 0, block: int = 8192) -> np.ndarray:
    """Each row's ``k`` nearest other rows (cosine, ties to the lower index; -1 where fewer)
    for large sets, in memory bounded by the block: through inverted lists (about 1,000 rows
    each, :data:`SELF_PROBES` probed per row): deterministic and float64 re-scored, approximate
    only in the lists it does not probe."""
    unit = np.ascontiguousarray(unit_rows(np.asarray(embedding, dtype=np.float64)))
    n = unit.shape[0]
    k = int(min(k, max(n - 1, 0)))
    out = np.full((n, max(k, 0)), -1, dtype=np.int64)
    if k < 1:
        return out
    cent, members, offsets = inverted_lists(unit, default_lists(n), seed=seed)
    ref64 = np.ascontiguousarray(unit[members])
    ref32 = ref64.astype(np.float32)
    top = lambda q: ivf_search(q, _probe_tile(q, cent, SELF_PROBES), members, offsets, ref32, ref64, k + 1)  # noqa: E731

    def one(lo: int) -> None:
        hi = min(lo + block, n)
        _, idx = top(unit[lo:hi])
        own = idx == np.arange(lo, hi)[:, None]
        # drop each row itself (or, if it was not among the k + 1, the last one)
        drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
        keep = np.ones(idx.shape, dtype=bool)
        keep[np.arange(hi - lo), drop] = False
        out[lo:hi] = idx[keep].reshape(hi - lo, k)

    # small GEMMs: one BLAS thread each (a multi-threaded BLAS spins on them), blocks in parallel threads
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, range(0, n, block)))
    return out


_TOP_DTYPE = lambda k: np.dtype([("val", np.float64, (k,)), ("idx", np.int64, (k,))])  # noqa: E731


def _shard_block(q: np.ndarray, probed, shard: Shard, k: int, method: str) -> np.ndarray:
    """One shard's top k of each query, as float64 similarities and global indices
    (``probed``: the IVF lists of each query, from :func:`_probe_block`; None for exact)."""
    out = np.empty(q.shape[0], dtype=_TOP_DTYPE(k))
    out["val"], out["idx"] = -np.inf, -1
    if q.shape[0] == 0:
        return out
    kk = min(k, shard.stop - shard.start)
    if method == "ivf":
        vals, ids = _ivf_top(q, probed, shard, kk)
    else:
        vals, ids = _exact_top(q, shard, kk, offset=shard.start)
    out["val"][:, :kk], out["idx"][:, :kk] = vals, ids
    return out


def _merge_block(*parts: np.ndarray, k: int) -> np.ndarray:
    """The exact top k over shards, by (similarity desc, global index asc): the same as one
    search over the whole reference, because a pair's similarity does not depend on its shard."""
    vals = np.concatenate([p["val"] for p in parts], axis=1)
    ids = np.concatenate([p["idx"] for p in parts], axis=1)
    ids = np.where(np.isfinite(vals), ids, np.iinfo(np.int64).max)
    by_id = np.argsort(ids, axis=1, kind="stable")
    vals, ids = np.take_along_axis(vals, by_id, axis=1), np.take_along_axis(ids, by_id, axis=1)
    vals, ids = _top_k_rows(vals, ids, k)
    return _records_from_dots(vals, ids, k)


def shard_placement(workers: Sequence[str], n_shards: int) -> tuple[str, ...] | None:
    """The worker each shard's searches run on: shard i on the i-th worker (addresses sorted,
    cyclically), so each worker maps only its own shards and a cluster holds a reference no
    single worker could. Only when there are at least as many shards as workers (else every
    worker would not get one, and the search would not use them all): then ``None``, every
    worker searches whatever shard it is given."""
    workers = sorted(workers)
    if n_shards < 2 or not workers or n_shards < len(workers):
        return None
    return tuple(workers[i % len(workers)] for i in range(n_shards))


def sharded_neighbors(emb: da.Array, shards, *, k: int, method: Method, probes: int = DEFAULT_PROBES,
                      placement: Sequence[str] | None = None) -> da.Array:
    """Lazy neighbour records over a sharded reference: one search task per (chunk, shard),
    each carrying only its :class:`Shard`, and one exact merge per chunk. ``placement``: the
    worker each shard's tasks prefer (:func:`shard_placement`; a loose restriction, so a lost
    worker's shard is searched elsewhere rather than never)."""
    check_cell_chunked(emb, "neighbors")
    if method not in ("exact", "ivf"):
        raise ValueError(f"a sharded reference is searched with exact or ivf, not {method!r}")
    if placement is not None and len(placement) != len(shards):
        raise ValueError(f"placement names {len(placement)} workers for {len(shards)} shards")
    n_ref = max(s.stop for s in shards)
    kk = min(k, n_ref)
    probed = None
    if method == "ivf":  # the probed lists are global: chosen once per chunk, the same for every shard
        n_probe = min(probes, int(shards[0].ivf()[0].shape[0]))
        probed = da.map_blocks(_probe_block, emb, shards[0], probes, dtype=np.int32, chunks=(emb.chunks[0], (n_probe,)),
                               meta=np.empty((0, 0), np.int32))
    parts = []
    for i, s in enumerate(shards):
        where = {} if placement is None else {"workers": [placement[i]], "allow_other_workers": False}
        with dask.annotate(**where):
            parts.append(da.map_blocks(_shard_block, emb, probed, s, kk, method, dtype=_TOP_DTYPE(kk), chunks=(emb.chunks[0],),
                                       drop_axis=1, meta=np.empty(0, dtype=_TOP_DTYPE(kk))))
    return da.map_blocks(_merge_block_k(k), *parts, dtype=neighbor_dtype(k), chunks=(emb.chunks[0],),
                         meta=np.empty(0, dtype=neighbor_dtype(k)))


class _merge_block_k:
    """A picklable ``_merge_block`` with ``k`` bound (map_blocks passes blocks positionally)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, *parts):
        return _merge_block(*parts, k=self.k)
