"""The eval runner: config validation before generation, resume after a kill, sharding."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from dit_accel.evals.config import ConfigError, parse_spec
from dit_accel.evals.metrics import psnr
from dit_accel.evals.runner import load_video, read_rows

SIZE = {"num_frames": 9, "height": 32, "width": 32}
CONFIGS = {"size": SIZE, "steps": 2, "configs": [
    {"name": "neighborhood", "attention": {"method": "Neighborhood", "window": [0.5, 0.5, 0.5]}},
    {"name": "temporal", "attention": {"method": "TemporalSparse", "threshold": -8}},
]}
TIMING = ("latency_s", "step_s", "peak_memory_mb")


def _cli(tmp_path, configs, out, suite="shapes-heldout:8", launcher=None, **popen):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(configs))
    cmd = (launcher or [sys.executable, "-m", "dit_accel.evals"]) + [
        "--suite", suite, "--configs", str(path), "--out", str(out), "--device", "cpu", "--no-progress"]
    # without the Triton interpreter the tests switch on: the CLI runs the kernels' PyTorch twins on CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # output to a file: a pipe nobody reads could fill and block the run
    log = tmp_path / f"{out.name}-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env, **popen)
    proc.log = log
    return proc


@pytest.mark.parametrize("change,field", [
    ({"configs": [{"name": "a", "attention": {"method": "Sparse9000"}}]}, "configs[0].attention.method"),
    ({"configs": [{"name": "a", "attention": {"method": "Neighborhood", "windw": [1, 1, 1]}}]},
     "configs[0].attention.windw"),
    ({"configs": [{"name": "a", "attention": {"method": "TemporalSparse", "min_density": 2.0}}]},
     "configs[0].attention.min_density"),
    ({"configs": [{"name": "a", "size": {"num_frames": 17, "height": 64, "width": 64}}]}, "configs[0].size"),
    ({"baseline": "dense"}, "baseline"),
    ({"configs": [{"name": "a", "cache": {"kind": "teacache"}}]}, "configs[0].cache"),
    ({"steps": 0}, "steps"),
    ({"configs": [{"name": "a"}, {"name": "a"}]}, "configs[1].name"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        parse_spec({**CONFIGS, **change})
    assert str(err.value).startswith(field + ":") or str(err.value).startswith(field + "."), str(err.value)


def test_baseline_comes_first_and_named_baselines_work():
    spec = parse_spec(CONFIGS)
    assert [c.name for c in spec.configs] == ["baseline", "neighborhood", "temporal"]
    assert spec.baseline.method() is None
    spec = parse_spec({**CONFIGS, "baseline": "temporal"})
    assert [c.name for c in spec.configs] == ["temporal", "neighborhood"]


def test_bad_config_fails_before_any_generation(tmp_path):
    out = tmp_path / "run"
    proc = _cli(tmp_path, {**CONFIGS, "baseline": "dense"}, out)
    proc.wait(timeout=120)
    text = proc.log.read_text()
    assert proc.returncode == 2 and "baseline: 'dense' is not one of the configs" in text
    assert not out.exists()


def test_killed_run_resumes_without_recomputing(tmp_path):
    """3 configs (the baseline and two sparse ones) x 8 held-out prompts on CPU, killed midway."""
    out = tmp_path / "run"
    proc = _cli(tmp_path, CONFIGS, out, start_new_session=True)
    deadline = time.time() + 300
    while len(read_rows(out / "results.jsonl")) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_rows(out / "results.jsonl")
    assert 5 <= len(before) < 24
    stamps = {r["video"]: os.stat(out / r["video"]).st_mtime_ns for r in before}

    proc = _cli(tmp_path, CONFIGS, out)
    proc.wait(timeout=900)
    text = proc.log.read_text()
    assert proc.returncode == 0, text
    after = read_rows(out / "results.jsonl")
    assert len(after) == 24 and len({(r["config"], r["index"]) for r in after}) == 24
    assert after[: len(before)] == before  # finished rows kept as they were (their timings too)
    assert all(os.stat(out / v).st_mtime_ns == t for v, t in stamps.items())  # videos not regenerated
    # fidelity is against the baseline video of the same prompt and seed
    for r in after:
        if r["config"] != "baseline":
            base = load_video(out / "videos" / "baseline" / os.path.basename(r["video"]))
            assert r["psnr"] == pytest.approx(min(psnr(load_video(out / r["video"]), base), 99.0), abs=1e-3)
        assert r["checker"]["color"] is not None and 0 < r["temporal_flickering"] <= 1


def test_rerun_with_other_configs_is_refused(tmp_path):
    out = tmp_path / "run"
    one = {**CONFIGS, "configs": CONFIGS["configs"][:1]}
    assert _cli(tmp_path, one, out, suite="shapes-heldout:1").wait(timeout=600) == 0
    proc = _cli(tmp_path, CONFIGS, out, suite="shapes-heldout:1")
    proc.wait(timeout=600)
    text = proc.log.read_text()
    assert proc.returncode != 0 and "other settings" in text


def test_two_processes_give_the_single_process_rows(tmp_path):
    one = {**CONFIGS, "configs": CONFIGS["configs"][:1]}
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = _cli(tmp_path, one, single, suite="shapes-heldout:3")
    assert proc.wait(timeout=600) == 0, proc.log.read_text()
    # torchrun: what `accelerate launch` runs on a multi-GPU host (its --cpu mode starts one process)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29532",
                "-m", "dit_accel.evals"]
    proc = _cli(tmp_path, one, multi, suite="shapes-heldout:3", launcher=launcher)
    proc.wait(timeout=900)
    text = proc.log.read_text()
    assert proc.returncode == 0, text
    shards = [read_rows(multi / f"results.rank{r}.jsonl") for r in (0, 1)]
    assert all(shards) and sum(map(len, shards)) == 6  # two processes ran, each its own prompts
    assert not {r["index"] for r in shards[0]} & {r["index"] for r in shards[1]}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_rows(multi / "results.jsonl")) == strip(read_rows(single / "results.jsonl"))
    for r in read_rows(single / "results.jsonl"):
        assert np.array_equal(np.load(single / r["video"]), np.load(multi / r["video"]))
