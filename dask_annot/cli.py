"""The ``dask-annot`` command line.

Every error dask-annot raises on purpose is printed as one line (what is wrong,
which file, what to do) with the error class's exit code; no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from . import __version__
from .errors import ConfigError, DaskAnnotError

EXAMPLE = "data/example/pbmc4k_800cells.h5"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def example_path() -> Path:
    """The bundled example matrix (800 cells of 10x's pbmc4k, as a Cell Ranger v3 H5)."""
    return Path(str(resources.files("dask_annot").joinpath(EXAMPLE)))


JOB_FLAGS = {"cores": "cores", "memory": "memory", "walltime": "walltime", "queue": "queue", "account": "account", "log_dir": "log_directory"}


def _cluster_settings(a: argparse.Namespace) -> dict:
    """Settings flags shared by every command that runs on a cluster."""
    job = {JOB_FLAGS[k]: getattr(a, k) for k in JOB_FLAGS if getattr(a, k) is not None}
    return dict(scheduler=a.scheduler, n_workers=a.n_workers, cluster_config=a.cluster_config,
                worker_timeout=a.worker_timeout, job_options=job or None)


def _print_job_script(settings) -> int:
    from .cluster import job_script

    print(job_script(settings.scheduler, cluster_config=settings.cluster_config, memory_limit=settings.memory_limit,
                     **settings.job_options))
    return 0


def _cmd_annotate(a: argparse.Namespace) -> int:
    from . import config, pipeline

    settings = config.resolve(k=a.k, chunk_cells=a.chunk_cells, knn_method=a.knn_method, layout=a.layout,
                              consensus=a.consensus, reject=a.reject, force=a.force or None, organs=a.organ, **_cluster_settings(a))
    if a.print_job_script:
        return _print_job_script(settings)
    matrix = example_path() if a.matrix == "example" else a.matrix
    results = pipeline.run(a.id, matrix, models=pipeline.parse_model_specs(a.cell_annotation_model), output_dir=a.output_dir,
                           settings=settings, log=_log, progress=sys.stderr.isatty() and not a.quiet,
                           allow_bins=a.allow_bins, cell_geometry=a.cell_geometry)
    for res in results:
        print(res.model_dir)
    return 0


def _cmd_build_reference(a: argparse.Namespace) -> int:
    from .build import build_marker_reference, build_reference
    from .sources import open_reference_input

    if a.markers:
        if a.input or a.label_column or a.census is not None:
            raise ConfigError("build-reference: --markers builds a marker model from a table; leave out --input, --census and --label-column")
        print(build_marker_reference(a.markers, name=a.name, output=a.output, species=a.species or "human", version=a.version))
        return 0
    if not a.input and a.census is None:
        raise ConfigError("build-reference needs --input and --label-column (a kNN model from labelled cells), CELLxGENE files "
                          "(--input A.h5ad [B.h5ad ...]), --census FILTER, or --markers TABLE.csv")

    import contextlib

    from .cluster import make_client

    settings = None
    if a.scheduler or a.n_workers or a.print_job_script:  # where the Census slices are read (Dask tasks)
        from . import config

        settings = config.resolve(**_cluster_settings(a) | {"scheduler": a.scheduler if a.scheduler not in (None, "auto") else "threads"})
        if a.print_job_script:
            return _print_job_script(settings)
    cells = open_reference_input(a, log=_log)
    if cells is None and not a.label_column:
        raise ConfigError(f"{a.input[0]}: is not a CELLxGENE-schema .h5ad; pass --label-column with the obs column holding the cell type")
    shared = [a.census_uri] if a.census_uri and Path(a.census_uri).exists() else []
    with (make_client(settings.scheduler, n_workers=settings.n_workers, threads_per_worker=settings.threads_per_worker,
                      memory_limit=settings.memory_limit, log=_log, cluster_config=settings.cluster_config, shared_paths=shared,
                      worker_timeout=settings.worker_timeout, **(settings.job_options or {}))
          if settings is not None else contextlib.nullcontext()):
        out = build_reference(
            a.input[0] if a.input else None, label_column=a.label_column, name=a.name, output=a.output, ontology_map=a.ontology_map,
            dataset_column=a.dataset_column, labels_csv=a.labels, exclude_labels=tuple(a.exclude_label or ()),
            species=a.species, version=a.version, n_hvg=a.n_hvg, n_pcs=a.n_pcs, seed=a.seed, knn_method=a.knn_method,
            cells=cells, merge_same_term=a.merge_same_term,
            shard_cells=a.shard_cells, ivf_lists=a.ivf_lists, ivf_probes=a.ivf_probes,
        )
    print(out)
    return 0


def _cmd_reshard(a: argparse.Namespace) -> int:
    from .build import reshard_reference

    print(reshard_reference(a.reference, a.output, shard_cells=a.shard_cells))
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from . import store

    st = store.convert(a.matrix, a.output)
    _log(f"{st.path}: {st.n_cells} cells, {st.n_features} genes, {st.nnz} non-zero counts")
    print(st.path)
    return 0


def _cmd_de(a: argparse.Namespace) -> int:
    from . import config, pipeline

    settings = config.resolve(**_cluster_settings(a))
    if a.print_job_script:
        return _print_job_script(settings)
    matrix = example_path() if a.matrix == "example" else a.matrix
    print(pipeline.run_de(matrix, a.groups, a.output, settings=settings, log=_log))
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from .models import builtin_models, load_model

    rows = []
    paths = [(n, p, "built-in") for n, p in builtin_models().items()] + [(Path(p).name, Path(p), "user") for p in a.paths]
    for name, path, kind in paths:
        m = load_model(path)
        rows.append({"name": m.name, "kind": kind, "model_kind": m.kind, "species": m.species, "cells": m.n_cells, "version": m.version,
                     "labels": list(m.labels), "organs": list(m.meta.get("organs", [])), "path": str(path)})
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            if r["model_kind"] == "markers":
                organs = f", {len(r['organs'])} organs: {', '.join(r['organs'])}" if r["organs"] else ""
                print(f"{r['name']}\t{r['kind']}\t{r['species']}\tmarkers\tv{r['version']}\t{len(r['labels'])} cell types{organs}")
                continue
            print(f"{r['name']}\t{r['kind']}\t{r['species']}\t{r['cells']} cells\tv{r['version']}\t{len(r['labels'])} labels: {', '.join(r['labels'])}")
    return 0


def _cmd_summary(a: argparse.Namespace) -> int:
    from . import pipeline

    print(pipeline.rebuild_summary(a.model_dir))
    return 0


def _cmd_example_path(a: argparse.Namespace) -> int:
    print(example_path())
    return 0


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to run (see deploy/README.md)")
    g.add_argument("--scheduler", default=None,
                   help="auto | threads | processes | local | slurm | pbs | sge | lsf | tcp://HOST:PORT (default auto: threads, or local processes for ANN models)")
    g.add_argument("--n-workers", type=int, default=None, help="workers, or batch jobs for slurm/pbs/sge/lsf (default: cores; 1 job)")
    g.add_argument("--cluster-config", default=None, help="YAML with jobqueue settings for slurm/pbs/sge/lsf (examples in deploy/)")
    g.add_argument("--print-job-script", action="store_true", help="print the batch script a worker job would use, then exit")
    g.add_argument("--worker-timeout", type=float, default=None, help="seconds to wait for the first batch-job worker (default 600)")
    g.add_argument("--cores", type=int, default=None, help="cores per batch job")
    g.add_argument("--memory", default=None, help="memory per batch job, e.g. 16GiB")
    g.add_argument("--walltime", default=None, help="walltime per batch job, e.g. 02:00:00")
    g.add_argument("--queue", default=None, help="queue / partition for batch jobs")
    g.add_argument("--account", default=None, help="account / project to charge batch jobs to")
    g.add_argument("--log-dir", default=None, help="where batch jobs write their logs (default ~/.dask-annot/logs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dask-annot",
        description="Cell type annotation of 10x single-cell and Visium HD matrices on your own machine or cluster, with Dask.",
    )
    p.add_argument("--version", action="version", version=f"dask-annot {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    an = sub.add_parser("annotate", help="label every cell of a count matrix",
                        description="Label every cell of a count matrix and write Space Ranger's cell_types outputs.",
                        epilog="example: dask-annot annotate --id sample1 --matrix filtered_feature_bc_matrix.h5 --output-dir results")
    an.add_argument("--id", required=True, help="run name; outputs go to OUTPUT_DIR/ID/outs/segmented_outs/cell_types/")
    an.add_argument("--matrix", required=True, help="10x H5 (v3 or legacy), .h5ad with raw counts, MEX directory, a store from `convert`, "
                    "'example', or a Space Ranger outs/ (or segmented_outputs/) directory: its cell-segmented filtered matrix")
    an.add_argument("--allow-bins", action="store_true",
                    help="annotate Visium HD bins (barcodes s_008um_...) anyway; refused by default, as models are trained on cells")
    an.add_argument("--cell-geometry", default=None,
                    help="cell_segmentations.geojson for the tissue map and obsm['spatial'] (default: the one beside the matrix)")
    an.add_argument("--cell-annotation-model", default=None,
                    help="one or more models, comma-separated: auto (the built-in kNN model for the species), a built-in "
                         "model name, or a reference directory; each writes its own folder under cell_types/ "
                         "(default: the species' default models)")
    an.add_argument("--output-dir", default=".", help="where the ID directory is created (default: current directory)")
    _add_cluster_flags(an)
    an.add_argument("--k", type=int, default=None, help="neighbours per cell (default 500; capped for small references)")
    an.add_argument("--chunk-cells", type=int, default=None, help="cells per Dask chunk (default 10000; labels do not depend on it)")
    an.add_argument("--knn-method", default=None, choices=["auto", "exact", "ann", "ivf"],
                    help="neighbour search: exact (BLAS screen + float64), ivf (inverted lists, exact re-scoring), ann (pynndescent); "
                         "default auto: exact up to 400,000 reference cells, then ivf if the reference has lists")
    an.add_argument("--layout", default=None, choices=["cloud", "hierarchical"], help="cell_types.csv columns (default cloud)")
    an.add_argument("--consensus", default=None, choices=["auto", "spread", "none"],
                    help="label spreading of the votes over the query's own 15-NN graph; default auto: only when the "
                         "reference is small enough that k is capped (under 50,000 cells)")
    an.add_argument("--reject", default=None, choices=["auto", "none"],
                    help="auto (default): cells unlike the reference are 'Unassigned' and a call is only as deep as its "
                         "calibrated probability supports; none: every cell gets a fine label (10x's semantics)")
    an.add_argument("--organ", default=None, help="marker models: only the cell types of these organs (comma-separated, "
                                                  "e.g. pancreas; `dask-annot models` lists them) are candidates; default: every organ")
    an.add_argument("--force", action="store_true", help="run on fewer than 100 cells")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(func=_cmd_annotate)

    br = sub.add_parser("build-reference", help="build a reference model from labelled counts",
                        description="Build a versioned reference (genes, normalization, PCA, embedding, labels, levels, index).",
                        epilog="example: dask-annot build-reference --input labelled.h5ad --label-column cell_type --name my_ref --output my_ref --ontology-map map.csv")
    br.add_argument("--input", nargs="+", help=".h5ad with raw counts (or a 10x H5 with --labels); or one or more "
                    "CELLxGENE-schema .h5ad files, streamed into one reference")
    br.add_argument("--label-column", default=None, help="obs column (or --labels CSV column) holding the cell type "
                    "(CELLxGENE inputs: cell_type_ontology_term_id, the default)")
    br.add_argument("--census", metavar="FILTER", default=None, help="build from the CELLxGENE Census: cells whose obs match "
                    "FILTER, e.g. 'tissue_general == \"lung\" and is_primary_data == True' (needs dask-annot[census])")
    br.add_argument("--organism", default="homo_sapiens", help="Census organism (default homo_sapiens)")
    br.add_argument("--census-version", default=None, help="Census release (default: the latest stable)")
    br.add_argument("--census-uri", default=None, help="a local or cloud SOMA store (a Census copy or one experiment) instead of the public Census")
    br.add_argument("--obs-filter", default=None, help="CELLxGENE files: keep cells whose obs match this expression")
    br.add_argument("--max-cells-per-type", type=int, default=None, help="CELLxGENE/Census: keep at most N cells per cell type "
                    "(seeded by --seed, stratified by dataset)")
    br.add_argument("--min-cells-per-type", type=int, default=None, help="CELLxGENE/Census: drop (and report) cell types with "
                    "fewer cells (default 10)")
    br.add_argument("--merge-same-term", action="store_true", help="allow labels mapped to the same Cell Ontology term to become one class")
    br.add_argument("--markers", default=None, help="instead of --input: a marker table CSV (cell_type,ontology_id,gene[,sign,organ]); "
                    "builds a marker model (see docs/marker-models.md)")
    br.add_argument("--name", required=True, help="model name (the output subdirectory of annotate)")
    br.add_argument("--output", required=True, help="new directory for the reference")
    br.add_argument("--ontology-map", default=None, help="CSV label,ontology_id mapping labels to Cell Ontology terms")
    br.add_argument("--dataset-column", default=None, help="obs column with a dataset/batch id per cell")
    br.add_argument("--labels", default=None, help="CSV with barcode,<label column>[,<dataset column>] for a 10x H5 input")
    br.add_argument("--exclude-label", action="append", help="label value marking unlabelled cells, left out (repeatable), e.g. '?'")
    br.add_argument("--species", default=None, help="human, mouse, ... (default: guessed from the genes)")
    br.add_argument("--version", default="1", help="model version recorded in the artifact")
    br.add_argument("--n-hvg", type=int, default=1000, help="highly variable genes (default 1000)")
    br.add_argument("--n-pcs", type=int, default=30, help="principal components (default 30)")
    br.add_argument("--seed", type=int, default=0, help="seed for the ANN index")
    br.add_argument("--knn-method", default="auto", choices=["auto", "exact", "ann", "ivf"],
                    help="search the model is built for; ann stores a pynndescent index, ivf inverted lists "
                         "(default: by size, ivf above 400,000 cells)")
    br.add_argument("--shard-cells", type=int, default=None,
                    help="split the reference into shards of this many cells, each with its own files (default: "
                         "1,000,000 above 400,000 cells, else unsharded)")
    br.add_argument("--ivf-lists", type=int, default=None, help="inverted lists of the ivf search (default: about 1 per 1,000 cells)")
    br.add_argument("--ivf-probes", type=int, default=None, help="lists probed per query cell by the ivf search (default 48)")
    _add_cluster_flags(br)  # --census: the Dask scheduler that reads the slices (default: threads here)
    br.set_defaults(func=_cmd_build_reference)

    rs = sub.add_parser("reshard-reference", help="split a built reference into shards (same search, new shard files)")
    rs.add_argument("--reference", required=True, help="a built kNN reference directory")
    rs.add_argument("--output", required=True, help="new directory for the sharded copy")
    rs.add_argument("--shard-cells", type=int, required=True, help="reference cells per shard")
    rs.set_defaults(func=_cmd_reshard)

    cv = sub.add_parser("convert", help="convert a matrix into a reusable zarr store",
                        epilog="example: dask-annot convert --matrix filtered_feature_bc_matrix.h5 --output sample.zarr")
    cv.add_argument("--matrix", required=True)
    cv.add_argument("--output", required=True)
    cv.set_defaults(func=_cmd_convert)

    de = sub.add_parser("de", help="sSeq differential expression between groups of your own",
                        epilog="example: dask-annot de --matrix filtered_feature_bc_matrix.h5 --groups clusters.csv --output de.csv")
    de.add_argument("--matrix", required=True, help="10x H5, .h5ad, MEX directory, a store from `convert`, or 'example'")
    de.add_argument("--groups", required=True, help="CSV barcode,group")
    de.add_argument("--output", required=True)
    _add_cluster_flags(de)
    de.set_defaults(func=_cmd_de)

    mo = sub.add_parser("models", help="list built-in (and given) reference models", epilog="example: dask-annot models ./my_ref")
    mo.add_argument("paths", nargs="*", help="reference directories to list too")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(func=_cmd_models)

    su = sub.add_parser("summary", help="rebuild web_summary.html of a finished run",
                        epilog="example: dask-annot summary demo_out/demo/outs/segmented_outs/cell_types/human_pbmc_v1")
    su.add_argument("model_dir", help="the model's output directory (holding cell_types.csv and run.json)")
    su.set_defaults(func=_cmd_summary)

    ex = sub.add_parser("example-path", help="print the path of the bundled example matrix")
    ex.set_defaults(func=_cmd_example_path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DaskAnnotError as exc:
        print(f"dask-annot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dask-annot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
