"""The declared minimum versions are real: a fresh venv holding exactly them runs the package.

Every runtime dependency in pyproject.toml is installed at its lower bound (``>=X`` becomes
``==X``; distributed follows dask), then the bundled example is annotated and the kernel,
DE and reader tests run there. A minimum that does not work fails here, not on a user's
machine.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lower_bounds() -> list[str]:
    """``name==min`` for each runtime dependency of pyproject.toml (extras' names kept bare)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", dep)
        if not m:
            raise AssertionError(f"pyproject.toml: '{dep}' has no lower bound (>=X); every runtime dependency needs one")
        pins.append(f"{m.group(1)}=={m.group(2)}")
        if m.group(1) == "dask" and "[distributed]" in dep:
            pins.append(f"distributed=={m.group(2)}")
    return pins


def test_every_runtime_dependency_has_a_lower_bound():
    assert len(lower_bounds()) >= 10


@pytest.mark.slow
def test_the_declared_minimum_versions_run_the_package(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    constraints = tmp_path / "minimums.txt"
    constraints.write_text("\n".join(lower_bounds()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHONPATH"))}
    # The package at its minimums plus the test runner only: the test extra's heavy optional
    # packages (tiledbsoma, scanpy) are not part of what the minimums promise.
    r = subprocess.run([py, "-m", "pip", "install", "-c", str(constraints), str(ROOT), "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"],
                       capture_output=True, text=True, env=env, timeout=1800)
    said = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "is ignored" not in line)
    assert r.returncode == 0, f"the minimum versions do not install together:\n{said[-4000:]}"
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True, env=env, check=True).stdout.lower()
    for pin in lower_bounds():
        name, version = pin.split("==")
        norm = name.lower().replace("_", "-")
        got = re.search(rf"^{re.escape(norm)}==([^\s]+)$", freeze.replace("_", "-"), re.M)
        assert got and got.group(1).startswith(version), f"{name}: installed {got.group(1) if got else 'nothing'}, expected {version}"
    out = tmp_path / "out"
    r = subprocess.run([py, "-m", "dask_annot", "annotate", "--id", "m", "--matrix", "example", "--output-dir", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                        "tests/test_kernels.py", "tests/test_de.py", "tests/test_h5.py"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:]
