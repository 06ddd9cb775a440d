#!/usr/bin/env python
"""Simulate a 10x count matrix of any size, fitted to a real labelled data set.

One command (from the repository root)::

    python benchmarks/simulate.py --cells 100000 --output sim.h5 [--seed 0]
        [--source PATH.h5ad --label-column COL]

writes ``sim.h5`` (Cell Ranger v3 HDF5, gzip), ``sim.labels.csv`` (``barcode,label``:
the true cell type of every cell) and ``sim.json`` (what was fitted and generated), so
annotation accuracy can be scored at any scale.

The model, fitted per cell type of the source (default: the FACS-sorted PBMC of Zheng
2017, ``trueLabel``):

* type frequencies;
* library size: log-normal (mean and s.d. of the log UMI total), truncated to the
  type's observed range, because the source was filtered on UMI counts;
* gene mean proportions, with a pseudocount of 0.01 UMI per gene and type;
* gene-wise negative-binomial overdispersion ``phi`` (variance ``mu + phi mu^2``), by
  the method of moments with each cell's own mean ``mu = L p``:
  ``phi = sum((x - mu)^2 - x) / sum(mu^2)``, clipped to ``[1e-3, 10]``; genes with
  fewer than 10 UMI in a type get the type's median.

Cells are generated in blocks of ``--block-cells`` with a generator seeded by
``(seed, block number)``, so the same seed and arguments give the same file. Counts are
exact NB draws: genes with a large mean go through Gamma-Poisson; the rest (almost all
entries, almost all zero) through the NB inverse CDF of one uniform per entry, which
costs no gamma draw for the zeros. Memory is one block of cells (CSR) plus a dense
working set of ``SUB_CELLS`` cells x genes, whatever ``--cells`` is.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtr, ndtri

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_sorted_zheng2017" / "pbmc_sorted_3500.h5ad"
DEFAULT_LABEL = "trueLabel"
VERSION = 1  # of the model and the sampling; part of sim.json, so caches notice a change
BLOCK_CELLS = 20_000
SUB_CELLS = 1_000  # cells per dense working set (SUB_CELLS x genes float64 arrays)
PSEUDOCOUNT = 0.01  # UMI added to every gene's total in every type (genes unseen in a type)
PHI_MIN, PHI_MAX = 1e-3, 10.0
PHI_MIN_COUNTS = 10  # fewer UMI of a gene in a type: use the type's median phi
DENSE_MEAN = 30.0  # genes whose largest expected count exceeds this use Gamma-Poisson


@dataclass(frozen=True)
class Profile:
    """Per-type parameters fitted from the source (``T`` types x ``G`` genes)."""

    labels: tuple[str, ...]
    freq: np.ndarray  # (T,) type frequencies
    log_mean: np.ndarray  # (T,) log library size: mean, sd, truncation bounds
    log_sd: np.ndarray
    log_lo: np.ndarray
    log_hi: np.ndarray
    prop: np.ndarray  # (T, G) expected share of a cell's UMI per gene; rows sum to 1
    phi: np.ndarray  # (T, G) NB overdispersion
    gene_ids: np.ndarray
    gene_names: np.ndarray
    source: dict

    @property
    def n_genes(self) -> int:
        return int(self.prop.shape[1])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_labels(path: Path, column: str, barcodes: np.ndarray) -> np.ndarray:
    import anndata

    a = anndata.read_h5ad(path, backed="r")
    try:
        if column not in a.obs.columns:
            raise SystemExit(f"{path}: obs has no column '{column}'; columns are {', '.join(a.obs.columns)}")
        if not np.array_equal(a.obs_names.astype(str), barcodes.astype(str)):
            raise SystemExit(f"{path}: obs names differ from the matrix barcodes")
        return a.obs[column].astype(str).to_numpy(dtype=object)
    finally:
        a.file.close()


def fit_profile(source: str | os.PathLike, label_column: str, *, block_cells: int = BLOCK_CELLS) -> Profile:
    """Fit the per-type model from a labelled count matrix (``.h5ad`` with raw counts).

    Streams the source in blocks, keeping per-type sufficient statistics only.
    Cells labelled empty / ``nan`` are left out.
    """
    from dask_annot import h5

    source = Path(source)
    info = h5.open_matrix(source)
    labels = _read_labels(source, label_column, info.barcodes)
    names = sorted({x for x in labels.tolist() if x not in ("", "nan", "None")})
    code_of = {x: i for i, x in enumerate(names)}
    codes = np.array([code_of.get(x, -1) for x in labels], dtype=np.int64)
    T, G = len(names), info.n_features
    count = np.zeros((T, G))  # sum x
    count_sq = np.zeros((T, G))  # sum x^2
    count_lib = np.zeros((T, G))  # sum x L
    lib_sq = np.zeros(T)  # sum L^2
    lib = np.zeros(T)  # sum L
    logs: list[list[np.ndarray]] = [[] for _ in range(T)]
    for start in range(0, info.n_cells, block_cells):
        stop = min(start + block_cells, info.n_cells)
        X = h5.read_cells(info, start, stop).astype(np.float64)
        c = codes[start:stop]
        L = np.asarray(X.sum(axis=1)).ravel()
        for t in range(T):
            rows = np.flatnonzero((c == t) & (L > 0))
            if rows.size == 0:
                continue
            Xt, Lt = X[rows], L[rows]
            count[t] += np.asarray(Xt.sum(axis=0)).ravel()
            count_sq[t] += np.asarray(Xt.multiply(Xt).sum(axis=0)).ravel()
            count_lib[t] += np.asarray(Xt.T @ Lt).ravel()
            lib_sq[t] += float(Lt @ Lt)
            lib[t] += Lt.sum()
            logs[t].append(np.log(Lt))
    n = np.array([sum(x.size for x in lg) for lg in logs])
    if (n < 2).any():
        raise SystemExit(f"{source}: type(s) {[names[t] for t in np.flatnonzero(n < 2)]} have fewer than 2 cells; cannot fit them")
    log_all = [np.concatenate(lg) for lg in logs]
    p_mle = count / lib[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        resid = count_sq - 2.0 * p_mle * count_lib + p_mle**2 * lib_sq[:, None] - count  # sum (x - Lp)^2 - x
        phi = resid / (p_mle**2 * lib_sq[:, None])
    phi = np.clip(np.nan_to_num(phi, nan=PHI_MIN, posinf=PHI_MAX, neginf=PHI_MIN), PHI_MIN, PHI_MAX)
    enough = count >= PHI_MIN_COUNTS
    for t in range(T):
        fill = np.median(phi[t, enough[t]]) if enough[t].any() else 1.0
        phi[t, ~enough[t]] = fill
    prop = (count + PSEUDOCOUNT) / (count.sum(axis=1, keepdims=True) + PSEUDOCOUNT * G)
    return Profile(
        labels=tuple(names),
        freq=n / n.sum(),
        log_mean=np.array([x.mean() for x in log_all]),
        log_sd=np.array([max(x.std(ddof=1), 1e-6) for x in log_all]),
        log_lo=np.array([x.min() for x in log_all]),
        log_hi=np.array([x.max() for x in log_all]),
        prop=prop,
        phi=phi,
        gene_ids=np.asarray(info.feature_ids, dtype=object),
        gene_names=np.asarray(info.feature_names, dtype=object),
        source={"path": str(source.resolve()), "sha256": _sha256(source), "label_column": label_column,
                "cells": int(n.sum()), "genes": G},
    )


def _truncated_normal(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Standard normal draws truncated to ``[lo, hi]`` (inverse CDF of one uniform each)."""
    a, b = ndtr(lo), ndtr(hi)
    return ndtri(a + (b - a) * rng.random(lo.shape))


