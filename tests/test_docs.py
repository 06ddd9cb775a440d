"""Every command in README.md and docs/*.md runs, as written, as a new user would run it.

Conventions of the docs (also stated in docs/README.md):

- In fenced ``console`` / ``bash`` / ``sh`` / ``shell`` blocks, a line starting with ``$ ``
  is a command; a trailing ``\\`` continues it on the next line, and a heredoc
  (``<<'EOF'`` ... ``EOF``) belongs to its command. Other lines are the command's
  output: each one must appear in what the command prints (stdout or stderr).
- A ``python`` block is a complete script, run as it is.
- ``# needs: slurm`` (or ``pbs``, ``sge``, ``lsf``, ``network``) at the end of a command
  runs it only where that is available (never ``network``); it is reported as skipped.
- ``<!-- doc-test: file NAME from PATH -->`` declares a file the reader is told to bring
  (their own data); the test links it from PATH (relative to the repository root)
  into the working directory. Nothing else is substituted.
- Commands running the test suite itself (``python -m pytest``) are what ``.ci/run``
  runs; they are not run again from here.

Each page runs in one bash session, in order, in a fresh copy of the working tree,
with a fresh virtual environment (system site-packages, so no downloads) in which the
package is installed from that copy with ``pip install``, as on a new machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SHELL_LANGS = {"console", "bash", "sh", "shell"}
DISPLAY_LANGS = {"text", "json", "yaml", "csv", "", "r", "R", "python-console"}
REQUIRED_PAGES = ("quickstart", "own-sample", "build-reference", "cluster", "outputs", "confidence", "comparison", "loupe", "cellxgene")
PAGE_TIMEOUT = 1200


def pages() -> list[Path]:
    found = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    return found + sorted(DOCS.glob("*.md"))


# ----------------------------------------------------------------------------- parsing


@dataclass
class Step:
    kind: str  # "sh" or "python"
    text: str
    line: int
    needs: tuple[str, ...] = ()
    expected: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"line {self.line}: {'python block' if self.kind == 'python' else '$ ' + first}"


@dataclass
class Page:
    path: Path
    steps: list[Step]
    files: dict[str, str]
    blocks: list[tuple[str, int, list[str]]]


_FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_NEEDS = re.compile(r"#\s*needs:\s*([\w ,-]+?)\s*$")
_FILE = re.compile(r"<!--\s*doc-test:\s*file\s+(\S+)\s+from\s+(\S+)\s*-->")


def parse(path: Path) -> Page:
    lines = path.read_text().splitlines()
    steps: list[Step] = []
    files: dict[str, str] = {}
    blocks: list[tuple[str, int, list[str]]] = []
    i = 0
    while i < len(lines):
        m = _FILE.fullmatch(lines[i].strip())
        if m:
            files[m.group(1)] = m.group(2)
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(3), i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence.group(2)):
            j += 1
        body = lines[start:j]
        blocks.append((lang, start + 1, body))
        if lang == "python":
            steps.append(Step("python", "\n".join(body) + "\n", start + 1))
        elif lang in SHELL_LANGS:
            steps.extend(_shell_steps(body, start + 1))
        i = j + 1
    return Page(path, steps, files, blocks)


def _shell_steps(body: list[str], first_line: int) -> list[Step]:
    out: list[Step] = []
    k = 0
    while k < len(body):
        line = body[k]
        if not line.startswith("$ "):
            if out:
                out[-1].expected.append(line)
            k += 1
            continue
        cmd_lines, lineno = [line[2:]], first_line + k
        while cmd_lines[-1].rstrip().endswith("\\") and k + 1 < len(body):
            k += 1
            cmd_lines.append(body[k])
        heredoc = _HEREDOC.search("\n".join(cmd_lines))
        if heredoc:
            term = heredoc.group(2)
            while k + 1 < len(body):
                k += 1
                cmd_lines.append(body[k])
                if body[k].strip() == term:
                    break
        text = "\n".join(cmd_lines)
        needs = _NEEDS.search(cmd_lines[0] if heredoc else cmd_lines[-1])
        out.append(Step("sh", text, lineno, tuple(n.strip() for n in needs.group(1).replace(",", " ").split()) if needs else ()))
        k += 1
    return out


# ----------------------------------------------------------------------------- environment


def _available(need: str) -> bool:
    def ok(cmd: list[str]) -> str | None:
        if not shutil.which(cmd[0]):
            return None
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout if r.returncode == 0 else None

    if need == "slurm":
        states = ok(["sinfo", "-h", "-o", "%T"]) or ""
        return bool(shutil.which("sbatch")) and any(s.strip().startswith(("idle", "mix", "alloc")) for s in states.splitlines())
    if need == "pbs":
        return ok(["pbsnodes", "-a"]) is not None and bool(shutil.which("qsub"))
    if need == "sge":
        return ok(["qhost"]) is not None and bool(shutil.which("qsub"))
    if need == "lsf":
        return ok(["bhosts"]) is not None and bool(shutil.which("bsub"))
    return False  # network and anything unknown: never in tests


def _copy_tree(dest: Path) -> Path:
    """The working tree as a new user's checkout would have it (tracked and new files, not ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if not src.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


