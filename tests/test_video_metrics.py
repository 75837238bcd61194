"""VBench-style video dimensions: classical flow on synthetic videos with known motion, the
consistency formula by hand."""

import numpy as np
import pytest
from dit_accel.evals.features import classical_features, feature_extractor
from dit_accel.evals.flow import optical_flow
from dit_accel.evals.metrics import dynamic_degree, feature_consistency, motion_smoothness
from scipy.ndimage import gaussian_filter, shift


def _texture(seed, shape=(128, 160, 3)):
    t = gaussian_filter(np.random.default_rng(seed).random(shape), (2, 2, 0))
    return (t - t.min()) / (t.max() - t.min())


def _panning(seed, dx, dy=0, frames=9, size=64):
    """A window sliding over a larger texture: the content moves by (-dx, -dy) pixels per frame."""
    big = _texture(seed)
    return np.stack([big[32 + dy * i: 32 + dy * i + size, 40 + dx * i: 40 + dx * i + size] for i in range(frames)])


@pytest.mark.parametrize("dx,dy", [(0.0, 0.0), (1.0, 0.0), (2.5, -1.5), (0.3, 0.6)])
def test_flow_recovers_a_known_subpixel_shift(dx, dy):
    img = _texture(1, (64, 64, 3))
    moved = shift(img, (dy, dx, 0), order=3, mode="wrap")  # content moves right by dx, down by dy
    flow = optical_flow(img, moved)[10:-10, 10:-10]
    assert np.median(flow[..., 0]) == pytest.approx(dx, abs=0.05)
    assert np.median(flow[..., 1]) == pytest.approx(dy, abs=0.05)


def test_static_video_has_no_motion():
    v = np.stack([_texture(2, (64, 64, 3))] * 9)
    dd = dynamic_degree(v)
    assert dd["magnitude"] < 1e-6 and not dd["dynamic"]
    assert motion_smoothness(v) == 1.0
    assert feature_consistency(v) == pytest.approx(1.0)


@pytest.mark.parametrize("dx,dy", [(1, 0), (2, 1), (0, 3), (4, 0)])
def test_dynamic_degree_of_a_known_pan(dx, dy):
    v = _panning(3, dx, dy)
    dd = dynamic_degree(v)
    speed = float(np.hypot(dx, dy))
    assert dd["magnitude"] == pytest.approx(speed, abs=0.25 + 0.1 * speed)
    # VBench's rule at 64 pixels, 8 fps: dynamic when >= 2 of the 8 pairs move > 6 * 64 / 256 = 1.5 px
    assert dd["dynamic"] == (speed > 1.5)


def test_motion_smoothness_prefers_steady_motion_to_jitter():
    steady = _panning(4, 2)
    rng = np.random.default_rng(5)
    big = _texture(4)
    offsets = rng.integers(0, 12, size=9)
    jitter = np.stack([big[32:96, 40 + o: 104 + o] for o in offsets])
    assert motion_smoothness(steady) > 0.99
    assert motion_smoothness(steady) > motion_smoothness(jitter) + 0.02


def test_consistency_formula_by_hand():
    feats = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    c = np.sqrt(0.5)
    # frame 1: prev c, first c; frame 2: prev c, first 0; frame 3: prev 0 (clipped), first 0 (clipped -1)
    want = np.mean([(c + c) / 2, (c + 0) / 2, (0 + 0) / 2])
    video = np.zeros((4, 16, 16, 3))
    assert feature_consistency(video, lambda frames: feats) == pytest.approx(want, abs=1e-12)


def test_classical_features_see_layout_and_palette():
    a = _texture(6, (64, 64, 3))
    f = classical_features(np.stack([a, a, np.roll(a, 20, axis=1), 1 - a]))
    assert np.allclose(np.linalg.norm(f, axis=1), 1.0)
    assert f[0] @ f[1] == pytest.approx(1.0)
    assert f[0] @ f[2] < f[0] @ f[1] and f[0] @ f[3] < f[0] @ f[2]
    # random independent frames are less consistent than a slow pan over the same kind of texture
    noise = np.stack([_texture(10 + i, (64, 64, 3)) for i in range(9)])
    assert feature_consistency(noise) < feature_consistency(_panning(7, 1)) - 0.1


def test_bad_extractor_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="dino:PATH"):
        feature_extractor("resnet")
    with pytest.raises(ValueError, match="not a local transformers checkpoint"):
        feature_extractor(f"dino:{tmp_path / 'missing'}")
