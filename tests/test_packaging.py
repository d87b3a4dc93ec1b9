"""Packaging: a build from the repository installs kernels/ and bench/ as ``reasonrl.kernels`` /
``reasonrl.bench``, and the checkout root on sys.path shadows no installed package (Hugging Face's
``kernels``).

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
    for name in ("reasonrl", "kernels", "bench", "csrc"):
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
        "reasonrl/bench/__init__.py",
        "reasonrl/bench/run_all.py",
        "reasonrl/bench/common.py",
    ):
        assert required in built, f"{required} missing from the build; built: {sorted(built)}"
    # kernels/ and bench/ are installed under reasonrl only, never as top-level packages.
    assert not (lib / "kernels").exists(), "kernels/ was installed as a top-level package"
    assert not (lib / "bench").exists(), "bench/ was installed as a top-level package"
    # Every Triton module and every benchmark in the repository is shipped.
    for folder in ("kernels", "bench"):
        for path in (ROOT / folder).glob("*.py"):
            assert f"reasonrl/{folder}/{path.name}" in built, (
                f"{folder}/{path.name} not installed as reasonrl.{folder}"
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
    # Package data: the embedded tiny model (loaded with from_pretrained by the trainer) and the presets.
    files = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    for required in (
        "reasonrl/assets/tiny-arith/model.safetensors",
        "reasonrl/assets/tiny-arith/config.json",
        "reasonrl/assets/tiny-arith/tokenizer.json",
        "reasonrl/assets/tiny-arith/tokenizer_config.json",
        "reasonrl/trainer/presets/dro.yaml",
    ):
        assert required in files, f"{required} missing from the build (pyproject.toml package-data)"
    for preset in (ROOT / "reasonrl/trainer/presets").glob("*.yaml"):
        assert f"reasonrl/trainer/presets/{preset.name}" in files
    # Tests are not part of the package.
    assert not any(p.startswith("tests/") for p in built)

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


# Run with the checkout root as working directory and first on sys.path, as `python -m ...` / pytest /
# a user's script in the checkout have it. Builds tiny Llama and Qwen2 models from configs (transformers
# >= 5.25 imports Hugging Face's `kernels` while doing so) and checks what `import kernels` / `import bench`
# resolve to. At ddbd9d0 the model construction raised ImportError (cannot import name 'CUDAProperties').
_SHADOW_CHILD = r"""
import importlib.metadata, json, os, sys
root = sys.argv[1]
assert os.path.realpath(sys.path[0] or os.getcwd()) == os.path.realpath(root), sys.path[:2]
import torch, transformers
out = {}
common = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32)
for kind, cls, cfg in (("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig),
                       ("qwen2", transformers.Qwen2ForCausalLM, transformers.Qwen2Config)):
    model = cls(cfg(**common)).eval()
    with torch.no_grad():
        out[kind] = list(model(torch.tensor([[1, 2, 3, 4]])).logits.shape)
try:
    hf_kernels = os.path.realpath(
        importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
except importlib.metadata.PackageNotFoundError:
    hf_kernels = None
import kernels
out["hf_kernels_installed"] = hf_kernels
out["kernels_file"] = os.path.realpath(kernels.__file__)
import reasonrl.kernels, reasonrl.bench.run_all
out["reasonrl_kernels"] = [os.path.realpath(p) for p in reasonrl.kernels.__path__]
print("RESULT " + json.dumps(out))
"""


def test_checkout_root_does_not_shadow_installed_packages():
    proc = subprocess.run(
        [sys.executable, "-c", _SHADOW_CHILD, str(ROOT)],
        cwd=ROOT,  # `python -c` puts the working directory ('') first on sys.path
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    import json

    out = json.loads(line[len("RESULT "):])
    assert out["llama"] == [1, 4, 61] and out["qwen2"] == [1, 4, 61]
    kernels_file = Path(out["kernels_file"])
    if out["hf_kernels_installed"]:  # Hugging Face's package, not the checkout's folder
        assert kernels_file == Path(out["hf_kernels_installed"]), f"`import kernels` found {kernels_file}"
    else:
        assert kernels_file == (ROOT / "kernels" / "__init__.py").resolve()
    assert out["reasonrl_kernels"] == [str((ROOT / "kernels").resolve())]