@pytest.fixture(scope="session")
def fresh_install(tmp_path_factory):
    """A copy of the working tree and a virtual environment with dask-annot pip-installed from it."""
    base = tmp_path_factory.mktemp("fresh")
    checkout = _copy_tree(base / "checkout")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = _env(venv)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "--quiet", "."], cwd=checkout, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"pip install of the checkout failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import dask_annot; print(dask_annot.__file__)"],
                           env=env, cwd=base, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), f"the venv imports dask_annot from {where}, not from its own install"
    return checkout, venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.pop("PYTHONPATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# ----------------------------------------------------------------------------- running a page


@dataclass
class PageRun:
    page: Page
    workdir: Path
    ran: list[Step]
    skipped: list[tuple[Step, str]]
    outputs: dict[int, tuple[str, str]]
    failed: Step | None
    log: str


def run_page(page: Page, fresh_install, tmp: Path, *, only_needing: str | None = None) -> PageRun:
    checkout, venv = fresh_install
    workdir = tmp / "work"
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkout, workdir, symlinks=True)
    for name, rel in page.files.items():
        src = (ROOT / rel).resolve()
        if not src.exists():
            pytest.fail(f"{page.path.name} declares {name} from {rel}, which does not exist")
        (workdir / name).symlink_to(src)
    state = tmp / "doctest"
    state.mkdir(parents=True)
    script = ["set -eo pipefail", f'__doc_step() {{ printf "%s" "$1" > "{state}/current"; }}']
    ran, skipped = [], []
    for n, step in enumerate(page.steps):
        if only_needing is not None and only_needing not in step.needs:
            continue
        missing = [need for need in step.needs if not _available(need)]
        if missing:
            skipped.append((step, f"needs {', '.join(missing)}"))
            continue
        if step.kind == "sh" and "python -m pytest" in step.text:
            skipped.append((step, "the test suite itself: run by .ci/run"))
            continue
        if step.kind == "python":
            (state / f"{n}.py").write_text(step.text)
            body = f'python "{state}/{n}.py"'
        else:
            body = step.text
        script += [f"__doc_step {n}", "{ " + body, f'}} > "{state}/{n}.out" 2> "{state}/{n}.err"']
        ran.append((n, step))
    script.append("__doc_step done")
    (state / "page.sh").write_text("\n".join(script) + "\n")
    proc = subprocess.Popen(["bash", str(state / "page.sh")], cwd=workdir, env=_env(venv), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=PAGE_TIMEOUT)
    except subprocess.TimeoutExpired:
        log = f"timed out after {PAGE_TIMEOUT} s"
    finally:
        _stop_group(proc)
    current = (state / "current").read_text() if (state / "current").exists() else ""
    outputs = {}
    for n, _ in ran:
        o, e = state / f"{n}.out", state / f"{n}.err"
        if o.exists():
            outputs[n] = (o.read_text(errors="replace"), e.read_text(errors="replace") if e.exists() else "")
    failed = None if current == "done" else page.steps[int(current)] if current.isdigit() else page.steps[0] if page.steps else None
    return PageRun(page, workdir, [s for _, s in ran], skipped, outputs, failed, log)


