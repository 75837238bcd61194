"""Dense mode through dit_accel.AttnProcessor equals diffusers' stock processors on tiny random
pipelines of every family (fp32, max abs diff <= 1e-5), and the processor really is on the path."""

import pytest
import torch
from helpers import Recorder, pipeline_output

import dit_accel
from dit_accel.pipelines.tiny import FAMILIES, make_tiny_pipeline, tiny_inputs

TOL = 1e-5

# Which attention kinds each variant must route through the processor.
EXPECTED_KINDS = {
    "flux": {"joint"},
    "sd3": {"joint"},
    "sd3.5": {"joint", "self"},
    "wan": {"self", "cross"},
    "wan-i2v": {"self", "cross"},
    "hunyuan-video": {"joint", "text"},
    "cogvideox": {"joint"},
    "ltx": {"self", "cross"},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg,batch", [(1.0, 1), (4.0, 1), (1.0, 2), (4.0, 2)], ids=["nocfg-b1", "cfg-b1",
                                                                                    "nocfg-b2", "cfg-b2"])
def test_dense_processor_matches_stock(family, cfg, batch):
    kwargs = tiny_inputs(family, batch_size=batch, guidance_scale=cfg, padded_text=True)
    pipe = make_tiny_pipeline(family)
    stock = pipeline_output(pipe, kwargs)
    stock_decoded = pipeline_output(pipe, kwargs, "pt")

    recorder = Recorder()
    pipe.transformer.set_attn_processor(dit_accel.AttnProcessor(recorder))
    ours = pipeline_output(pipe, kwargs)
    ours_decoded = pipeline_output(pipe, kwargs, "pt")

    assert stock.shape == ours.shape
    assert (ours - stock).abs().max().item() <= TOL
    assert (ours_decoded - stock_decoded).abs().max().item() <= TOL
    assert {info.kind for info, *_ in recorder.calls} == EXPECTED_KINDS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_is_on_the_path(family):
    """A method that changes attention by 1% changes the output: the equality above is not vacuous."""
    kwargs = tiny_inputs(family, guidance_scale=4.0)
    pipe = make_tiny_pipeline(family)
    stock = pipeline_output(pipe, kwargs)
    pipe.transformer.set_attn_processor(dit_accel.AttnProcessor(Recorder(scale=1.01)))
    assert (pipeline_output(pipe, kwargs) - stock).abs().max().item() > 1e-4


def test_flux_single_blocks_use_layout_text_length():
    pipe = make_tiny_pipeline("flux")
    recorder = Recorder()
    dit_accel.apply(pipe, attention=recorder)
    pipeline_output(pipe, tiny_inputs("flux", text_len=5))
    singles = [c for c in recorder.calls if c[0].name.startswith("single_transformer_blocks")]
    assert singles and all(span == (0, 5) for _, _, span, *_ in singles)
    assert {c[0].layer for c in singles} == {1, 2}  # after the one double-stream block


def test_sd35_dual_attention_and_joint_spans():
    pipe = make_tiny_pipeline("sd3.5")
    recorder = Recorder()
    dit_accel.apply(pipe, attention=recorder)
    pipeline_output(pipe, tiny_inputs("sd3.5", text_len=7, height=16, width=16))
    latent_tokens = (16 // 2 // 2) ** 2  # 16 px, tiny VAE downsamples by 2, patch 2
    dual = [c for c in recorder.calls if c[0].name == "transformer_blocks.0.attn2"]
    joint = [c for c in recorder.calls if c[0].name == "transformer_blocks.0.attn"]
    assert dual and all(c[0].kind == "self" and c[2] is None and c[3][2] == latent_tokens for c in dual)
    assert joint and all(c[2] == (latent_tokens, latent_tokens + 7) for c in joint)


def test_wan_i2v_runs_image_context_attention():
    pipe = make_tiny_pipeline("wan-i2v")
    recorder = Recorder()
    dit_accel.apply(pipe, attention=recorder)
    pipeline_output(pipe, tiny_inputs("wan-i2v"))
    cross = [c for c in recorder.calls if c[0].kind == "cross"]
    # Text (Wan's processor assumes 512 tokens) and the CLIP image context (4 patches + class token).
    assert {c[4][2] for c in cross} == {512, 5}


def test_hunyuan_padding_mask_reaches_the_method():
    pipe = make_tiny_pipeline("hunyuan-video")
    recorder = Recorder()
    dit_accel.apply(pipe, attention=recorder)
    pipeline_output(pipe, tiny_inputs("hunyuan-video", batch_size=2, padded_text=True))
    joint = [c for c in recorder.calls if c[0].kind == "joint"]
    assert joint and all(masked for *_, masked in joint)
    layout = joint[0][1]
    assert layout.text_mask is not None and layout.text_mask.sum(1).tolist() == [5, 4]


def test_bfloat16_pipeline_matches_stock():
    kwargs = tiny_inputs("wan", guidance_scale=4.0)
    pipe = make_tiny_pipeline("wan", dtype=torch.bfloat16)
    stock = pipeline_output(pipe, kwargs)
    handle = dit_accel.apply(pipe, attention=dit_accel.Dense(backend="sdpa"))
    assert torch.equal(pipeline_output(pipe, kwargs), stock)
    handle.remove()
