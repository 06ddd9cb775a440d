"""The web summary: one self-contained ``web_summary.html`` per model directory.

What 10x's web summary gives, for a dask-annot run: the cell type composition
(coarse and fine), the cell types on the tissue (Visium HD), how the neighbour vote
supported each label, the query cells in the reference PCA space, marker genes from
the DE table, the gene overlap with the reference, the low-UMI fraction and the
run's parameters and timings. Nothing is fetched: CSS, JavaScript, SVG and the
tissue map's PNG are inlined, so the page opens from a file without network. Its
size is bounded whatever the cell count: the scatter draws at most
:data:`MAX_POINTS` cells (a fixed, seeded subsample), distributions are binned,
and the tissue map is a raster of fixed size.

Layout of the package: data from presentation.

- :mod:`.data` -- :func:`~.data.prepare` turns the run's record and tables into a
  :class:`~.data.SummaryData` of plain arrays (no HTML);
- :mod:`.plots` -- the hand-drawn SVG pictures; :mod:`.tissue` -- the tissue map PNG;
- :mod:`.render` -- the section registry and the Jinja2 environment;
- ``templates/page.html.j2``, ``templates/sections/<id>.html.j2``, ``templates/_macros.html.j2``
  (``tabs``, ``bar_table``, ``legend``), ``static/summary.css``, ``static/summary.js``.

Adding a section is one function and one template. In :mod:`.render` (or any module
imported by it)::

    @section("calibration", "Calibration", nav="Calibration", after="confidence")
    def calibration(d: SummaryData) -> dict | None:
        if "calibration" not in d.record:
            return None                      # section left out of this page
        return {"rows": d.record["calibration"]["bins"]}

and ``templates/sections/calibration.html.j2`` receives ``d`` (the SummaryData) plus
the returned keys; values are autoescaped, pictures are passed as ``Markup``. The page
wraps it in ``<section id="calibration"><h2>Calibration</h2>...</section>`` and adds a
nav link. The browser test in ``tests/test_summary.py`` counts the sections.

Rebuild the page of a finished run with ``dask-annot summary MODEL_DIR``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .data import (LOW_UMI, MARKER_MAX_ADJ_P, MARKER_MIN_MEAN, MARKERS_PER_TYPE, MAX_FINE_ROWS, MAX_POINTS, Spatial,
                   SummaryData, prepare, read_cell_types, top_markers)
from .plots import esc
from .render import SECTIONS, render_page, section

FILENAME = "web_summary.html"

__all__ = [
    "FILENAME", "LOW_UMI", "MARKERS_PER_TYPE", "MARKER_MAX_ADJ_P", "MARKER_MIN_MEAN", "MAX_FINE_ROWS", "MAX_POINTS",
    "SECTIONS", "Spatial", "SummaryData", "esc", "prepare", "read_cell_types", "render_web_summary", "section",
    "top_markers", "write_web_summary",
]


def write_web_summary(path: str | os.PathLike, *, record: dict, cell_types: Any, embedding2d: np.ndarray | None = None,
                      de: Any = None, spatial: Spatial | None = None) -> None:
    """Write the run's ``web_summary.html`` (whole or not at all).

    Parameters
    ----------
    path
        The file to write, normally ``<model_dir>/web_summary.html``.
    record
        The run record (the content of ``run.json``); its ``warnings`` are shown on top.
    cell_types
        ``cell_types.csv`` as a ``pandas.DataFrame`` (either layout), rows in matrix order.
    embedding2d
        The first two reference PCs of each query cell (n x 2, matrix order), or ``None``:
        the page then says the embedding was not passed.
    de
        The DE table in Cell Ranger's layout, or ``None``.
    spatial
        Cell positions (and the low-resolution tissue image) for the tissue map, or ``None``.
    """
    from ..outputs import atomic_write

    atomic_write(Path(path), render_web_summary(record=record, cell_types=cell_types, embedding2d=embedding2d, de=de,
                                                spatial=spatial))


def render_web_summary(*, record: dict, cell_types: Any, embedding2d: np.ndarray | None = None, de: Any = None,
                       spatial: Spatial | None = None) -> str:
    """The page as one HTML string; pure, and the same for the same inputs."""
    return render_page(prepare(record, cell_types, embedding2d, de, spatial))
