"""The web summary: content from real outputs, bounded size at 1.2M cells, and a real browser.

The browser tests drive Debian's chromium headless over the DevTools protocol on a
pipe (``--remote-debugging-pipe``: no port, no websocket library): they load the
page from a file, fail on any console error, uncaught exception or network request,
check what rendered, click the tabs, and take a full-page screenshot, kept under the
pytest tmp dir and copied to ``tests/artifacts/web_summary.png`` for a person to look at.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_annot import pipeline, summary

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")


# ----------------------------------------------------------------------------- a headless browser


def _high_fd(fd: int) -> int:
    """The same pipe end above fd 9, so it cannot collide with the child's fds 3 and 4."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """Chromium headless driven over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
             "--remote-debugging-pipe")

    def __init__(self, user_data_dir: Path, *, width: int = 1280, height: int = 2000):
        cmd_r, self._cmd_w = (_high_fd(fd) for fd in os.pipe())
        self._out_r, out_w = (_high_fd(fd) for fd in os.pipe())

        def child_fds() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.stderr_path = user_data_dir / "chromium.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *self.FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            self.call(domain, session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def call(self, method: str, params: dict | None = None, *, session: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _wait(self, match, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                m = json.loads(raw)
                if match(m):
                    return m
                self.events.append(m)
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"chromium did not answer (exit code {self.proc.poll()}); see {self.stderr_path}")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise TimeoutError(f"chromium closed the pipe; see {self.stderr_path}")
                self._buf += chunk

    def open(self, path: Path, timeout: float = 60) -> None:
        """Navigate to a file and wait for its load event (and two frames after it)."""
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
        seen = [e for e in self.events if e.get("method") == "Page.loadEventFired"]
        if not seen:
            self._wait(lambda m: m.get("method") == "Page.loadEventFired", timeout)
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))", await_promise=True)

    def eval(self, expression: str, *, await_promise: bool = False):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": await_promise}, session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} raised {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the viewport)."""
        size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        shot = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        }, session=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, log errors, and any request off the file."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {' '.join(str(a.get('value', a.get('description'))) for a in p.get('args', []))}")
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "about:")):
                    out.append(f"network request: {url}")
            elif m == "Network.loadingFailed":
                out.append(f"failed to load: {p.get('errorText')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stderr.close()


def ensure_chromium() -> Path:
    """Debian's chromium, installed before the session by scripts/test-prereqs.sh (never from inside the suite).

    Missing as root (CI, where the prerequisites script runs first) is a failure that says what to run;
    missing as another user is a skip that says why.
    """
    if CHROMIUM.exists():
        return CHROMIUM
    why = f"{CHROMIUM} is missing: run `bash scripts/test-prereqs.sh` as root (it installs Debian's chromium) before the tests"
    if os.geteuid() != 0:
        pytest.skip(why)
    pytest.fail(why)


@pytest.fixture(scope="session")
def chromium() -> Path:
    return ensure_chromium()


@pytest.fixture
def browser(chromium, tmp_path):
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    b = Browser(profile)
    try:
        yield b
    finally:
        b.close()


def keep_screenshot(shot: Path, name: str) -> Path:
    """Copy a screenshot to tests/artifacts/ (gitignored) so a person can look at it."""
    ARTIFACTS.mkdir(exist_ok=True)
    gi = ARTIFACTS / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")
    dest = ARTIFACTS / name
    shutil.copyfile(shot, dest)
    return dest


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The bundled example annotated for real; the summary is rebuilt from its files."""
    from dask_annot import config, pipeline
    from dask_annot.cli import example_path

    out = tmp_path_factory.mktemp("demo")
    res = pipeline.annotate("demo", example_path(), output_dir=out, settings=config.resolve(), log=lambda m: None)
    page = pipeline.rebuild_summary(res.model_dir)
    return res, page


def _synthetic(n: int, *, layout: str = "cloud", seed: int = 0):
    """A cell_types table, record and embedding shaped like a real run's, for n cells."""
    rng = np.random.default_rng(seed)
    fine_names = np.array([f"fine type {i}" for i in range(25)] + ["NA", "B <cell> & \"friends\""], dtype=object)
    coarse_of = np.array([f"coarse {i % 6}" for i in range(fine_names.size)], dtype=object)
    fine = rng.integers(0, fine_names.size, n)
    umi = rng.lognormal(7.5, 1.0, n).astype(np.int64)
    coarse_unf = coarse_of[fine]
    coarse = np.where(umi < 100, "Low UMI Barcode", coarse_unf)
    df = pd.DataFrame({"barcode": [f"cellid_{i:09d}-1" for i in range(n)], "coarse_cell_type": coarse,
                       "fine_cell_type": fine_names[fine]})
    if layout == "cloud":
        df["cell_count_in_model"] = rng.integers(1, 501, n)
    else:
        df["final_level_softmax_prob"] = rng.random(n).astype(np.float32)
    df["coarse_cell_type_unfiltered"] = coarse_unf
    df["umi_count"] = umi
    emb = (rng.normal(size=(n, 2)) + fine[:, None] * 0.3).astype(np.float32)
    record = {"run_id": "synthetic", "cells": n, "reference": {"name": "atlas_v1", "version": "1", "species": "human", "cells": 10_000_000,
              "genes": 2000, "pcs": 30}, "gene_overlap": {"matched_by": "ensembl_id", "reference_genes": 2000, "query_genes": 18000,
              "shared_genes": 1900, "shared_fraction": 0.95}, "parameters": {"k_used": 500, "k_requested": 500, "vote": "plurality (10x)",
              "low_umi_threshold": 100, "layout": layout}, "timings_s": {"convert": 100.0, "annotate": 300.0, "de": 50.0, "total": 460.0},
              "versions": {"dask-annot": "0.1.0"}, "input": {"path": "/data/big.h5"}}
    groups = sorted(set(coarse.tolist()))
    genes = 300
    de = {"Feature ID": [f"ENSG{i:011d}" for i in range(genes)], "Feature Name": [f"GENE{i}" for i in range(genes)]}
    for g in groups:
        de[f"{g} Mean Counts"] = rng.random(genes)
        de[f"{g} Log2 fold change"] = rng.normal(0, 2, genes)
        de[f"{g} Adjusted p value"] = rng.random(genes) ** 4
    return df, record, emb, pd.DataFrame(de)


# ----------------------------------------------------------------------------- content


def test_summary_of_a_real_run_holds_every_section(demo_run):
    res, page = demo_run
    text = page.read_text()
    rec = res.record
    ct = summary.read_cell_types(res.model_dir / "cell_types.csv")
    assert page.name == "web_summary.html" and page.parent == res.model_dir
    for sid in ("overview", "composition", "embedding", "confidence", "markers", "quality", "run"):
        assert f'<section id="{sid}">' in text
    # composition: every coarse and fine type with its count
    for name, count in ct["coarse_cell_type"].value_counts().items():
        assert f"{count:,}" in text and name in text
    for name in ct["fine_cell_type"].unique():
        assert summary.esc(name) in text
    # the real parameters, timings, gene overlap
    assert f"k = {rec['parameters']['k_used']}" in text
    assert f"{rec['gene_overlap']['shared_genes']:,} of the reference's {rec['gene_overlap']['reference_genes']:,} genes" in text
    assert "reference PC1" in text and "<path data-key=" in text
    assert "should not be treated as a confidence metric" in text
    # nothing that could load from the network
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in text
    assert len(text) < 400_000


def test_markers_are_up_and_significant_from_the_real_de_table(demo_run):
    res, page = demo_run
    de = pd.read_csv(res.model_dir / "cell_annotation_differential_expression.csv")
    markers = summary.top_markers(de)
    assert list(markers) == res.record["differential_expression"]["groups"]
    text = page.read_text()
    for g, table in markers.items():
        assert 0 < len(table) <= summary.MARKERS_PER_TYPE
        assert (table["log2fc"] > 0).all() and (table["adj_p"] < 0.10).all()
        strong = table[table["mean_counts"] >= summary.MARKER_MIN_MEAN]
        assert strong["log2fc"].is_monotonic_decreasing and strong.index.tolist() == list(range(len(strong)))
        for gene in table["gene"]:
            assert f">{gene}</td>" in text
    # canonical PBMC markers come out on top of their types
    top = {g: set(t["gene"]) for g, t in markers.items()}
    assert {"CD79A", "FCER2"} <= top["B cell"]
    assert {"CD14", "LYZ", "FCN1"} <= top["monocyte"]
    assert {"GNLY", "NKG7"} <= top["natural killer cell"]
    assert {"CD3D", "CD3E", "IL7R"} <= top["T cell"]


def test_top_markers_filters_and_orders():
    de = pd.DataFrame({
        "Feature ID": ["a", "b", "c", "d", "e"], "Feature Name": ["A", "B", "C", "D", "E"],
        "T Mean Counts": [1.0, 2, 3, 4, 5], "T Log2 fold change": [1.0, 3.0, -2.0, 3.0, 5.0],
        "T Adjusted p value": [0.01, 0.05, 0.0, 0.01, 0.2],
    })
    t = summary.top_markers(de)["T"]
    assert t["gene"].tolist() == ["D", "B", "A"]  # E: p too large; C: down; D before B: same FC, smaller p
    de["T Mean Counts"] = [1.0, 0.1, 3, 0.5, 5]  # B and D rarely detected: they come after A
    assert summary.top_markers(de)["T"]["gene"].tolist() == ["A", "D", "B"]
    assert summary.top_markers(None) == {}


def test_render_is_deterministic_and_escapes_labels():
    df, record, emb, de = _synthetic(3000)
    a = summary.render_web_summary(record=record, cell_types=df, embedding2d=emb, de=de)
    b = summary.render_web_summary(record=record, cell_types=df, embedding2d=emb, de=de)
    assert a == b
    assert "B &lt;cell&gt; &amp; &#34;friends&#34;" in a and "<cell>" not in a
    assert ">NA <" in a or ">NA</" in a  # the label NA is a label, not a missing value


def test_without_embedding_or_de_says_so():
    df, record, _, _ = _synthetic(500, layout="hierarchical")
    record["differential_expression"] = {"written": False, "reason": "fewer than 2 coarse cell types (1)"}
    text = summary.render_web_summary(record=record, cell_types=df, embedding2d=None, de=None)
    assert "The embedding was not passed" in text
    assert "fewer than 2 coarse cell types (1)" in text
    assert "final_level_softmax_prob" in text


def test_bad_embedding_shape_is_refused():
    df, record, emb, de = _synthetic(100)
    with pytest.raises(ValueError, match=r"expected \(100, 2\)"):
        summary.render_web_summary(record=record, cell_types=df, embedding2d=emb[:50], de=de)


def test_written_atomically(tmp_path):
    df, record, emb, de = _synthetic(200)
    out = tmp_path / "web_summary.html"
    summary.write_web_summary(out, record=record, cell_types=df, embedding2d=emb, de=de)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["web_summary.html"]


def test_rebuild_of_a_directory_without_a_run_is_a_clear_error(tmp_path):
    from dask_annot.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="run.json: missing"):
        pipeline.rebuild_summary(tmp_path)
    from dask_annot.cli import main

    assert main(["summary", str(tmp_path)]) == InputNotFoundError.exit_code