def _nb_quantile_positive(u: np.ndarray, p0: np.ndarray, mu: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Smallest ``k >= 1`` with NB CDF(k) >= u, for entries whose ``u > CDF(0) = p0``.

    The pmf recursion is ``P(k) = P(k-1) (k - 1 + r) / k q`` with ``r = 1/phi`` and
    ``q = phi mu / (1 + phi mu)``; all entries step through ``k`` together and leave
    the working arrays once their CDF reaches their uniform.
    """
    r = 1.0 / phi
    q = phi * mu / (1.0 + phi * mu)
    k = np.ones(u.size, dtype=np.int32)
    pmf = p0 * r * q
    cdf = p0 + pmf
    pos = np.flatnonzero(cdf < u)
    ua, ra, qa, pmfa, cdfa, mua = u[pos], r[pos], q[pos], pmf[pos], cdf[pos], mu[pos]
    kk = 1
    while pos.size:
        kk += 1
        pmfa = pmfa * ((kk - 1 + ra) / kk) * qa
        cdfa = cdfa + pmfa
        k[pos] = kk
        # past the mean with a pmf far below double precision, the rest is rounding: stop there
        keep = (cdfa < ua) & ~((pmfa < 1e-18) & (kk > mua))
        if not keep.all():
            pos, ua, ra, qa, pmfa, cdfa, mua = pos[keep], ua[keep], ra[keep], qa[keep], pmfa[keep], cdfa[keep], mua[keep]
    return k


def _sample_counts(rng: np.random.Generator, prof: Profile, types: np.ndarray, lib: np.ndarray,
                   dense_genes: np.ndarray) -> sp.csr_matrix:
    """NB counts (CSR int32) of a few cells given their types and library sizes."""
    n, G = types.size, prof.n_genes
    rows_out, cols_out, vals_out = [], [], []
    if dense_genes.size:
        mu = lib[:, None] * prof.prop[types][:, dense_genes]
        phi = prof.phi[types][:, dense_genes]
        lam = rng.standard_gamma(1.0 / phi) * phi * mu
        x = rng.poisson(lam)
        r, c = np.nonzero(x)
        rows_out.append(r)
        cols_out.append(dense_genes[c])
        vals_out.append(x[r, c])
    # NB P(X > 0) <= E[X] = mu, so an entry can only be non-zero where u > 1 - mu: the
    # exact P(0) (a log1p and an exp) is needed for those candidates only
    mu = prof.prop[types]
    mu *= lib[:, None]
    mu[:, dense_genes] = 0.0
    u = rng.random(mu.shape)
    r, c = np.nonzero(u > 1.0 - mu)
    u, mu = u[r, c], mu[r, c]
    phi = prof.phi[types[r], c]
    p0 = np.exp(np.log1p(phi * mu) / -phi)  # (1 + phi mu)^(-1/phi)
    hit = u > p0
    r, c = r[hit], c[hit]
    vals = _nb_quantile_positive(u[hit], p0[hit], mu[hit], phi[hit])
    rows_out.append(r)
    cols_out.append(c)
    vals_out.append(vals)
    rows, cols, vals = (np.concatenate(x) for x in (rows_out, cols_out, vals_out))
    return sp.csr_matrix((vals.astype(np.int32), (rows, cols)), shape=(n, G))


def simulate_block(prof: Profile, rng: np.random.Generator, n: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """``n`` cells: (counts CSR int32 cells x genes, type codes)."""
    types = rng.choice(len(prof.labels), size=n, p=prof.freq)
    m, s = prof.log_mean[types], prof.log_sd[types]
    z = _truncated_normal(rng, (prof.log_lo[types] - m) / s, (prof.log_hi[types] - m) / s)
    lib = np.exp(m + s * z)
    top = (prof.prop * np.exp(prof.log_hi)[:, None]).max(axis=0)
    dense_genes = np.flatnonzero(top > DENSE_MEAN)
    parts = [
        _sample_counts(rng, prof, types[lo : lo + SUB_CELLS], lib[lo : lo + SUB_CELLS], dense_genes)
        for lo in range(0, n, SUB_CELLS)
    ]
    return sp.vstack(parts, format="csr"), types


def barcode(i: int) -> str:
    return f"simcell_{i:09d}-1"


def labels_path(output: str | os.PathLike) -> Path:
    """``sim.h5`` -> ``sim.labels.csv``."""
    p = Path(output)
    return p.with_name(p.stem + ".labels.csv")


def meta_path(output: str | os.PathLike) -> Path:
    """``sim.h5`` -> ``sim.json``."""
    p = Path(output)
    return p.with_name(p.stem + ".json")


def simulate(output: str | os.PathLike, *, cells: int, seed: int = 0, source: str | os.PathLike = DEFAULT_SOURCE,
             label_column: str = DEFAULT_LABEL, block_cells: int = BLOCK_CELLS, genome: str = "", log=None) -> dict:
    """Write ``cells`` simulated cells to ``output`` (10x v3 H5) with ``*.labels.csv`` and ``*.json``.

    Files appear complete or not at all (written under temporary names, then renamed).
    Returns the record also written to ``*.json``.
    """
    from dask_annot.h5 import TenxH5Writer

    if cells < 1:
        raise SystemExit(f"--cells must be at least 1, got {cells}")
    t0 = time.perf_counter()
    prof = fit_profile(source, label_column)
    t_fit = time.perf_counter() - t0
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_h5 = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    lab = labels_path(output)
    tmp_lab = lab.with_name(f".{lab.name}.tmp-{os.getpid()}")
    per_type = np.zeros(len(prof.labels), dtype=np.int64)
    nnz = 0
    try:
        with TenxH5Writer(tmp_h5, feature_ids=prof.gene_ids, feature_names=prof.gene_names, genome=genome) as w, \
                open(tmp_lab, "w", newline="") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(["barcode", "label"])
            for b, start in enumerate(range(0, cells, block_cells)):
                n = min(block_cells, cells - start)
                rng = np.random.default_rng(np.random.SeedSequence([seed, b]))
                X, types = simulate_block(prof, rng, n)
                bcs = [barcode(i) for i in range(start, start + n)]
                w.append(X, bcs)
                out.writerows(zip(bcs, np.asarray(prof.labels, dtype=object)[types]))
                per_type += np.bincount(types, minlength=len(prof.labels))
                nnz += X.nnz
                if log:
                    el = time.perf_counter() - t0
                    log(f"{start + n}/{cells} cells ({el:.0f} s, {(start + n) / max(el - t_fit, 1e-9):.0f} cells/s)")
        os.replace(tmp_lab, lab)
        os.replace(tmp_h5, output)
    except BaseException:
        for p in (tmp_h5, tmp_lab):
            p.unlink(missing_ok=True)
        raise
    record = {
        "simulator_version": VERSION,
        "cells": cells,
        "seed": seed,
        "block_cells": block_cells,
        "genes": prof.n_genes,
        "nnz": int(nnz),
        "source": prof.source,
        "labels": {lab_: int(c) for lab_, c in zip(prof.labels, per_type)},
        "fit_s": round(t_fit, 2),
        "generate_s": round(time.perf_counter() - t0 - t_fit, 2),
        "matrix": output.name,
        "matrix_bytes": output.stat().st_size,
        "truth": lab.name,
    }
    meta_path(output).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, required=True, help="number of cells to simulate")
    p.add_argument("--output", required=True, help="10x v3 H5 to write; the truth goes to <stem>.labels.csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help=f"labelled .h5ad with raw counts (default {DEFAULT_SOURCE})")
    p.add_argument("--label-column", default=DEFAULT_LABEL, help=f"obs column holding the cell type (default {DEFAULT_LABEL})")
    p.add_argument("--block-cells", type=int, default=BLOCK_CELLS, help=f"cells generated and written at a time (default {BLOCK_CELLS})")
    p.add_argument("--genome", default="", help="genome name written for every feature")
    a = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rec = simulate(a.output, cells=a.cells, seed=a.seed, source=a.source, label_column=a.label_column,
                   block_cells=a.block_cells, genome=a.genome, log=log)
    log(f"wrote {a.output} ({rec['cells']} cells, {rec['genes']} genes, {rec['nnz']} non-zero) and "
        f"{labels_path(a.output)} in {rec['fit_s'] + rec['generate_s']:.1f} s")
    print(a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
