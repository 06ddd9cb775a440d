"""The package's error classes: one root, each also a matching builtin.

Every message says what was found and what to do about it; the CLI prints the
message alone (no traceback) and exits with the class's ``exit_code``.
"""
from __future__ import annotations


class DaskAnnotError(Exception):
    """Root of every error dask-annot raises on purpose."""

    exit_code: int = 1


class InputNotFoundError(DaskAnnotError, FileNotFoundError):
    """A path given on the command line does not exist."""

    exit_code = 3


class InputFormatError(DaskAnnotError, ValueError):
    """The input is not a readable count matrix of a supported layout."""

    exit_code = 4


class CorruptInputError(InputFormatError):
    """The input is of a known layout but truncated or damaged."""

    exit_code = 5


class InvalidCountsError(InputFormatError):
    """Counts are negative, fractional, or inconsistent with the matrix shape."""

    exit_code = 6


class TooFewCellsError(DaskAnnotError, ValueError):
    """The matrix has no cells, or fewer than the supported minimum."""

    exit_code = 7


class GeneOverlapError(DaskAnnotError, ValueError):
    """Too few of the reference's genes are present in the query."""

    exit_code = 8


class ReferenceArtifactError(DaskAnnotError, ValueError):
    """A reference artifact is missing, damaged or of another format version."""

    exit_code = 9


class StoreError(DaskAnnotError, ValueError):
    """A zarr store is damaged, of another version, or belongs to another input."""

    exit_code = 10


class OutputError(DaskAnnotError, OSError):
    """The output location cannot be used (another run's results, disk full, ...)."""

    exit_code = 11


class ConfigError(DaskAnnotError, ValueError):
    """A setting or command-line option is invalid."""

    exit_code = 2


class ClusterError(DaskAnnotError, RuntimeError):
    """The Dask cluster could not be started or reached."""

    exit_code = 12


def check_format(found: dict, *, format: str, version: int, where: str, remedy: str, error: type[DaskAnnotError]) -> None:
    """Check the format name and version every artifact dask-annot writes carries."""
    if found.get("format") != format:
        raise error(f"{where}: format '{found.get('format')}', expected '{format}'; {remedy}")
    if found.get("format_version") != version:
        raise error(
            f"{where}: {format.removeprefix('dask-annot-')} format version {found.get('format_version')}, "
            f"this dask-annot reads version {version}; {remedy}"
        )


__all__ = [
    "check_format",
    "DaskAnnotError",
    "InputNotFoundError",
    "InputFormatError",
    "CorruptInputError",
    "InvalidCountsError",
    "TooFewCellsError",
    "GeneOverlapError",
    "ReferenceArtifactError",
    "StoreError",
    "OutputError",
    "ConfigError",
    "ClusterError",
]
