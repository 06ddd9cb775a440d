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