def _stop_group(proc: subprocess.Popen) -> None:
    """End what the page started in the background (dask scheduler, workers): its own process group."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    if proc.poll() is None:
        proc.wait()


def _describe_failure(run: PageRun) -> str:
    step = run.failed
    n = run.page.steps.index(step)
    out, err = run.outputs.get(n, ("", ""))
    return (f"{run.page.path.relative_to(ROOT)} {step.label} failed.\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
            f"\n--- session ---\n{run.log[-2000:]}")


_RUNS: dict[str, PageRun] = {}


@pytest.fixture(scope="session")
def page_runs(fresh_install, tmp_path_factory):
    def get(path: Path) -> PageRun:
        key = str(path)
        if key not in _RUNS:
            _RUNS[key] = run_page(parse(path), fresh_install, tmp_path_factory.mktemp(path.stem))
        return _RUNS[key]

    return get


# ----------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_of_the_page_runs(path, page_runs):
    run = page_runs(path)
    for step, why in run.skipped:
        print(f"skipped ({why}): {step.label}")
    if run.failed is not None:
        pytest.fail(_describe_failure(run))
    for n, step in enumerate(run.page.steps):
        if step not in run.ran or not step.expected:
            continue
        out, err = run.outputs[n]
        got = {line.rstrip() for line in (out + "\n" + err).splitlines()}
        missing = [e for e in step.expected if e.strip() and e.rstrip() not in got]
        assert not missing, f"{path.name} {step.label}: the doc shows output that was not printed: {missing}\n--- printed ---\n{out[-2000:]}{err[-2000:]}"


@pytest.mark.slow
def test_quickstart_summary_opens_in_a_browser(page_runs, tmp_path):
    """The quick start ends with a web summary that renders in a real browser without errors."""
    from tests.test_summary import Browser, ensure_chromium, keep_screenshot

    run = page_runs(DOCS / "quickstart.md")
    if run.failed is not None:
        pytest.fail(_describe_failure(run))
    page = run.workdir / "demo_out/demo/outs/segmented_outs/cell_types/human_pbmc_v1/web_summary.html"
    if not page.exists():
        pytest.fail(f"{page} was not written by `dask-annot annotate`")
    ensure_chromium()
    profile = tmp_path / "profile"
    profile.mkdir()
    browser = Browser(profile)
    try:
        browser.open(page)
        assert browser.problems() == []
        assert browser.eval("document.querySelectorAll('main > section').length") == 7
        assert browser.eval("document.querySelectorAll('svg.scatter path').length") > 0
        shot = browser.screenshot(tmp_path / "quickstart_web_summary.png")
    finally:
        browser.close()
    keep_screenshot(shot, "quickstart_web_summary.png")


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_commands_of_the_docs_run_on_a_real_slurm(fresh_install, tmp_path):
    """The `# needs: slurm` commands, on SLURM started by deploy/slurm-local.sh (stopped again if started here)."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM (slurmctld, slurmd, munged from Debian packages) needs root")
    with_slurm = [p for p in pages() if any("slurm" in s.needs for s in parse(p).steps)]
    assert with_slurm, "no page has a `# needs: slurm` command"
    was_up = _available("slurm")
    script = ROOT / "deploy" / "slurm-local.sh"
    if not was_up:
        done = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"deploy/slurm-local.sh start failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    try:
        for path in with_slurm:
            run = run_page(parse(path), fresh_install, tmp_path / path.stem, only_needing="slurm")
            assert run.ran and not run.skipped, [why for _, why in run.skipped]
            if run.failed is not None:
                pytest.fail(_describe_failure(run))
    finally:
        if not was_up:
            subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, timeout=120)


