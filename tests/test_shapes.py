"""ShapesBench: procedural data, checker against ground truth, pipeline loading, shipped weights."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from dit_accel.evals import shapes as checker
from dit_accel.evals.metrics import temporal_flickering
from dit_accel.pipelines import REFERENCE_DIR, load_reference
from dit_accel.pipelines.shapes import data
from dit_accel.pipelines.shapes.pipeline import DEFAULT_SIZE, PATCH, ShapesPipeline
from dit_accel.pipelines.shapes.suite import held_out_suite


def test_samples_are_deterministic_and_prompts_parse_back():
    a, b = data.sample_spec(123), data.sample_spec(123)
    assert a == b
    assert torch.equal(data.render([a], 5, 32, 32), data.render([b], 5, 32, 32))
    for seed in range(200):
        spec = data.sample_spec(seed)
        parsed = data.parse_prompt(spec.prompt)
        assert parsed == [(o.color, o.shape, o.motion) for o in spec.objects]
        assert not data.is_held_out(spec)
    img = data.sample_spec(7, image=True)
    assert all(m is None for _, _, m in data.parse_prompt(img.prompt))


def test_object_counts_follow_the_stated_shares():
    """Samples draw one or two objects evenly; the trainer forces two on a further share of seeds.

    Placement rejects two-object draws far more often than one-object ones, so a count redrawn
    on every rejection would silently skew the data toward single objects.
    """
    from dit_accel.pipelines.shapes.train import FORCE_TWO_OBJECTS, _n_objects

    seeds = range(1500)
    two = np.mean([len(data.sample_spec(s).objects) == 2 for s in seeds])
    assert abs(two - 0.5) < 0.05, two
    forced = np.mean([len(data.sample_spec(s, n_objects=_n_objects(s)).objects) == 2 for s in seeds])
    expected = FORCE_TWO_OBJECTS + (1 - FORCE_TWO_OBJECTS) * 0.5
    assert abs(forced - expected) < 0.05, (forced, expected)


def test_render_geometry_matches_the_spec():
    """An object's rendered pixels sit where the spec says, in its color (independent of the checker)."""
    spec = data.sample_spec(5, objects=[("red", "square", "right")])
    v = (data.render([spec], 9, 64, 64)[0] + 1) / 2  # [3, F, H, W]
    red = torch.tensor(data.COLORS["red"])[:, None, None]
    obj = spec.objects[0]
    for f in (0, 8):
        mask = ((v[:, f] - red).abs().amax(0) < 0.05).float()
        ys, xs = torch.nonzero(mask, as_tuple=True)
        cx, cy = (xs.float().mean() + 0.5) / 64, (ys.float().mean() + 0.5) / 64
        ex, ey = obj.center(f / 8)
        assert abs(cx - ex) < 0.02 and abs(cy - ey) < 0.02
        side = 2 * 0.86 * obj.radius * 64  # square half-side is 0.86 r
        assert abs(mask.sum().item() - side**2) / side**2 < 0.15


@pytest.mark.parametrize(("frames", "size", "image"), [(17, 64, False), (9, 48, False), (1, 64, True)])
def test_checker_on_ground_truth(frames, size, image):
    specs = [data.sample_spec(50_000 + i, image=image, exclude=frozenset()) for i in range(120)]
    videos = data.render(specs, frames, size, size)
    res = checker.score(list(videos), [s.prompt for s in specs])
    assert res["color"] >= 0.98 and res["shape"] >= 0.98
    if image:
        assert res["motion"] is None
    else:
        assert res["motion"] >= 0.98


def test_checker_rejects_wrong_answers():
    """Swapping the prompt for one with another shape / motion / color must lower the scores."""
    spec = data.sample_spec(9, objects=[("green", "circle", "up")])
    video = data.render([spec], 17, 64, 64)[0]
    good = checker.score_video(video, spec.prompt)["objects"][0]
    assert good["color_ok"] and good["shape_ok"] and good["motion_ok"]
    wrong = checker.score_video(video, "a green triangle moving down on a black background")["objects"][0]
    assert wrong["color_ok"] and not wrong["shape_ok"] and not wrong["motion_ok"]
    res = checker.score_video(video, "a blue circle moving up on a black background")
    assert not res["objects"][0]["color_ok"] and res["spurious"] == ["green"]
    with pytest.raises(ValueError, match="prompt"):
        checker.score_video(video, "a cat on a mat")


def test_motion_rules_by_hand():
    assert checker.classify_motion((0.3, 0.0), 0.0) == "right"
    assert checker.classify_motion((-0.2, -0.2), 0.0) == "up-left"
    assert checker.classify_motion((0.01, 0.02), 0.0) == "static"
    assert checker.classify_motion((0.0, 0.0), math.log(3)) == "growing"
    assert checker.classify_motion((0.0, 0.0), -math.log(3)) == "shrinking"


