"""Real 10x files of every format version read correctly (layer 5)."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from dask_annot import h5, store
from dask_annot.errors import DaskAnnotError, InputFormatError

from .conftest import FORMATS

ALL_SINGLE_GENOME = {
    # file: (layout, cells, Gene Expression features, genome)
    "scanpy_cr1.2_v2legacy_hg19chr21_12cells.h5": ("10x-h5-legacy", 12, 343, ("hg19_chr21",)),
    "scanpy_cr3.0_v3_grch38chr21_1107cells.h5": ("10x-h5-v3", 1107, 507, ("GRCh38_chr21",)),
    "scanpy_spaceranger1.0_visium_100spots.h5": ("10x-h5-v3", 100, 100, ("GRCh38",)),
    "scanpy_spaceranger2.1_visium_mouse_raw_probe_bc_matrix.h5": ("10x-h5-v3", 4987, 1000, ("mm10",)),
    "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5": ("10x-h5-v3", 182, 36601, ("GRCh38",)),
    "scp_GSE164378_RNA_200cells_50genes.h5": ("10x-h5-v3", 200, 50, ("hg19",)),
    "scp_GSE164378_RNA_ADT_200cells_80features.h5": ("10x-h5-v3", 200, 50, ("hg19",)),
    "scp_cr6.1_500pbmc_50genes_272cells.h5": ("10x-h5-v3", 272, 50, ("GRCh38",)),
    "scp_cr6.1_500pbmc_50genes_587cells.h5": ("10x-h5-v3", 587, 50, ("GRCh38",)),
}


@pytest.mark.parametrize("name", sorted(ALL_SINGLE_GENOME))
def test_every_real_file_opens_with_its_layout(name):
    layout, cells, genes, genomes = ALL_SINGLE_GENOME[name]
    info = h5.open_matrix(FORMATS / name)
    assert (info.layout, info.n_cells, info.n_features, info.genomes) == (layout, cells, genes, genomes)
    block = h5.read_cells(info, 0, info.n_cells)
    assert block.shape == (cells, genes) and block.dtype == np.int32
    assert block.nnz == 0 or block.data.min() >= 0


def test_cellranger61_matches_expected_csvs():
    info = h5.open_matrix(FORMATS / "scp_cr6.1_500pbmc_50genes_587cells.h5")
    expected = np.loadtxt(FORMATS / "scp_500pbmc_50genes_expected_matrix.csv", delimiter=",")
    barcodes = (FORMATS / "scp_500pbmc_50genes_expected_barcodes.csv").read_text().split()
    ids = (FORMATS / "scp_500pbmc_50genes_expected_feature_ids.csv").read_text().split()
    assert list(info.barcodes) == barcodes
    assert list(info.feature_ids) == ids
    np.testing.assert_array_equal(h5.read_cells(info, 0, info.n_cells).toarray().T, expected)


def test_filtered_272_cells_are_the_matching_subset_of_587():
    big = h5.open_matrix(FORMATS / "scp_cr6.1_500pbmc_50genes_587cells.h5")
    small = h5.open_matrix(FORMATS / "scp_cr6.1_500pbmc_50genes_272cells.h5")
    pos = {b: i for i, b in enumerate(big.barcodes)}
    rows = [pos[b] for b in small.barcodes]
    np.testing.assert_array_equal(h5.read_cells(small, 0, 272).toarray(), h5.read_cells(big, 0, 587).toarray()[rows])


def test_rna_adt_file_keeps_only_gene_expression():
    both = h5.open_matrix(FORMATS / "scp_GSE164378_RNA_ADT_200cells_80features.h5")
    rna = h5.open_matrix(FORMATS / "scp_GSE164378_RNA_200cells_50genes.h5")
    assert both.n_features_total == 80 and both.n_features == 50
    assert set(both.extra["feature_types"]) == {"Antibody Capture", "Gene Expression"}
    assert list(both.feature_ids) == list(rna.feature_ids)
    np.testing.assert_array_equal(h5.read_cells(both, 0, 200).toarray(), h5.read_cells(rna, 0, 200).toarray())


def test_spaceranger_float_counts_are_read_as_integers():
    info = h5.open_matrix(FORMATS / "scanpy_spaceranger1.0_visium_100spots.h5")
    block = h5.read_cells(info, 0, 100)
    assert block.dtype == np.int32 and block.sum() == 932


def test_legacy_multi_genome_is_refused_naming_the_genomes():
    with pytest.raises(InputFormatError, match=r"multi-genome.*another_genome, hg19_chr21"):
        h5.open_matrix(FORMATS / "scanpy_cr1.2_v2legacy_multiple_genomes.h5")


def test_blocks_concatenate_to_the_whole(rng):
    info = h5.open_matrix(FORMATS / "scanpy_cr3.0_v3_grch38chr21_1107cells.h5")
    whole = h5.read_cells(info, 0, info.n_cells)
    cuts = np.sort(rng.choice(np.arange(1, info.n_cells), size=7, replace=False))
    parts = [h5.read_cells(info, a, b) for a, b in zip([0, *cuts], [*cuts, info.n_cells])]
    assert (sp.vstack(parts) != whole).nnz == 0


def test_mex_directory_reads_like_the_h5(tmp_path):
    info = h5.open_matrix(FORMATS / "scp_cr6.1_500pbmc_50genes_272cells.h5")
    X = h5.read_cells(info, 0, info.n_cells)
    d = tmp_path / "filtered_feature_bc_matrix"
    d.mkdir()
    with gzip.open(d / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T))
    with gzip.open(d / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{n}\tGene Expression\n" for i, n in zip(info.feature_ids, info.feature_names))
    with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in info.barcodes)
    mex = h5.open_matrix(d)
    assert mex.layout == "mex" and mex.n_cells == 272
    assert (h5.read_cells(mex, 0, 272) != X).nnz == 0


def test_h5ad_with_raw_counts_reads(tmp_path):
    ad = pytest.importorskip("anndata")
    info = h5.open_matrix(FORMATS / "scp_cr6.1_500pbmc_50genes_272cells.h5")
    X = h5.read_cells(info, 0, info.n_cells)
    import pandas as pd

    a = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame(index=list(info.barcodes)),
                   var=pd.DataFrame({"gene_ids": list(info.feature_ids)}, index=list(info.feature_names)))
    a.write_h5ad(tmp_path / "x.h5ad")
    got = h5.open_matrix(tmp_path / "x.h5ad")
    assert got.layout == "h5ad" and list(got.feature_ids) == list(info.feature_ids)
    assert (h5.read_cells(got, 0, 272) != X).nnz == 0


def test_written_10x_h5_round_trips(tmp_path, rng):
    X = sp.random(300, 40, density=0.1, random_state=1, format="csr", dtype=np.float64)
    X.data = np.ceil(X.data * 20)
    X = X.astype(np.int32)
    h5.write_10x_h5(tmp_path / "m.h5", X, barcodes=[f"c{i}-1" for i in range(300)],
                    feature_ids=[f"ENSG{i:011d}" for i in range(40)], feature_names=[f"G{i}" for i in range(40)])
    info = h5.open_matrix(tmp_path / "m.h5")
    assert (h5.read_cells(info, 0, 300) != X).nnz == 0


@pytest.mark.parametrize("chunk", [1, 7, 100, 5000])
def test_store_round_trip_at_any_chunking(tmp_path, chunk):
    src = FORMATS / "scanpy_cr3.0_v3_grch38chr21_1107cells.h5"
    info = h5.open_matrix(src)
    st = store.convert(src, tmp_path / "s.zarr", cells_per_block=97)
    X = store.counts_array(st, chunk_cells=chunk).compute(scheduler="threads")
    assert (sp.csr_matrix(X) != h5.read_cells(info, 0, info.n_cells)).nnz == 0
    np.testing.assert_array_equal(st.umi_count, np.asarray(h5.read_cells(info, 0, info.n_cells).sum(axis=1)).ravel())
    assert list(st.barcodes) == list(info.barcodes)


def test_store_is_reused_and_never_confused_with_another_input(tmp_path):
    a = FORMATS / "scp_cr6.1_500pbmc_50genes_272cells.h5"
    b = FORMATS / "scp_cr6.1_500pbmc_50genes_587cells.h5"
    st = store.convert(a, tmp_path / "s.zarr")
    mtime = (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns
    assert store.convert(a, tmp_path / "s.zarr").n_cells == st.n_cells
    assert (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(DaskAnnotError, match="another input"):
        store.convert(b, tmp_path / "s.zarr")


# ---------------------------------------------------------------- issue 13 items 5-6, issue 14

def _pbmc272():
    info = h5.open_matrix(FORMATS / "scp_cr6.1_500pbmc_50genes_272cells.h5")
    return info, h5.read_cells(info, 0, info.n_cells)


def test_v3_file_with_two_genomes_is_refused(tmp_path):
    import h5py
    import shutil

    p = tmp_path / "barnyard.h5"
    shutil.copy(FORMATS / "scp_cr6.1_500pbmc_50genes_272cells.h5", p)
    with h5py.File(p, "r+") as f:
        g = f["matrix/features/genome"][()]
        g[: g.size // 2] = b"mm10"
        del f["matrix/features/genome"]
        f["matrix/features/genome"] = g
    with pytest.raises(InputFormatError, match=r"multi-genome matrix \(GRCh38, mm10\).*single-genome"):
        h5.open_matrix(p)


def _write_mex(d, info, X, *, shuffle_rng=None, drop_last=False):
    d.mkdir()
    coo = sp.coo_matrix(X.T)
    r, c, v = coo.row, coo.col, coo.data
    if shuffle_rng is not None:
        o = shuffle_rng.permutation(r.size)
        r, c, v = r[o], c[o], v[o]
    n = r.size
    with gzip.open(d / "matrix.mtx.gz", "wt") as fh:
        fh.write("%%MatrixMarket matrix coordinate integer general\n%metadata_json: {}\n")
        fh.write(f"{X.shape[1]} {X.shape[0]} {n}\n")
        for a, b, x in zip(r[: n - 1 if drop_last else n], c, v):
            fh.write(f"{a + 1} {b + 1} {x}\n")
    with gzip.open(d / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{n}\tGene Expression\n" for i, n in zip(info.feature_ids, info.feature_names))
    with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in info.barcodes)
    return d


@pytest.mark.parametrize("entries_per_chunk", [1, 333, 4_000_000])
def test_mex_in_any_entry_order_is_copied_once_into_cell_order(tmp_path, rng, entries_per_chunk):
    info, X = _pbmc272()
    mex = h5.open_matrix(_write_mex(tmp_path / "mex", info, X, shuffle_rng=rng))
    assert h5.needs_row_copy(mex)
    rows = h5.row_copy(mex, tmp_path / "rows", chunk=entries_per_chunk)
    assert not h5.needs_row_copy(rows) and rows.nnz == X.nnz
    parts = [h5.read_cells(rows, a, b) for a, b in [(0, 1), (1, 100), (100, 272)]]
    assert (sp.vstack(parts) != X).nnz == 0


def test_truncated_mex_is_refused(tmp_path):
    info, X = _pbmc272()
    mex = h5.open_matrix(_write_mex(tmp_path / "mex", info, X, drop_last=True))
    with pytest.raises(InputFormatError, match=r"header says .*truncated"):
        h5.row_copy(mex, tmp_path / "rows")


def test_mex_store_equals_the_h5_store(tmp_path):
    info, X = _pbmc272()
    mex_dir = _write_mex(tmp_path / "mex", info, X, shuffle_rng=np.random.default_rng(3))
    st = store.convert(mex_dir, tmp_path / "s.zarr", cells_per_block=50)
    assert (sp.csr_matrix(store.counts_array(st, chunk_cells=64).compute(scheduler="threads")) != X).nnz == 0
    assert not list(tmp_path.glob(".s.zarr*")), "the cell-order copy is removed after conversion"


def test_csc_h5ad_reads_block_by_block_from_one_copy(tmp_path):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    info, X = _pbmc272()
    a = ad.AnnData(X=sp.csc_matrix(X), obs=pd.DataFrame(index=list(info.barcodes)),
                   var=pd.DataFrame({"gene_ids": list(info.feature_ids)}, index=list(info.feature_names)))
    a.write_h5ad(tmp_path / "csc.h5ad")
    got = h5.open_matrix(tmp_path / "csc.h5ad")
    assert got.orientation == "cells_cols" and h5.needs_row_copy(got)
    rows = h5.row_copy(got, tmp_path / "rows", chunk=100)
    assert (sp.vstack([h5.read_cells(rows, 0, 5), h5.read_cells(rows, 5, 272)]) != X).nnz == 0
    st = store.convert(tmp_path / "csc.h5ad", tmp_path / "s.zarr", cells_per_block=40)
    assert (sp.csr_matrix(store.counts_array(st, chunk_cells=100).compute(scheduler="threads")) != X).nnz == 0


def _cellxgene_like(info, X, *, where: str):
    """An AnnData as CELLxGENE writes it: Ensembl var index, feature_name symbols, log-normalized X,
    the counts in raw.X (or layers['counts'])."""
    import anndata as ad
    import pandas as pd

    lib = np.asarray(X.sum(axis=1)).ravel()
    norm = sp.csr_matrix(sp.diags(1e4 / np.maximum(lib, 1)) @ X.astype(np.float32))
    norm.data = np.log1p(norm.data)
    var = pd.DataFrame({"feature_name": list(info.feature_names)}, index=list(info.feature_ids))
    a = ad.AnnData(X=norm.astype(np.float32), obs=pd.DataFrame(index=list(info.barcodes)), var=var)
    if where == "raw":
        a.raw = ad.AnnData(X=X.astype(np.float32), obs=a.obs, var=var)
    elif where == "layers":
        a.layers["counts"] = X.astype(np.float32)
    return a


@pytest.mark.parametrize("where", ["raw", "layers"])
def test_normalized_x_reads_the_raw_counts_and_ensembl_index(tmp_path, where):
    pytest.importorskip("anndata")
    info, X = _pbmc272()
    _cellxgene_like(info, X, where=where).write_h5ad(tmp_path / "c.h5ad")
    got = h5.open_matrix(tmp_path / "c.h5ad")
    assert got.extra["counts"] == ("raw/X" if where == "raw" else "layers/counts")
    assert list(got.feature_ids) == list(info.feature_ids) and list(got.feature_names) == list(info.feature_names)
    assert (h5.read_cells(got, 0, 272) != X).nnz == 0


def test_normalized_x_without_counts_is_refused(tmp_path):
    pytest.importorskip("anndata")
    from dask_annot.errors import InvalidCountsError

    info, X = _pbmc272()
    _cellxgene_like(info, X, where="none").write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(InvalidCountsError, match=r"normalized .* no raw.X or layers\['counts'\]"):
        h5.open_matrix(tmp_path / "c.h5ad")


def test_a_reference_built_from_mex_equals_one_built_from_the_h5(tmp_path):
    """build-reference reads a MEX through the one-time cell-order copy, block by block."""
    from dask_annot.build import build_reference
    from dask_annot.reference import read_artifact

    src = FORMATS / "scp_cr6.1_500pbmc_50genes_587cells.h5"
    info = h5.open_matrix(src)
    X = h5.read_cells(info, 0, info.n_cells)
    mex = _write_mex(tmp_path / "mex", info, X, shuffle_rng=np.random.default_rng(5))
    umi = np.asarray(X.sum(axis=1)).ravel()
    labels = tmp_path / "labels.csv"
    labels.write_text("barcode,group\n" + "".join(f"{b},{'high' if u > np.median(umi) else 'low'}\n" for b, u in zip(info.barcodes, umi)))
    kw = dict(label_column="group", labels_csv=str(labels), name="m", n_hvg=30, n_pcs=5, cells_per_block=100)
    a = read_artifact(build_reference(src, output=tmp_path / "from_h5", **kw))[1]
    b = read_artifact(build_reference(mex, output=tmp_path / "from_mex", **kw))[1]
    for k in ("embedding", "loadings", "label_codes", "mean", "std", "hvg_index"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_killed_conversions_cell_order_copy_is_removed(tmp_path):
    info, X = _pbmc272()
    mex_dir = _write_mex(tmp_path / "mex", info, X)
    stale = tmp_path / ".s.zarr.tmp-99999999.rows"  # no such process
    stale.mkdir()
    (stale / "data.bin").write_bytes(b"\0" * 8)
    store.convert(mex_dir, tmp_path / "s.zarr")
    assert not stale.exists()
