"""Gene matching: Ensembl id first, then symbol; ambiguous keys match nothing (issue 13 item 5)."""
from __future__ import annotations

import numpy as np
import pytest

from dask_annot import align, h5

from .conftest import FORMATS

GRCH38 = FORMATS / "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5"


def _genes(n, prefix="ENSG"):
    return [f"{prefix}{i:011d}" for i in range(n)], [f"G{i}" for i in range(n)]


def test_ids_first_then_symbols_for_the_rest():
    q_ids, q_names = _genes(100)
    r_ids, r_names = list(q_ids[:80]), list(q_names[:100])
    r_ids += [""] * 20                                   # 20 reference genes without an id
    r_ids[0] = q_ids[0] + ".7"                            # version suffixes are dropped
    al = align.align_genes(query_ids=q_ids, query_names=q_names, ref_ids=r_ids, ref_names=r_names)
    assert al.matched_by == "ensembl_id+symbol"
    np.testing.assert_array_equal(al.query_index, np.arange(100))


def test_symbol_fallback_never_takes_a_gene_the_ids_place_elsewhere():
    q_ids, q_names = _genes(100)
    r_ids, r_names = list(q_ids[:99]) + ["ENSG99999999999"], list(q_names[:99]) + ["G5"]
    al = align.align_genes(query_ids=q_ids, query_names=q_names, ref_ids=r_ids, ref_names=r_names)
    # the reference's last gene is called G5, but the query's G5 is reference gene 5 by id
    assert al.query_index[-1] == -1 and al.query_index[5] == 5


def test_a_symbol_the_query_repeats_matches_nothing():
    q_names = [f"G{i}" for i in range(100)] + ["G7"]
    al = align.align_genes(query_ids=q_names, query_names=q_names, ref_ids=q_names[:100], ref_names=q_names[:100])
    assert al.matched_by == "symbol" and al.query_index[7] == -1 and al.n_shared == 99


def test_real_grch38_table_duplicate_symbols_stay_unmatched_by_symbol_but_match_by_id():
    info = h5.open_matrix(GRCH38)
    names, ids = np.asarray(info.feature_names, dtype=str), np.asarray(info.feature_ids, dtype=str)
    uniq, counts = np.unique(names, return_counts=True)
    dup = set(uniq[counts > 1])
    assert len(dup) == 10  # GRCh38 2020-A repeats ten symbols, each on two Ensembl genes
    by_sym = align.align_genes(query_ids=names, query_names=names, ref_ids=names, ref_names=names)
    assert by_sym.n_shared == names.size - 2 * len(dup)
    by_id = align.align_genes(query_ids=ids, query_names=names, ref_ids=ids, ref_names=names)
    assert by_id.matched_by == "ensembl_id" and by_id.n_shared == names.size


def test_ensembl_ids_for_symbols_from_the_real_feature_table():
    info = h5.open_matrix(GRCH38)
    names = np.asarray(info.feature_names, dtype=str)
    dup = next(s for s in np.unique(names) if (names == s).sum() > 1)
    got = align.ensembl_ids_for_symbols(["CD3E", "MS4A1", "NOT_A_GENE", dup], table_ids=info.feature_ids, table_names=names)
    assert got.tolist() == ["ENSG00000198851", "ENSG00000156738", "", ""]


def test_builtin_human_model_matches_a_real_10x_file_by_ensembl_id():
    from dask_annot import models, reference

    mdl = reference.load_reference(models.builtin_models()["human_pbmc_v1"])
    info = h5.open_matrix(GRCH38)
    al = align.align_genes(query_ids=info.feature_ids, query_names=info.feature_names, ref_ids=mdl.universe_ids,
                           ref_names=mdl.universe_names)
    # the model's symbols without a GRCh38 id are the ones this GRCh38 file lacks or repeats
    assert al.matched_by == "ensembl_id"
    n_id = int(np.count_nonzero(mdl.universe_ids != ""))
    assert n_id > 0.9 * mdl.universe_ids.size
    # every reference gene with an id is matched by it, to the query gene of the same id
    has = np.flatnonzero(mdl.universe_ids != "")
    hit = al.query_index[has] >= 0
    assert hit.mean() > 0.99
    assert (np.asarray(info.feature_ids)[al.query_index[has][hit]] == mdl.universe_ids[has][hit]).all()
