"""Reports of an eval run (markdown, CSV, Pareto PNG), the VBench bridge (with a stand-in vbench
package) and the LPIPS gate."""

import csv
import io
import json
import sys

import numpy as np
import pytest
from dit_accel.evals import report as rep
from dit_accel.evals import vbench as vb
from dit_accel.evals.runner import _save_video, _write_rows


def _run(tmp_path, configs=("baseline", "fast", "faster"), prompts=3, drop=None, videos=False):
    """A run folder written by hand: known latencies, PSNRs and checker verdicts per row."""
    run = tmp_path / "run"
    spec = {"configs": [{"name": c, "attention": None} for c in configs]}
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"pipeline": "reference", "suite": "shapes-heldout:3", "spec": spec,
                                              "environment": {"device": "cpu"}, "lpips": "not computed: test"}))
    rng = np.random.default_rng(0)
    rows = []
    for ci, c in enumerate(configs):
        for i in range(prompts):
            if drop and (c, i) in drop:
                continue
            row = {"config": c, "index": i, "seed": 100 + i, "prompt": f"p{i}",
                   "video": f"videos/{c}/{i:04d}-seed{100 + i}.npy",
                   "latency_s": float(2.0 / (ci + 1) + 0.01 * i), "step_s": 0.1 / (ci + 1),
                   "density": [None, 0.4, 0.2][ci],
                   "temporal_flickering": float(rng.uniform(0.9, 1)), "motion_smoothness": float(rng.uniform(0.9, 1)),
                   "dynamic_degree": bool(i % 2), "subject_consistency": 0.9, "background_consistency": 0.8,
                   "checker": {"color": 1.0, "shape": float(i % 2), "motion": 0.5}}
            if c != "baseline":
                row.update(psnr=float(40 - 10 * ci + i), ssim=float(0.99 - 0.1 * ci))
            rows.append(row)
            if videos:  # few flat colors: a GIF keeps them exactly
                level = (ci * 3 + i) * 8 / 255
                _save_video(run / row["video"], np.full((4, 8, 8, 3), level, dtype=np.float32))
    _write_rows(run / "results.jsonl", rows)
    return run, rows


def test_summary_markdown_and_csv_against_the_rows(tmp_path):
    run, rows = _run(tmp_path)
    paths = rep.write_report(run)
    summary, _ = rep.summarize(run)
    assert [r["config"] for r in summary] == ["baseline", "fast", "faster"]
    base_lat = np.median([r["latency_s"] for r in rows if r["config"] == "baseline"])
    for s in summary:
        mine = [r for r in rows if r["config"] == s["config"]]
        assert s["latency_s"] == pytest.approx(np.median([r["latency_s"] for r in mine]))
        assert s["speedup"] == pytest.approx(base_lat / np.median([r["latency_s"] for r in mine]))
        assert s["checker_shape"] == pytest.approx(np.mean([r["checker"]["shape"] for r in mine]))
        if s["config"] != "baseline":
            assert s["psnr"] == pytest.approx(np.mean([r["psnr"] for r in mine]))
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [t["config"] for t in table] == ["baseline", "fast", "faster"]
    assert float(table[2]["speedup"]) == pytest.approx(summary[2]["speedup"])
    assert "lpips" not in table[0]  # no row has LPIPS: no empty column
    md = paths["markdown"].read_text()
    assert "| Method | Latency (s) ↓" in md and f"{summary[2]['speedup']:.2f}" in md and "LPIPS: not computed" in md
    png = paths["pareto"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(png)).shape[0] > 100


def test_partial_configs_are_flagged(tmp_path):
    run, _ = _run(tmp_path, drop={("faster", 2)})
    summary, _ = rep.summarize(run)
    assert [r["partial"] for r in summary] == [False, False, True]
    assert "(partial: 2 rows)" in rep.markdown(summary, [])


def test_pareto_front_by_hand():
    pts = [(1.5, 30.0), (2.0, 25.0), (1.2, 28.0), (2.5, 10.0), (2.0, 20.0)]
    # (1.2, 28) is beaten by (1.5, 30); (2.0, 20) by (2.0, 25)
    assert rep.pareto_front(pts) == [0, 1, 3]


def test_report_cli_names_a_missing_run(tmp_path, capsys):
    from dit_accel.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not an eval run folder" in capsys.readouterr().err


FAKE_VBENCH = '''
import json, os
from pathlib import Path
import numpy as np
from PIL import Image, ImageSequence

class VBench:
    calls = []
    def __init__(self, device, full_info_path, output_path):
        self.output_path = output_path
    def evaluate(self, videos_path, name, prompt_list, dimension_list, local, read_frame, mode):
        assert mode == "custom_input" and set(prompt_list) == {str(p) for p in Path(videos_path).iterdir()}
        VBench.calls.append(name)
        out = {}
        for k, dim in enumerate(dimension_list):
            per = []
            for path in sorted(prompt_list):
                frames = [np.asarray(f.convert("RGB"), dtype=np.float64)
                          for f in ImageSequence.Iterator(Image.open(path))]
                per.append({"video_path": path, "video_results": float(np.mean(frames)) / 255 + k})
            out[dim] = [float(np.mean([p["video_results"] for p in per])), per]
        Path(self.output_path, name + "_eval_results.json").write_text(json.dumps(out))
'''


def test_vbench_bridge_scores_every_video_and_the_report_merges_them(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkgs" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VBENCH)
    monkeypatch.syspath_prepend(str(tmp_path / "fakepkgs"))
    monkeypatch.delitem(sys.modules, "vbench", raising=False)
    run, rows = _run(tmp_path, videos=True)
    dims = ["subject_consistency", "temporal_flickering"]
    out = vb.run_vbench(run, dims, device="cpu", video_format="gif")
    scored = {(r["config"], r["index"], r["seed"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(scored) == len(rows)
    for r in rows:  # each score is that video's own mean brightness (+ the dimension's offset)
        level = float(np.load(run / r["video"]).mean()) / 255
        got = scored[(r["config"], r["index"], r["seed"])]
        assert got["subject_consistency"] == pytest.approx(level, abs=1e-6)
        assert got["temporal_flickering"] == pytest.approx(level + 1, abs=1e-6)
    import vbench

    assert vbench.VBench.calls == ["baseline", "fast", "faster"]
    vb.run_vbench(run, dims, device="cpu", video_format="gif")  # rerun: result files exist, nothing rescored
    assert vbench.VBench.calls == ["baseline", "fast", "faster"]
    summary, vb_dims = rep.summarize(run)
    assert vb_dims == sorted(dims)
    fast = [r for r in rows if r["config"] == "fast"]
    assert summary[1]["vbench_subject_consistency"] == pytest.approx(
        np.mean([np.load(run / r["video"]).mean() / 255 for r in fast]), abs=1e-6)
    assert "VBench subject consistency" in rep.markdown(summary, vb_dims)


def test_vbench_bridge_explains_a_missing_package_and_bad_dimensions(tmp_path, monkeypatch):
    run, _ = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "vbench", None)
    with pytest.raises(RuntimeError, match="separate environment"):
        vb.run_vbench(run)
    with pytest.raises(ValueError, match="--dimensions"):
        vb.run_vbench(run, ["color"])


def test_lpips_is_skipped_with_a_reason_when_unavailable(monkeypatch):
    from dit_accel.evals.lpips import load_lpips

    monkeypatch.setitem(sys.modules, "lpips", None)
    score, note = load_lpips()
    assert score is None and "lpips package is not installed" in note
    with pytest.raises(ValueError, match="lpips net"):
        load_lpips("resnet")
