"""Gene alignment: the query's genes onto the reference's gene list.

Genes are matched by Ensembl id when both sides carry ids, else by symbol;
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


def _first_index(names: np.ndarray) -> dict[str, int]:
    """name -> first position (10x files can repeat a symbol; the first one wins)."""
    out: dict[str, int] = {}
    for i, n in enumerate(np.asarray(names, dtype=str)):
        out.setdefault(n, i)
    return out


def align_genes(*, query_ids, query_names, ref_ids, ref_names, source: str = "query", reference: str = "reference",
                required: np.ndarray | None = None) -> Alignment:
    """Match reference genes to query genes, refusing a meaningless overlap.

    ``required``: indices of the reference genes the model cannot do without (a kNN
    model's PCA genes within its universe); the overlap check is about those.
    """
    by_id = looks_like_ensembl(query_ids) and looks_like_ensembl(ref_ids)
    if by_id:
        strip = lambda xs: np.array([str(x).split(".")[0] for x in xs])  # noqa: E731 (drop version suffixes)
        lookup, keys, how = _first_index(strip(query_ids)), strip(ref_ids), "ensembl_id"
    else:
        lookup, keys, how = _first_index(query_names), np.asarray(ref_names, dtype=str), "symbol"
    idx = np.array([lookup.get(k, -1) for k in keys], dtype=np.int64)
    req = None if required is None else np.asarray(required, dtype=np.int64)
    al = Alignment(query_index=idx, matched_by=how, n_reference_genes=len(keys), n_query_genes=len(query_names), required=req)
    if al.n_required_shared < MIN_SHARED_GENES or al.required_fraction < MIN_SHARED_FRACTION:
        raise GeneOverlapError(
            f"{source}: only {al.n_required_shared} of the {al.n_required} genes of {reference} are present "
            f"(matched by {how.replace('_', ' ')}); at least {MIN_SHARED_GENES} and {MIN_SHARED_FRACTION:.0%} are needed. "
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