@pytest.mark.slow
def test_small_and_fast_at_1_2_million_cells():
    df, record, emb, de = _synthetic(1_200_000)
    text = summary.render_web_summary(record=record, cell_types=df, embedding2d=emb, de=de)
    # the scatter is capped, distributions are binned: the page does not grow with the cells
    assert text.count("M") < summary.MAX_POINTS * 2 + 5000
    assert len(text) < 2_500_000, len(text)
    assert "20,000 of 1,200,000 cells" in text


# ----------------------------------------------------------------------------- a real browser


def _check_rendered(browser: Browser, page: Path, shot_name: str, tmp_path: Path) -> Path:
    browser.open(page)
    assert browser.problems() == []
    assert browser.eval("document.querySelectorAll('main > section').length") == 7
    # the SVGs laid out with a real size, the scatter holds points
    sizes = browser.eval("[...document.querySelectorAll('svg')].filter(s => !s.closest('[hidden]')).map(s => s.getBoundingClientRect().width)")
    assert sizes and min(sizes) > 100
    assert browser.eval("document.querySelector('#emb-0 svg.scatter path').getTotalLength() >= 0") is True
    # tabs: the fine composition is hidden until its tab is clicked
    assert browser.eval("document.getElementById('comp-1').hidden") is True
    browser.eval("document.querySelector('[data-tab=\"comp-1\"]').click()")
    assert browser.eval("document.getElementById('comp-1').hidden") is False
    assert browser.eval("document.getElementById('comp-0').hidden") is True
    browser.eval("document.querySelector('[data-tab=\"comp-0\"]').click()")
    # legend hover highlights one type
    browser.eval("document.querySelector('#emb-0 ul.legend li').dispatchEvent(new MouseEvent('mouseenter'))")
    assert browser.eval("document.querySelectorAll('#emb-0 path.hl').length") == 1
    browser.eval("document.querySelector('#emb-0 ul.legend li').dispatchEvent(new MouseEvent('mouseleave'))")
    assert browser.problems() == []
    shot = browser.screenshot(tmp_path / shot_name)
    assert shot.stat().st_size > 20_000
    return shot


