"""Write the two small CELLxGENE-schema files in tests/data/cellxgene/ from the real data in ../shared.

    python scripts/make_cellxgene_fixture.py [--shared ../shared]

- zheng2017-sorted.h5ad: 210 cells (30 per type, seeded) of Zheng et al. 2017's FACS-sorted
  PBMC (via scMINER, Apache-2.0); no dataset id inside, so the file name is its dataset id.
- pbmc4k-a.h5ad: 210 cells (seeded) of 10x Genomics' pbmc4k as labelled by SoupX's PBMC data;
  ``uns['dataset_id'] = 'pbmc4k-a'``; cells labelled '?' get ``unknown``.
Both in the CELLxGENE schema as Discover serves it: ``var`` index = Ensembl ids (symbols mapped
with the GRCh38 2020-A feature table of tests/data's Cell Ranger 6.0 file; genes without a
unique id left out) with ``feature_name``; ``X`` log-normalized, raw counts in ``raw.X``;
``obs['cell_type_ontology_term_id']`` = Cell Ontology ids (hand-mapped, below), ``cell_type``,
``is_primary_data``, ``tissue_general``. Only genes of the sorted PBMC are kept in both, to
keep the files small.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "cellxgene"
SORTED_CL = {"B": "CL:0000236", "CD4TCM": "CL:0000897", "CD4TN": "CL:0000895", "CD4Treg": "CL:0000792",
             "CD8TN": "CL:0000900", "Monocyte": "CL:0001054", "NK": "CL:0000623"}
PBMC4K_CL = {"T_CD4": "CL:0000624", "T_CD8": "CL:0000625", "B": "CL:0000236", "NK": "CL:0000623", "MNP": "CL:0000576", "?": "unknown"}


def main() -> None:
    import anndata as ad

    from dask_annot import align, h5
    from dask_annot.ontology import cell_ontology

    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    data = Path(ap.parse_args().shared) / "data"
    table = h5.open_matrix(ROOT / "tests" / "data" / "tenx_h5_format_tests" / "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5")
    cl = cell_ontology()
    OUT.mkdir(parents=True, exist_ok=True)
    src_sorted = data / "pbmc_sorted_zheng2017" / "pbmc_sorted_3500.h5ad"
    genes = [str(g) for g in h5.open_matrix(src_sorted).feature_names]
    specs = [("zheng2017-sorted", src_sorted, "trueLabel", SORTED_CL, None, 30),
             ("pbmc4k-a", data / "pbmc4k_soupx" / "pbmc4k_2170cells_soupx_labels.h5ad", "Annotation", PBMC4K_CL, "pbmc4k-a", None)]
    for name, path, col, cmap, uns_id, per_type in specs:
        info = h5.open_matrix(path)
        X = h5.read_cells(info, 0, info.n_cells)
        labels = ad.read_h5ad(path, backed="r").obs[col].astype(str).to_numpy()
        rng = np.random.default_rng(14)
        if per_type:
            pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == lab), per_type, replace=False) for lab in sorted(cmap)]))
        else:
            pick = np.sort(rng.choice(info.n_cells, 210, replace=False))
        names = np.asarray(info.feature_names, dtype=str)
        ids = align.ensembl_ids_for_symbols(names, table_ids=table.feature_ids, table_names=table.feature_names)
        keep = np.flatnonzero((ids != "") & np.isin(names, genes))
        counts = X[pick][:, keep].astype(np.float32)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        norm = sp.csr_matrix(sp.diags(1e4 / np.maximum(lib, 1)) @ counts)
        norm.data = np.log1p(norm.data)
        term = np.array([cmap[x] for x in labels[pick]], dtype=object)
        obs = pd.DataFrame({
            "cell_type_ontology_term_id": pd.Categorical(term),
            "cell_type": pd.Categorical([cl[t]["label"] if t in cl else "unknown" for t in term]),
            "is_primary_data": True, "tissue_general": pd.Categorical(["blood"] * pick.size),
        }, index=pd.Index([f"{b}-1" if not str(b).endswith("-1") else str(b) for b in info.barcodes[pick]]))
        var = pd.DataFrame({"feature_name": pd.Categorical(names[keep])}, index=pd.Index(ids[keep].astype(str)))
        a = ad.AnnData(X=norm.astype(np.float32), obs=obs, var=var, uns={"dataset_id": uns_id} if uns_id else {})
        a.raw = ad.AnnData(X=counts, obs=obs, var=var)
        a.write_h5ad(OUT / f"{name}.h5ad", compression="gzip")
        print("wrote", OUT / f"{name}.h5ad", a.shape)


if __name__ == "__main__":
    main()
