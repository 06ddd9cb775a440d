"""Gene alignment: the query's genes onto the reference's gene list.

Genes are matched by Ensembl id when both sides carry ids, then by symbol for the rest
(a symbol or id the query repeats matches nothing: which gene it means is unknown);
query genes the reference lacks are dropped, reference genes the query lacks
stay zero. The overlap is reported, and refused when too small to mean anything.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import dask.array as da
import numpy as np
import scipy.sparse as sp

from .errors import GeneOverlapError
from .normalize import check_cell_chunked

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
MIN_SHARED_GENES = 50
MIN_SHARED_FRACTION = 0.2


def looks_like_ensembl(ids: np.ndarray) -> bool:
    """True when most ids look like Ensembl gene ids (ENSG..., ENSMUSG...)."""
    ids = np.asarray(ids, dtype=str)
    if ids.size == 0:
        return False
    sample = ids[:: max(1, ids.size // 2000)]
    return np.mean([bool(_ENSEMBL.match(x)) for x in sample]) > 0.5


@dataclass(frozen=True)
class Alignment:
    """Where each reference gene is in the query (-1: missing) and how it was matched."""

    query_index: np.ndarray
    matched_by: str
    n_reference_genes: int
    n_query_genes: int
    required: np.ndarray | None = None  # the reference genes the overlap check is about (e.g. the PCA's genes)

    @property
    def n_shared(self) -> int:
        return int(np.count_nonzero(self.query_index >= 0))

    @property
    def fraction(self) -> float:
        return self.n_shared / max(1, self.n_reference_genes)

    def selection(self) -> sp.csr_matrix:
        """A 0/1 matrix (query genes x reference genes) taking query columns into reference order."""
        cols = np.flatnonzero(self.query_index >= 0)
        rows = self.query_index[cols]
        return sp.csr_matrix(
            (np.ones(cols.size, dtype=np.int32), (rows, cols)),
            shape=(self.n_query_genes, self.n_reference_genes),
        )

    @property
    def n_required(self) -> int:
        return self.n_reference_genes if self.required is None else int(self.required.size)

    @property
    def n_required_shared(self) -> int:
        if self.required is None:
            return self.n_shared
        return int(np.count_nonzero(self.query_index[self.required] >= 0))

    @property
    def required_fraction(self) -> float:
        return self.n_required_shared / max(1, self.n_required)

    def record(self) -> dict:
        out = {
            "matched_by": self.matched_by,
            "reference_genes": self.n_reference_genes,
            "query_genes": self.n_query_genes,
            "shared_genes": self.n_shared,
            "shared_fraction": round(self.fraction, 6),
        }
        if self.required is not None:
            out.update(model_genes=self.n_required, model_genes_shared=self.n_required_shared,
                       model_genes_shared_fraction=round(self.required_fraction, 6))
        return out


def _unique_index(keys: np.ndarray) -> dict[str, int]:
    """key -> position, for keys that occur exactly once (empty keys never match).

    A key that occurs more than once is left out: 10x feature lists repeat some symbols
    (e.g. GRCh38 2020-A has ten, each a different Ensembl gene), and picking one of them
    would be arbitrary while summing them would count another gene's reads. An ambiguous
    gene is treated as missing, as any gene the query lacks is.
    """
    first: dict[str, int] = {}
    repeated: set[str] = set()
    for i, k in enumerate(np.asarray(keys, dtype=str).tolist()):
        if not k:
            continue
        if k in first:
            repeated.add(k)
        else:
            first[k] = i
    for k in repeated:
        del first[k]
    return first


def _strip_version(ids) -> np.ndarray:
    return np.array([str(x).split(".")[0] if _ENSEMBL.match(str(x)) else str(x) for x in ids], dtype=object)


def ensembl_ids_for_symbols(symbols, *, table_ids, table_names) -> np.ndarray:
    """The Ensembl id of each symbol from a feature table (a 10x ``features`` list: ids and
    names); ``""`` for a symbol the table lacks or gives to several genes."""
    lookup = _unique_index(np.asarray(table_names, dtype=str))
    ids = np.asarray(table_ids, dtype=str)
    return np.array([ids[lookup[s]] if s in lookup else "" for s in np.asarray(symbols, dtype=str).tolist()], dtype=object)


def align_genes(*, query_ids, query_names, ref_ids, ref_names, source: str = "query", reference: str = "reference",
                required: np.ndarray | None = None) -> Alignment:
    """Match reference genes to query genes, refusing a meaningless overlap.

    By Ensembl id first (when both sides carry ids; version suffixes dropped), then by
    symbol for the reference genes still unmatched, among the query genes whose own id the
    reference lacks. A key (id or symbol) that occurs more than once in the query matches
    nothing (see :func:`_unique_index`). ``required``: indices of the reference genes the
    model cannot do without (a kNN model's PCA genes within its universe); the overlap
    check is about those.
    """
    q_names = np.asarray(query_names, dtype=str)
    r_names = np.asarray(ref_names, dtype=str)
    idx = np.full(len(r_names), -1, dtype=np.int64)
    by_id = looks_like_ensembl(query_ids) and looks_like_ensembl(ref_ids)
    n_id = 0
    q_free = np.ones(len(q_names), dtype=bool)
    if by_id:
        q_ids, r_ids = _strip_version(query_ids), _strip_version(ref_ids)
        lookup = _unique_index(q_ids)
        idx = np.array([lookup.get(k, -1) if k else -1 for k in r_ids.tolist()], dtype=np.int64)
        n_id = int(np.count_nonzero(idx >= 0))
        r_id_set = {k for k in r_ids.tolist() if k}
        q_free = np.array([k not in r_id_set for k in q_ids.tolist()], dtype=bool)
    sym = _unique_index(q_names)
    todo = np.flatnonzero(idx < 0)
    for j in todo.tolist():
        i = sym.get(r_names[j], -1)
        if i >= 0 and q_free[i]:
            idx[j] = i
    n_sym = int(np.count_nonzero(idx >= 0)) - n_id
    how = "ensembl_id" if n_id and not n_sym else ("ensembl_id+symbol" if n_id else "symbol")
    req = None if required is None else np.asarray(required, dtype=np.int64)
    al = Alignment(query_index=idx, matched_by=how, n_reference_genes=len(r_names), n_query_genes=len(q_names), required=req)
    if al.n_required_shared < MIN_SHARED_GENES or al.required_fraction < MIN_SHARED_FRACTION:
        raise GeneOverlapError(
            f"{source}: only {al.n_required_shared} of the {al.n_required} genes of {reference} are present "
            f"(matched by {how.replace('_', ' ').replace('+', ' then ')}); at least {MIN_SHARED_GENES} and {MIN_SHARED_FRACTION:.0%} are needed. "
            "Check that the species matches the model and that the matrix holds all genes, or choose another --cell-annotation-model"
        )
    return al


def _align_block(block: sp.csr_matrix, selection: sp.csr_matrix) -> sp.csr_matrix:
    return sp.csr_matrix(block @ selection)


def align(x: da.Array, alignment: Alignment) -> da.Array:
    """Lazy CSR blocks with the reference's genes as columns, in reference order."""
    check_cell_chunked(x, "align")
    sel = alignment.selection()
    return da.map_blocks(
        _align_block, x, sel, dtype=x.dtype,
        chunks=(x.chunks[0], (alignment.n_reference_genes,)), meta=sp.csr_matrix((0, 0), dtype=x.dtype),
    )