def test_held_out_suite_is_unseen_and_fixed():
    suite = held_out_suite(64)
    assert len(suite) == 64 and suite[0]["prompt"] == held_out_suite(64)[0]["prompt"]
    for r in suite:
        assert data.is_held_out(r["spec"])
        assert f"{r['spec'].background} " in r["prompt"].split(" on a ")[1]
    assert {len(r["spec"].objects) for r in suite} == {1, 2}


def test_temporal_flickering_by_hand():
    rng = np.random.default_rng(0)
    still = np.repeat(rng.random((1, 8, 8, 3)), 4, axis=0)
    assert temporal_flickering(still) == 1.0
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    a[1] = 51  # every pixel changes by 51 of 255
    assert temporal_flickering(a) == pytest.approx((255 - 51) / 255)


def test_default_size_has_enough_tokens():
    f, h, w = DEFAULT_SIZE["num_frames"], DEFAULT_SIZE["height"], DEFAULT_SIZE["width"]
    assert (f // PATCH[0]) * (h // PATCH[1]) * (w // PATCH[2]) >= 4096


def test_shipped_weights_are_small_and_sharded():
    files = [p for p in REFERENCE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert max(p.stat().st_size for p in files) <= 16 * 2**20


@pytest.fixture(scope="module")
def reference():
    return load_reference(device="cpu")


def test_reference_generates_video_and_image(reference):
    out = reference("a red circle moving right on a black background", num_frames=5, height=32, width=32,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 5, 32, 32, 3) and 0 <= out.frames.min() and out.frames.max() <= 1
    img = reference("a red circle on a black background", num_frames=1, num_inference_steps=2, output_type="pil")
    assert len(img.frames[0]) == 1 and img.frames[0][0].size == (64, 64)


def test_pipeline_rejects_bad_sizes(reference):
    with pytest.raises(ValueError, match="height"):
        reference("a red circle on a black background", height=30)
    with pytest.raises(ValueError, match="num_frames"):
        reference("a red circle on a black background", num_frames=0)


def test_save_and_load_roundtrip_and_corruption(reference, tmp_path):
    d = tmp_path / "model"
    reference.save_pretrained(d)
    again = ShapesPipeline.from_pretrained(d)
    for (n, p), (_, q) in zip(reference.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(p, q), n
    sums = json.loads((d / "checksums.json").read_text())
    shard = d / sorted(k for k in sums if k.startswith("transformer/"))[0]
    data_ = bytearray(shard.read_bytes())
    data_[-10] ^= 0xFF
    shard.write_bytes(bytes(data_))
    with pytest.raises(ValueError, match="corrupted"):
        ShapesPipeline.from_pretrained(d)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ShapesPipeline.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_reference(device="cpu", path=tmp_path / "nowhere")
    shutil.rmtree(d)


def test_dense_adapter_matches_stock_on_the_trained_model(reference):
    """The Wan adapter runs the trained reference model exactly like diffusers' own processor."""
    from dit_accel import Dense, apply

    kw = {"prompt": "a red circle moving right and a blue square growing on a black background", "num_frames": 3,
          "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}
    stock = reference(**kw, generator=torch.Generator().manual_seed(1)).frames
    handle = apply(reference, attention=Dense(backend="sdpa"))
    try:
        ours = reference(**kw, generator=torch.Generator().manual_seed(1)).frames
    finally:
        handle.remove()
    assert (ours - stock).abs().max().item() <= 1e-5


def test_trainer_resumes_and_exports_the_ema_weights(tmp_path, capsys):
    """A run cut by --budget-s resumes from its checkpoint; the exported pipeline holds the EMA weights."""
    from dit_accel.pipelines.shapes.train import main

    args = ["--out", str(tmp_path), "--device", "cpu", "--no-compile", "--minutes", "0.15", "--batch-scale", "0.02",
            "--log-every", "1", "--sample-every", "0", "--sample-steps", "1", "--sample-prompts", "1", "--warmup", "2"]
    # the budget (0.01 s) must cut the first run before its 9 training seconds are done, even on a
    # machine where one step takes seconds
    main([*args, "--budget-s", "0.01"])
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert 1 <= first["step"] and not (tmp_path / "pipeline").exists()
    main(args)
    assert f"resumed at step {first['step']}" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    summary = json.loads((tmp_path / "training.json").read_text())
    assert summary["steps"] == state["step"] > first["step"]
    assert {"device", "torch", "commit"} <= set(summary["environment"])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, state["step"] + 1))  # one row per step, none repeated

    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(tmp_path / "pipeline" / "transformer")
    live = dict(zip([n for n, _ in exported.named_parameters()], state["ema"]))
    for name, p in exported.named_parameters():
        assert torch.equal(p, live[name].half()), name   # the EMA, not the live weights
    assert any(not torch.equal(p, state["transformer"][n].half()) for n, p in exported.named_parameters())
