"""The installed package: namespace layout and the `dit-accel` command."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package folder (pyproject's package-dir)
NAMESPACE = {"dit_accel": "dit_accel", "kernels": "dit_accel/kernels", "pipelines": "dit_accel/pipelines",
             "ui": "dit_accel/ui", "evals": "dit_accel/evals", "benchmarks": "dit_accel/benchmarks"}


def _python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["kernels", "pipelines", "ui", "evals", "benchmarks"])
def test_no_top_level_module_shadows_other_packages(name, tmp_path):
    result = _python(f"import {name}", tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_folders_install_under_the_namespace(tmp_path):
    code = ("import dit_accel.kernels, dit_accel.pipelines.tiny, dit_accel.ui, dit_accel.evals, "
            "dit_accel.benchmarks.report; print('ok')")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_info_command(tmp_path):
    exe = shutil.which("dit-accel")
    assert exe, "the dit-accel entry point is not installed"
    result = subprocess.run([exe, "info"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("torch", "diffusers", "triton", "device:", "sdpa", "flex", "xformers", "sage",
                   "FluxTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel",
                   "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel",
                   "Dense"):
        assert needle in out
    # every unavailable backend says why
    for line in out.splitlines():
        if line.strip().startswith(("xformers", "sage")) and " no " in line:
            assert len(line.split(" no ", 1)[1].strip()) > 10


def test_wheel_ships_every_module_and_the_reference_model_without_build_warnings(tmp_path):
    """A wheel built from the source tree holds every Python module under the dit_accel namespace and
    every file of the shipped reference model, and setuptools builds it without its deprecation or
    'package would be ignored' warnings."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".whl", "build", "dist", "artifacts",
                                                              "*.egg-info", "__pycache__", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                             str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    for warning in ("SetuptoolsDeprecationWarning", "is absent from the `packages` configuration"):
        assert warning not in log, f"setuptools warns while building the wheel: {warning}"
    (wheel,) = (tmp_path / "dist").glob("dit_accel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, target in NAMESPACE.items():
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = Path(dirpath).relative_to(ROOT / folder)
            expected |= {(Path(target) / rel / f).as_posix() for f in filenames if f.endswith(".py")}
    reference = ROOT / "pipelines" / "shapes" / "reference"
    model_files = {("dit_accel/pipelines/shapes/reference" / p.relative_to(reference)).as_posix()
                   for p in reference.rglob("*") if p.is_file()}
    assert len(model_files) >= 8  # model_index, scheduler, text encoder, tokenizer, transformer shards
    assert not (expected | model_files) - names, sorted((expected | model_files) - names)
    assert not {n for n in names if n.split("/")[0] in NAMESPACE and n.split("/")[0] != "dit_accel"}
