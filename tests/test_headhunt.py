"""HeadHunter: the greedy search equals a hand-written one, an interrupted search resumes without
recomputing finished head sets, two processes pick what one does, presets load into SoftPAG; the
built-in objectives against independent computations."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

import dit_accel
from dit_accel import SoftPAG
from dit_accel.evals import objectives
from dit_accel.evals.suites import load_suite
from dit_accel.guidance import headhunt
from dit_accel.pipelines import load_reference
from dit_accel.pipelines.shapes import data

SIZE = {"num_frames": 5, "height": 16, "width": 16, "num_inference_steps": 3}
CANDIDATES = [(0, 1), (2, 0), (5, 3), (7, 2)]


@pytest.fixture(scope="module")
def pipe():
    p = load_reference(device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def search():
    items = load_suite("shapes-search:2")
    return [it["prompt"] for it in items], [it["seed"] for it in items]


def _contrast_by_hand(pipe, prompts, seeds, heads, strength=1.0, scale=3.0):
    """The mean RMS luminance contrast of the search prompts, one unbatched pipeline call each."""
    handle = dit_accel.apply(pipe, guidance=SoftPAG(heads=heads, strength=strength, scale=scale)) if heads else None
    try:
        values = []
        for prompt, seed in zip(prompts, seeds):
            out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **SIZE)
            v = np.round(np.asarray(out.frames[0], dtype=np.float64) * 255) / 255
            luma = v @ np.array([0.299, 0.587, 0.114])
            values.append(luma.reshape(len(luma), -1).std(axis=1).mean())
    finally:
        if handle is not None:
            handle.remove()
    return float(np.mean(values))


@pytest.mark.parametrize("top_k", [1, 2])
def test_greedy_search_equals_a_hand_written_one(pipe, search, top_k):
    prompts, seeds = search
    result = headhunt(pipe, prompts, seeds, objective="contrast", rounds=2, top_k=top_k, candidates=CANDIDATES,
                      batch_size=1, progress=False, min_gain=-1.0, **{k: v for k, v in SIZE.items()})
    # the same greedy search written out: every remaining candidate added to the chosen set, best k kept
    chosen: list = []
    base = _contrast_by_hand(pipe, prompts, seeds, {})
    assert result.baseline == pytest.approx(base, abs=1e-6)
    for r in range(2):
        scores = {}
        for c in [c for c in CANDIDATES if c not in chosen]:
            heads = {}
            for layer, h in sorted([*chosen, c]):
                heads.setdefault(layer, []).append(h)
            scores[c] = _contrast_by_hand(pipe, prompts, seeds, heads)
        got = result.rounds[r]["scores"]
        assert got.keys() == {f"{a}.{b}" for a, b in scores}
        for (a, b), v in scores.items():
            assert got[f"{a}.{b}"] == pytest.approx(v, abs=1e-6)
        chosen += sorted(scores, key=lambda c: (-scores[c], c))[:top_k]
        assert sorted(tuple(h) for h in result.rounds[r]["added"]) == sorted(chosen[-top_k:])
    # min_gain=-1: every round adds; the result is the best set on the greedy path
    path = [(result.rounds[r]["score"], r) for r in range(2)]
    best_score, best_round = max(path)
    if best_score > result.baseline:
        expect = [tuple(h) for h in result.rounds[best_round]["base"] + result.rounds[best_round]["added"]]
        assert sorted(result.heads) == sorted(expect)
    else:
        assert result.heads == []
    # the effect map holds round one's single-head scores minus the unguided score
    values = result.effect_map["values"]
    for layer, h in CANDIDATES:
        expected = result.rounds[0]["scores"][f"{layer}.{h}"] - result.baseline
        assert values[layer][h] == pytest.approx(expected, abs=1e-12)
    assert values[1][0] is None and len(values) == 8 and result.effect_map["heads"] == 4


class Interrupting:
    """The contrast objective, counting its calls; raises KeyboardInterrupt on call number `stop_at`."""

    __qualname__ = "contrast"  # the cache keys on the objective's name: this is the same objective

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, videos, prompts):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return objectives.contrast_scores(videos, prompts)


def test_interrupted_search_resumes_without_recomputing(pipe, search, tmp_path):
    prompts, seeds = search
    kwargs = dict(rounds=2, top_k=1, candidates=CANDIDATES, progress=False, min_gain=-1.0, **SIZE)
    full = Interrupting()
    whole = headhunt(pipe, prompts, seeds, objective=full, cache_dir=tmp_path / "whole", **kwargs)
    total = full.calls
    assert total == 1 + 4 + 3  # unguided, round one, round two

    cache = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        headhunt(pipe, prompts, seeds, objective=Interrupting(stop_at=4), cache_dir=cache, **kwargs)
    lines = (cache / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 3  # three finished sets on disk
    before = (cache / "scores.jsonl").stat().st_mtime_ns, lines

    again = Interrupting()
    resumed = headhunt(pipe, prompts, seeds, objective=again, cache_dir=cache, output=tmp_path / "p.json", **kwargs)
    assert again.calls == total - 3  # nothing finished is recomputed
    assert (cache / "scores.jsonl").read_text().splitlines()[:3] == before[1]
    assert resumed.heads == whole.heads and resumed.rounds == whole.rounds and resumed.baseline == whole.baseline

    third = Interrupting()
    headhunt(pipe, prompts, seeds, objective=third, cache_dir=cache, **kwargs)
    assert third.calls == 0

    # a cache of other settings is refused, naming them
    with pytest.raises(ValueError, match="other settings.*strength"):
        headhunt(pipe, prompts, seeds, objective=Interrupting(), cache_dir=cache, strength=0.5, **kwargs)


def test_preset_loads_into_softpag_and_guides(pipe, search, tmp_path):
    prompts, seeds = search
    result = headhunt(pipe, prompts, seeds, objective="contrast", rounds=1, candidates=CANDIDATES, strength=0.7,
                      scale=2.0, min_gain=-1.0, batch_size=1, progress=False, output=tmp_path / "preset.json", **SIZE)
    preset = json.loads((tmp_path / "preset.json").read_text())
    assert preset["heads"] == {str(a): [b] for a, b in result.heads}
    pag = SoftPAG(preset=tmp_path / "preset.json")
    assert (pag.heads, pag.strength, pag.scale, pag.rows) == ({a: (b,) for a, b in result.heads}, 0.7, 2.0, "image")
    assert SoftPAG(preset=tmp_path / "preset.json", scale=5.0).scale == 5.0  # explicit arguments win
    heads = {a: [b] for a, b in result.heads}
    assert _contrast_by_hand(pipe, prompts, seeds, heads, strength=0.7, scale=2.0) == pytest.approx(
        result.score, abs=1e-6)
    bad = tmp_path / "bad.json"
    bad.write_text('{"heads": {}}')
    with pytest.raises(ValueError, match="heads"):
        SoftPAG(preset=bad)


def test_bad_arguments_are_named(pipe, search):
    prompts, seeds = search
    with pytest.raises(ValueError, match=r"candidates: \(9, 0\)"):
        headhunt(pipe, prompts, seeds, candidates=[(9, 0)], **SIZE)
    with pytest.raises(ValueError, match="seeds: got 1 seeds for 2 prompts"):
        headhunt(pipe, prompts, seeds[:1], **SIZE)
    with pytest.raises(ValueError, match="objective 'clip:/nowhere'"):
        headhunt(pipe, prompts, seeds, objective="clip:/nowhere", **SIZE)
    with pytest.raises(ValueError, match="rounds=0"):
        headhunt(pipe, prompts, seeds, rounds=0, **SIZE)


def _cli(tmp_path, out, launcher=None):
    cmd = (launcher or [sys.executable, "-m", "dit_accel.cli"]) + [
        "headhunt", "--suite", "shapes-search:3", "--objective", "sharpness", "--rounds", "2", "--layers", "0,5",
        "--steps", "2", "--num-frames", "5", "--height", "16", "--width", "16", "--min-gain", "-1",
        "--out", str(out), "--device", "cpu", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_two_processes_shard_the_candidates_and_agree_with_one(tmp_path):
    one = _cli(tmp_path, tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    # torchrun: what `accelerate launch` runs on a multi-GPU host (its --cpu mode starts one process)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                "-m", "dit_accel.cli"]
    two = _cli(tmp_path, tmp_path / "two.json", launcher)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    # same choices; scores agree to float32 noise (each process runs with other thread counts)
    assert a["heads"] == b["heads"]
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert (ra["base"], ra["added"]) == (rb["base"], rb["added"]) and ra["scores"].keys() == rb["scores"].keys()
        assert all(ra["scores"][k] == pytest.approx(rb["scores"][k], rel=1e-3) for k in ra["scores"])
    ranks = [{json.loads(x)["key"] for x in (tmp_path / f"two.search/scores.rank{r}.jsonl").read_text().splitlines()}
             for r in (0, 1)]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]  # each set scored once, by one process
    assert len(ranks[0] | ranks[1]) == 1 + 8 + 7
    assert two.stdout.count("chosen heads") == 1  # one summary, from the main process


def test_cli_rejects_bad_input_before_loading(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dit_accel.cli", "headhunt", "--objective", "pickscore",
                           "--out", str(tmp_path / "p.json")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "objective 'pickscore'" in proc.stderr
    assert not (tmp_path / "p.search").exists()


# ----------------------------------------------------------------------------------------------
# objectives


def _rendered(spec, frames=17, size=64):
    return ((data.render([spec], frames, size, size)[0] + 1) / 2).permute(1, 2, 3, 0).numpy()  # [F, H, W, 3]


def test_checker_objective_counts_checks():
    spec = next(s for s in (data.sample_spec(i, n_objects=2) for i in range(100))
                if len(s.objects) == 2 and all(o.motion != "static" for o in s.objects))
    video = _rendered(spec)
    (c0, s0, m0), (c1, s1, m1) = [(o.color, o.shape, o.motion) for o in spec.objects]
    other = next(s for s in data.SHAPES if s != s0)
    bg = spec.prompt.split(" on ", 1)[1]
    prompts = [
        spec.prompt,  # everything right: 6 of 6
        f"{data.object_phrase(c0, other, m0)} and {data.object_phrase(c1, s1, m1)} on {bg}",  # a wrong shape: 5/6
        f"{data.object_phrase(c0, s0, m0)} on {bg}",  # the second object is extra: 3 / (3 + 1)
    ]
    got = objectives.checker_scores([video] * 3, prompts)
    assert got == pytest.approx([1.0, 5 / 6, 3 / 4])


def test_image_objectives_against_independent_computations():
    rng = np.random.default_rng(0)
    videos = [rng.random((3, 20, 24, 3)), rng.random((1, 16, 16, 3)) * 0.5]
    for v, sharp, contrast, colorful in zip(videos, objectives.sharpness_scores(videos, ["", ""]),
                                            objectives.contrast_scores(videos, ["", ""]),
                                            objectives.colorfulness_scores(videos, ["", ""])):
        v = v.astype(np.float32).astype(np.float64)  # the objectives see float32 frames
        luma = v @ np.array([0.299, 0.587, 0.114])
        lap = [ndimage.laplace(f)[1:-1, 1:-1] for f in luma]  # valid region of the 4-neighbour Laplacian
        assert sharp == pytest.approx(100 * np.mean([x.var() for x in lap]), rel=1e-6)
        assert contrast == pytest.approx(np.mean([f.std() for f in luma]), rel=1e-6)
        rg, yb = v[..., 0] - v[..., 1], 0.5 * (v[..., 0] + v[..., 1]) - v[..., 2]
        expect = np.mean([np.hypot(rg[i].std(), yb[i].std()) + 0.3 * np.hypot(rg[i].mean(), yb[i].mean())
                          for i in range(len(v))])
        assert colorful == pytest.approx(expect, rel=1e-6)
    flat = np.full((2, 16, 16, 3), 0.5)
    assert objectives.sharpness_scores([flat], [""]) == [0.0] and objectives.contrast_scores([flat], [""]) == [0.0]