def test_conventions_every_shell_block_has_commands():
    """A shell block without `$ ` lines would be silently untested; other languages are only shown."""
    for path in pages():
        for lang, line, body in parse(path).blocks:
            if lang in SHELL_LANGS:
                assert any(b.startswith("$ ") for b in body), f"{path.name}:{line}: a {lang} block without `$ ` commands"
            else:
                assert lang == "python" or lang in DISPLAY_LANGS, f"{path.name}:{line}: unknown block language '{lang}'"


def test_conventions_no_private_paths_in_commands():
    """Commands use what a user has: shared test data only through a declared doc-test file."""
    for path in pages():
        for step in parse(path).steps:
            assert "../shared" not in step.text and "/work/" not in step.text, f"{path.name} {step.label}"


def test_the_issue_pages_exist():
    for name in REQUIRED_PAGES:
        assert (DOCS / f"{name}.md").is_file(), name


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def test_local_links_resolve():
    link = re.compile(r"\]\(([^)\s]+)\)")
    for path in pages():
        text = path.read_text()
        for target in link.findall(text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            assert dest.exists(), f"{path.name}: link to {target}: {dest} does not exist"
            if anchor and dest.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", dest.read_text(), flags=re.M)}
                assert anchor in headings, f"{path.name}: link to {target}: no heading '#{anchor}' in {dest.name}"


def test_comparison_numbers_are_the_measured_ones():
    """Every accuracy and macro-F1 in docs/comparison.md is the benchmark's, row for row."""
    measured_md = ROOT / "benchmarks" / "results" / "accuracy.md"
    if not measured_md.exists():
        pytest.fail("benchmarks/results/accuracy.md is missing: run `python benchmarks/accuracy.py`")
    measured = {}
    for row in re.findall(r"^\|\s*(\S+->\S+)\s*\|\s*(\S+)\s*\|\s*([\d.]+|-)\s*\|\s*([\d.]+|-)\s*\|", measured_md.read_text(), flags=re.M):
        measured[(row[0], row[1])] = (row[2], row[3])
    quoted = {}
    for row in re.findall(r"^\|\s*(\S+) → (\S+)\s*\|\s*(\S+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", (DOCS / "comparison.md").read_text(), flags=re.M):
        quoted[(f"{row[0]}->{row[1]}", row[2])] = (row[3], row[4])
    assert quoted, "no result table in docs/comparison.md"
    assert quoted == measured, f"docs/comparison.md quotes {quoted}, benchmarks/results/accuracy.md has {measured}"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from dask_annot import config, pipeline
    from dask_annot.cli import example_path

    out = tmp_path_factory.mktemp("outputs-doc")
    return pipeline.annotate("d", example_path(), output_dir=out, settings=config.resolve(), log=lambda m: None)


def test_outputs_page_describes_every_file_column_and_record_key(real_run):
    from dask_annot import outputs

    text = (DOCS / "outputs.md").read_text()
    for col in set(outputs.CLOUD_COLUMNS) | set(outputs.HIERARCHICAL_COLUMNS):
        assert f"| `{col}` |" in text or f"`{col}`" in text, col
    for key in json.loads((real_run.model_dir / "run.json").read_text()):
        assert f"`{key}`" in text, f"run.json key {key} is not described in docs/outputs.md"
    for name in real_run.record["outputs"] + ["run.json", "web_summary.html", "matrix.zarr"]:
        assert f"## {name}" in text or name in text, name
    for col in ("Feature ID", "Feature Name", "Mean Counts", "Log2 fold change", "Adjusted p value"):
        assert col in text
