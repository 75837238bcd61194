"""TokenLayout recorded by the geometry hook, checked against grids computed by hand, including
sizes that are not multiples of the patch size; CFG rows, steps and generations."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from helpers import Recorder, pipeline_output

import dit_accel
from dit_accel.pipelines.tiny import make_tiny_pipeline, tiny_inputs

TEXT = 7


def _call_flux(t):
    rows, cols = 3, 5  # an odd 3x5 token grid
    ids = torch.zeros(rows * cols, 3)
    ids[:, 1] = torch.arange(rows).repeat_interleave(cols)
    ids[:, 2] = torch.arange(cols).repeat(rows)
    t(hidden_states=torch.randn(2, rows * cols, 16), encoder_hidden_states=torch.randn(2, TEXT, 32),
      pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.5]), img_ids=ids,
      txt_ids=torch.zeros(TEXT, 3))


def _call_sd3(t):
    # 9x11 latent with patch 2: the patch embedding floors to 4x5 tokens
    t(hidden_states=torch.randn(2, 4, 9, 11), encoder_hidden_states=torch.randn(2, TEXT, 32),
      pooled_projections=torch.randn(2, 64), timestep=torch.tensor([500.0, 500.0]))


def _call_wan(t):
    t(hidden_states=torch.randn(2, 16, 3, 9, 11), timestep=torch.tensor([500, 500]),
      encoder_hidden_states=torch.randn(2, TEXT, 32))


def _call_hunyuan(t):
    t(hidden_states=torch.randn(2, 4, 3, 9, 11), timestep=torch.tensor([500, 500]),
      encoder_hidden_states=torch.randn(2, TEXT, 32), encoder_attention_mask=torch.ones(2, TEXT),
      pooled_projections=torch.randn(2, 8), guidance=torch.tensor([6000.0, 6000.0]))


def _call_cogvideox(t):
    # CogVideoX takes [batch, frames, channels, height, width]
    t(hidden_states=torch.randn(2, 3, 4, 9, 11), encoder_hidden_states=torch.randn(2, TEXT, 32),
      timestep=torch.tensor([500, 500]))


def _call_ltx(t):
    t(hidden_states=torch.randn(2, 2 * 3 * 5, 8), encoder_hidden_states=torch.randn(2, TEXT, 32),
      timestep=torch.tensor([500, 500]), encoder_attention_mask=torch.ones(2, TEXT), num_frames=2, height=3,
      width=5)


CASES = {
    # variant: (call, family, grid, patch, text position)
    "flux": (_call_flux, "flux", (1, 3, 5), (1, 2, 2), "first"),
    "sd3": (_call_sd3, "sd3", (1, 4, 5), (1, 2, 2), "last"),
    "wan": (_call_wan, "wan", (3, 4, 5), (1, 2, 2), "cross"),
    "hunyuan-video": (_call_hunyuan, "hunyuan-video", (3, 4, 5), (1, 2, 2), "last"),
    "cogvideox": (_call_cogvideox, "cogvideox", (3, 4, 5), (1, 2, 2), "first"),
    "ltx": (_call_ltx, "ltx", (2, 3, 5), (1, 1, 1), "cross"),
}


@pytest.mark.parametrize("variant", CASES)
@pytest.mark.parametrize("via", ["apply", "set_attn_processor"])
def test_layout_matches_hand_computed_grid(variant, via):
    call, family, grid, patch, position = CASES[variant]
    transformer = make_tiny_pipeline(variant).transformer
    recorder = Recorder()
    if via == "apply":
        dit_accel.apply(transformer, attention=recorder)
    else:  # the processor finds its transformer on the first call
        transformer.set_attn_processor(dit_accel.AttnProcessor(recorder))
    with torch.no_grad():
        call(transformer)
        call(transformer)
    video = grid[0] * grid[1] * grid[2]
    assert recorder.calls
    for info, layout, span, q_shape, k_shape, _ in recorder.calls:
        assert (layout.family, layout.grid, layout.patch_size) == (family, grid, patch)
        assert (layout.video_tokens, layout.text_tokens, layout.text_position) == (video, TEXT, position)
        assert layout.batch_size == 2 and q_shape[0] == 2
        if info.kind == "joint":
            assert q_shape[2] == video + TEXT
            assert span == ((0, TEXT) if position == "first" else (video, video + TEXT))
        elif info.kind == "self":
            assert q_shape[2] == k_shape[2] == video and span is None
        elif info.kind == "cross":
            assert q_shape[2] == video and k_shape[2] == TEXT
        else:
            assert info.kind == "text" and q_shape[2] == TEXT


def test_flux_grid_unknown_when_ids_do_not_form_a_grid():
    transformer = make_tiny_pipeline("flux").transformer
    recorder = Recorder()
    dit_accel.apply(transformer, attention=recorder)
    ids = torch.zeros(15, 3)
    ids[:, 1] = torch.arange(15)  # 15 rows of one column, then claim a column index of 4
    ids[-1, 2] = 4
    with torch.no_grad():
        transformer(hidden_states=torch.randn(1, 15, 16), encoder_hidden_states=torch.randn(1, TEXT, 32),
                    pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=ids,
                    txt_ids=torch.zeros(TEXT, 3))
    layout = recorder.calls[0][1]
    assert layout.grid is None and layout.video_tokens == 15


@pytest.mark.parametrize("family,branches,rows", [
    # SD3 batches [uncond, cond] with no cache context: rows come from the pipeline's CFG flag
    ("sd3", {None}, {(None, (1,), (0,))}),
    ("cogvideox", {"cond_uncond"}, {("cond_uncond", (1,), (0,))}),
    ("ltx", {"cond_uncond"}, {("cond_uncond", (1,), (0,))}),
    ("wan", {"cond", "uncond"}, {("cond", (0,), ()), ("uncond", (), (0,))}),
    ("hunyuan-video", {"cond", "uncond"}, {("cond", (0,), ()), ("uncond", (), (0,))}),
    ("flux", {"cond", "uncond"}, {("cond", (0,), ()), ("uncond", (), (0,))}),
])
@pytest.mark.parametrize("via", ["apply", "set_attn_processor"])
def test_cfg_rows_steps_and_generations(family, branches, rows, via):
    pipe = make_tiny_pipeline(family)
    recorder = Recorder()
    if via == "apply":
        dit_accel.apply(pipe, attention=recorder)
    else:
        pipe.transformer.set_attn_processor(dit_accel.AttnProcessor(recorder))
    kwargs = tiny_inputs(family, guidance_scale=4.0, num_inference_steps=3)
    pipeline_output(pipe, kwargs)
    pipeline_output(pipe, kwargs)
    layouts = [layout for info, layout, *_ in recorder.calls if info.kind != "text"]
    # the first transformer call of a lazily bound processor began before its hook could receive
    # the pipeline's cache context
    checked = [lay for lay in layouts if lay is not layouts[0]] if via == "set_attn_processor" else layouts
    assert {lay.branch for lay in checked} == branches
    assert {(lay.branch, lay.cond_rows, lay.uncond_rows) for lay in checked} == rows
    generations = sorted({lay.generation for lay in layouts})
    assert len(generations) == 2
    for g in generations:
        assert sorted({lay.step_index for lay in layouts if lay.generation == g}) == [0, 1, 2]


def test_processor_outside_a_supported_transformer_says_so():
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.set_processor(dit_accel.AttnProcessor(dit_accel.Dense()))
    with pytest.raises(dit_accel.UnsupportedModelError, match="not inside a supported transformer"):
        attn(torch.randn(1, 3, 8))


def test_method_state_is_per_module_branch_and_shape_and_cleared_per_generation():
    class Counting(dit_accel.Dense):
        def __call__(self, query, key, value, attn_mask, call=None):
            call.state["calls"] = call.state.get("calls", 0) + 1
            seen.append((call.module.name, call.layout.branch, call.layout.generation, call.state["calls"]))
            return super().__call__(query, key, value, attn_mask, call)

    seen = []
    pipe = make_tiny_pipeline("wan")
    dit_accel.apply(pipe, attention=Counting(backend="sdpa"))
    kwargs = tiny_inputs("wan", guidance_scale=4.0, num_inference_steps=3)
    pipeline_output(pipe, kwargs)
    pipeline_output(pipe, kwargs)
    first_gen = min(g for _, _, g, _ in seen)
    for generation in (first_gen, first_gen + 1):
        counts = [(n, b, c) for n, b, g, c in seen if g == generation and n == "blocks.0.attn1"]
        # 3 steps per branch; cond and uncond counted apart; counting restarts each generation
        assert [c for _, b, c in counts if b == "cond"] == [1, 2, 3]
        assert [c for _, b, c in counts if b == "uncond"] == [1, 2, 3]
