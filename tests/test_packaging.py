"""Packaging: a build from the repository installs the Triton kernels of kernels/ as ``reasonrl.kernels``.

A wheel build compiles the extension (minutes), so this test runs only setuptools' ``build_py`` step, which
lays out the pure-Python part of the wheel exactly as ``bdist_wheel`` would (same package list and
package-dir mapping from pyproject.toml) without compiling anything. It works on a copy of the sources so
that neither ``build/`` nor ``*.egg-info`` appears in the working tree. About 10 s (setup.py imports torch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_sources(dst: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info", "*.pyc")
    for name in ("reasonrl", "kernels", "csrc"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)


def test_build_py_maps_kernels_to_reasonrl_kernels(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    src.mkdir()
    _copy_sources(src)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=src,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, f"build_py failed:\n{proc.stdout}\n{proc.stderr}"

    built = {p.relative_to(lib).as_posix() for p in lib.rglob("*.py")}
    for required in (
        "reasonrl/__init__.py",
        "reasonrl/_backend.py",
        "reasonrl/ops/__init__.py",
        "reasonrl/ops/token_logprobs.py",
        "reasonrl/reference/__init__.py",
        "reasonrl/reference/token_logprobs.py",
        "reasonrl/kernels/__init__.py",
        "reasonrl/kernels/token_logprobs.py",
    ):
        assert required in built, f"{required} missing from the build; built: {sorted(built)}"
    # kernels/ is installed under reasonrl only, never as a top-level package named 'kernels'.
    assert not (lib / "kernels").exists(), "kernels/ was installed as a top-level package"
    # Every Triton module in the repository is shipped.
    for path in (ROOT / "kernels").glob("*.py"):
        assert f"reasonrl/kernels/{path.name}" in built, (
            f"kernels/{path.name} not installed as reasonrl.kernels"
        )
    assert (lib / "reasonrl/kernels/token_logprobs.py").read_text() == (
        ROOT / "kernels/token_logprobs.py"
    ).read_text()
    # Every module of every subpackage of reasonrl/ is shipped (pyproject.toml lists packages explicitly, so a
    # new subpackage that is not added there would silently be missing from the wheel).
    for path in (ROOT / "reasonrl").rglob("*.py"):
        if "__pycache__" in path.parts or not (path.parent / "__init__.py").exists():
            continue
        rel = path.relative_to(ROOT).as_posix()
        assert rel in built, f"{rel} is not in the build: add its package to [tool.setuptools] packages"
    # Tests and benchmarks are not part of the package.
    assert not any(p.startswith(("tests/", "bench/")) for p in built)

    # The built tree resolves reasonrl.kernels.token_logprobs to the installed file (no triton import needed:
    # find_spec imports the parent packages only).
    code = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
        "spec = importlib.util.find_spec('reasonrl.kernels.token_logprobs'); print(spec.origin)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(lib)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == lib / "reasonrl/kernels/token_logprobs.py", proc.stdout
