"""The installed package: namespace layout and the `dit-accel` command."""

import shutil
import subprocess
import sys

import pytest


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