@pytest.mark.browser
def test_real_run_summary_renders_in_chromium(browser, demo_run, tmp_path):
    _, page = demo_run
    shot = _check_rendered(browser, page, "web_summary.png", tmp_path)
    kept = keep_screenshot(shot, "web_summary.png")
    print(f"screenshot: {shot} (copy: {kept})")


@pytest.mark.browser
@pytest.mark.slow
def test_large_synthetic_summary_renders_in_chromium(browser, tmp_path):
    df, record, emb, de = _synthetic(200_000)
    page = tmp_path / "web_summary.html"
    summary.write_web_summary(page, record=record, cell_types=df, embedding2d=emb, de=de)
    shot = _check_rendered(browser, page, "web_summary_200k.png", tmp_path)
    keep_screenshot(shot, "web_summary_200k.png")


def test_browser_reports_console_errors(browser, tmp_path):
    """The check itself works: a page with an error and a network request is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><img src='http://192.0.2.1/x.png'>"
                    "<script>console.error('boom'); nosuchfunction();</script></body></html>")
    browser.open(page)
    problems = "\n".join(browser.problems())
    assert "console.error: boom" in problems
    assert "nosuchfunction" in problems
    assert "network request: http://192.0.2.1/x.png" in problems


def test_every_registered_section_has_its_template_and_optional_ones_drop_out():
    """The registry: one template per section; a section whose build returns None is not on the page."""
    from importlib import resources

    templates = resources.files("dask_annot.summary").joinpath("templates", "sections")
    ids = [s.id for s in summary.SECTIONS]
    assert len(ids) == len(set(ids))
    for s in summary.SECTIONS:
        assert templates.joinpath(f"{s.id}.html.j2").is_file(), s.id
    df, record, emb, de = _synthetic(300)
    text = summary.render_web_summary(record=record, cell_types=df, embedding2d=emb, de=de)
    assert 'id="tissue"' not in text and 'href="#tissue"' not in text  # no positions: no tissue map
    assert text.count("<section id=") == len(ids) - 1
