"""Bad input: the real CLI on real broken files gives one clear line and a distinct exit code.

Every case here appears in the table of docs (issue: reliability); the message
patterns below are the contract.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from dask_annot import h5
from dask_annot.cli import example_path

from .conftest import FORMATS


def cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "dask_annot", *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    return r.returncode, r.stdout, r.stderr


def annotate(matrix, out: Path, *extra: str, env=None) -> tuple[int, str, str]:
    return cli("annotate", "--id", "run", "--matrix", str(matrix), "--output-dir", str(out), "--quiet", *extra, env=env)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dask-annot: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def nothing_complete(out: Path) -> bool:
    return not list(out.glob("**/run.json")) and not list(out.glob("**/cell_types.csv"))


def copy_matrix(tmp: Path, name: str = "scminer_cr6.0_brain_tumor_3pLT_182cells_36601genes.h5") -> Path:
    dst = tmp / "m.h5"
    shutil.copy(FORMATS / name, dst)
    os.chmod(dst, 0o644)
    return dst


def example_subset(tmp: Path, cells: slice | np.ndarray, *, name="sub.h5", mutate=None) -> Path:
    info = h5.open_matrix(example_path())
    X = h5.read_cells(info, 0, info.n_cells)[cells]
    bcs = np.asarray(info.barcodes)[cells]
    if mutate:
        X, bcs = mutate(X, bcs)
    path = tmp / name
    h5.write_10x_h5(path, X, barcodes=bcs, feature_ids=info.feature_ids, feature_names=info.feature_names)
    return path


CASES = []


def case(fn):
    CASES.append(fn.__name__)
    return fn


@case
def test_missing_path(tmp_path):
    code, _, err = annotate(tmp_path / "nope.h5", tmp_path / "out")
    assert code == 3
    assert "no such file or directory; check the --matrix path" in one_error_line(err)


@case
def test_not_hdf5(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("barcode,count\nA,1\n")
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 4 and "not an HDF5 file" in one_error_line(err)
    assert nothing_complete(tmp_path / "out")


@case
def test_hdf5_but_not_a_10x_layout(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["images/frame0"] = np.zeros((4, 4))
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 4 and "HDF5 but not a 10x matrix" in one_error_line(err)


@case
def test_truncated_file(tmp_path):
    p = copy_matrix(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    code, _, err = annotate(p, tmp_path / "out")
    line = one_error_line(err)
    assert code == 5 and ("truncated or damaged" in line or "damaged or truncated" in line), line
    assert nothing_complete(tmp_path / "out")


@case
def test_flipped_bytes_in_a_data_chunk(tmp_path):
    p = copy_matrix(tmp_path)
    with h5py.File(p, "r") as f:
        info = f["matrix/data"].id.get_chunk_info(0)
    raw = bytearray(p.read_bytes())
    mid = info.byte_offset + info.size // 2
    raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
    p.write_bytes(bytes(raw))
    code, _, err = annotate(p, tmp_path / "out")
    line = one_error_line(err)
    assert code == 5 and "damaged or truncated, copy it again" in line, line
    assert nothing_complete(tmp_path / "out")


@case
def test_legacy_multi_genome(tmp_path):
    code, _, err = annotate(FORMATS / "scanpy_cr1.2_v2legacy_multiple_genomes.h5", tmp_path / "out")
    assert code == 4 and "multi-genome matrix (another_genome, hg19_chr21)" in one_error_line(err)


@case
def test_negative_counts(tmp_path):
    p = copy_matrix(tmp_path)
    with h5py.File(p, "r+") as f:
        d = f["matrix/data"][:]
        d[10] = -3
        f["matrix/data"][:] = d
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 6 and "counts include negative values" in one_error_line(err)


@case
def test_non_integer_counts(tmp_path):
    p = copy_matrix(tmp_path)
    with h5py.File(p, "r+") as f:
        d = f["matrix/data"][:].astype(np.float64)
        d[5] = 0.5
        del f["matrix/data"]
        f.create_dataset("matrix/data", data=d, compression="gzip")
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 6 and "non-integer values (e.g. 0.5)" in one_error_line(err)


@case
def test_duplicate_barcodes(tmp_path):
    def dup(X, bcs):
        bcs = bcs.copy()
        bcs[7] = bcs[3]
        return X, bcs

    p = example_subset(tmp_path, slice(0, 300), mutate=dup)
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 4 and "barcode(s) occur more than once" in one_error_line(err)


@case
def test_zero_cells(tmp_path):
    p = example_subset(tmp_path, slice(0, 0))
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 7 and "the matrix has no cells" in one_error_line(err)


@case
def test_fewer_than_100_cells_needs_force(tmp_path):
    p = example_subset(tmp_path, slice(0, 60))
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 7 and "60 cells, fewer than the supported minimum of 100" in one_error_line(err)
    assert nothing_complete(tmp_path / "out")
    code, _, err = annotate(p, tmp_path / "out", "--force")
    assert code == 0, err
    assert "warning:" in err and "running because of --force" in err


@case
def test_more_than_the_supported_cells_warns(tmp_path):
    # the limit comes from config (DASK_ANNOT__MAX_CELLS), so a small real file exercises the real path
    code, _, err = annotate(example_path(), tmp_path / "out", env={"DASK_ANNOT__MAX_CELLS": "500"})
    assert code == 0, err
    assert "warning:" in err and "800 cells, more than the 500 10x supports; running anyway" in err


@case
def test_no_gene_expression_features(tmp_path):
    p = copy_matrix(tmp_path, "scp_GSE164378_RNA_ADT_200cells_80features.h5")
    with h5py.File(p, "r+") as f:
        n = f["matrix/features/feature_type"].shape[0]
        del f["matrix/features/feature_type"]
        f["matrix/features/feature_type"] = np.array([b"Antibody Capture"] * n)
    code, _, err = annotate(p, tmp_path / "out")
    assert code == 4 and "no 'Gene Expression' features among 80" in one_error_line(err)


@case
def test_too_few_genes_shared_with_the_reference(tmp_path):
    code, _, err = annotate(FORMATS / "scp_cr6.1_500pbmc_50genes_587cells.h5", tmp_path / "out", "--cell-annotation-model", "human_pbmc_v1")
    line = one_error_line(err)
    assert code == 8 and "of the 1000 genes of model 'human_pbmc_v1' are present (matched by ensembl id)" in line, line


@case
def test_reference_of_another_format_version(tmp_path):
    from dask_annot.models import builtin_models

    ref = tmp_path / "ref"
    shutil.copytree(builtin_models()["human_pbmc_v1"], ref)
    meta = json.loads((ref / "reference.json").read_text())
    meta["format_version"] = 99
    (ref / "reference.json").write_text(json.dumps(meta))
    code, _, err = annotate(example_path(), tmp_path / "out", "--cell-annotation-model", str(ref))
    assert code == 9 and "reference format version 99, this dask-annot reads version 2" in one_error_line(err)


@case
def test_corrupted_reference(tmp_path):
    from dask_annot.models import builtin_models

    ref = tmp_path / "ref"
    shutil.copytree(builtin_models()["human_pbmc_v1"], ref)
    raw = bytearray((ref / "arrays.npz").read_bytes())
    raw[5000] ^= 0xFF
    (ref / "arrays.npz").write_bytes(bytes(raw))
    code, _, err = annotate(example_path(), tmp_path / "out", "--cell-annotation-model", str(ref))
    assert code == 9 and "checksum differs from reference.json; the reference is damaged" in one_error_line(err)


@case
def test_output_directory_holding_another_run(tmp_path):
    assert annotate(example_path(), tmp_path / "out")[0] == 0
    other = example_subset(tmp_path, slice(0, 400))
    code, _, err = annotate(other, tmp_path / "out")
    assert code == 11 and "holds a run of another input" in one_error_line(err)


@case
def test_disk_full(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        code, _, err = annotate(example_path(), mnt / "out")
        line = one_error_line(err)
        assert code in (10, 11) and "No space left on device" in line and "free disk space" in line, line
        assert nothing_complete(mnt / "out")
        assert not list(mnt.glob("**/*.zarr")), "a half-written store was left looking complete"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_chunk_too_large_for_memory_fails_clearly():
    """1.2M cells in one chunk against a 2,000-gene reference cannot fit in 24 GiB (the memory
    is given, so the test does not depend on the host's free memory)."""
    from dask_annot import config
    from dask_annot.errors import ConfigError
    from dask_annot.pipeline import check_memory

    have = 24 * 2**30
    s = config.resolve(chunk_cells=1_200_000, n_workers=2)
    with pytest.raises(ConfigError, match=r"needs about \d+\.\d GiB per task x 2 workers, but 24\.0 GiB is available; use --chunk-cells \d+ or fewer"):
        check_memory(s, n_cells=1_200_000, n_genes=2000, k=500, n_ref=100_000, method="ann", available=have)
    check_memory(config.resolve(n_workers=2), n_cells=1_200_000, n_genes=2000, k=500, n_ref=100_000, method="ann", available=have)
    with pytest.raises(ConfigError):  # the default chunk does not fit in 100 MiB
        check_memory(config.resolve(n_workers=2), n_cells=1_200_000, n_genes=2000, k=500, n_ref=100_000, method="ann", available=100 * 2**20)
