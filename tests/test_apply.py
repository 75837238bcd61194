"""dit_accel.apply: one verb on, `remove()` restores stock behaviour exactly; clear errors."""

import gc
import weakref

import pytest
import torch
from diffusers import UNet2DModel, WanPipeline
from helpers import Recorder, pipeline_output

import dit_accel
from dit_accel.geometry import HOOK_NAME, get_hook
from dit_accel.pipelines.tiny import FAMILIES, make_tiny_pipeline, tiny_inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_output_processors_and_hooks(family):
    pipe = make_tiny_pipeline(family)
    kwargs = tiny_inputs(family, guidance_scale=4.0)
    stock = pipeline_output(pipe, kwargs)
    before = dict(pipe.transformer.attn_processors)

    handle = dit_accel.apply(pipe, attention=Recorder(scale=1.01))
    assert not torch.equal(pipeline_output(pipe, kwargs), stock)
    handle.remove()

    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert get_hook(pipe.transformer) is None
    registry = getattr(pipe.transformer, "_diffusers_hook", None)  # pipelines create one for cache contexts
    assert registry is None or not registry.hooks
    assert torch.equal(pipeline_output(pipe, kwargs), stock)


def test_nested_apply_removed_in_reverse_order():
    pipe = make_tiny_pipeline("wan")
    kwargs = tiny_inputs("wan")
    stock = pipeline_output(pipe, kwargs)
    first = dit_accel.apply(pipe, attention=dit_accel.Dense("sdpa"))
    second = dit_accel.apply(pipe, attention=Recorder(scale=1.01))
    second.remove()
    assert isinstance(next(iter(pipe.transformer.attn_processors.values())), dit_accel.AttnProcessor)
    assert get_hook(pipe.transformer) is not None  # still needed by the first handle
    first.remove()
    assert get_hook(pipe.transformer) is None
    assert torch.equal(pipeline_output(pipe, kwargs), stock)


def test_with_block_removes_on_exit_and_when_it_raises():
    pipe = make_tiny_pipeline("wan")
    kwargs = tiny_inputs("wan")
    stock = pipeline_output(pipe, kwargs)
    before = dict(pipe.transformer.attn_processors)
    with dit_accel.apply(pipe, attention=Recorder(scale=1.01)) as handle:
        assert handle.transformers == [pipe.transformer]
        assert not torch.equal(pipeline_output(pipe, kwargs), stock)
    assert get_hook(pipe.transformer) is None
    assert torch.equal(pipeline_output(pipe, kwargs), stock)
    with pytest.raises(KeyError, match="inside"):
        with dit_accel.apply(pipe, attention=Recorder(scale=1.01)):
            raise KeyError("inside")
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert get_hook(pipe.transformer) is None
    handle.remove()  # a second removal changes nothing
    assert torch.equal(pipeline_output(pipe, kwargs), stock)


def test_apply_covers_both_wan22_experts():
    base = make_tiny_pipeline("wan")
    expert = make_tiny_pipeline("wan", seed=1).transformer
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, transformer_2=expert, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    recorder = Recorder()
    handle = dit_accel.apply(pipe, attention=recorder)
    assert handle.transformers == [base.transformer, expert]
    pipeline_output(pipe, tiny_inputs("wan", num_inference_steps=4))
    generations_per_expert = {id(layout) for _, layout, *_ in recorder.calls}
    assert len(generations_per_expert) > 1
    assert get_hook(expert) is not None and get_hook(base.transformer) is not None
    handle.remove()
    assert get_hook(expert) is None


def test_unsupported_model_names_the_supported_families():
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(dit_accel.UnsupportedModelError) as err:
        dit_accel.apply(unet, attention=dit_accel.Dense())
    for name in ("FluxTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel",
                 "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel"):
        assert name in str(err.value)
    assert not hasattr(unet, "_diffusers_hook")


def test_bad_arguments_are_named():
    pipe = make_tiny_pipeline("wan")
    with pytest.raises(NotImplementedError, match="cache="):
        dit_accel.apply(pipe, cache="fbcache")
    with pytest.raises(TypeError, match="guidance="):
        dit_accel.apply(pipe, guidance="softpag")
    with pytest.raises(TypeError, match="attention method"):
        dit_accel.AttnProcessor("dense")
    with pytest.raises(TypeError, match="pipeline or transformer"):
        dit_accel.apply("wan")
    assert get_hook(pipe.transformer) is None


def test_from_pretrained_local_pipeline(tmp_path):
    """Real loading code on a saved local model: save, reload offline, accelerate, compare."""
    pipe = make_tiny_pipeline("flux")
    kwargs = tiny_inputs("flux", guidance_scale=3.0)
    stock = pipeline_output(pipe, kwargs)
    pipe.save_pretrained(tmp_path / "tiny-flux")
    loaded = type(pipe).from_pretrained(tmp_path / "tiny-flux", local_files_only=True, text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    loaded.set_progress_bar_config(disable=True)
    handle = dit_accel.apply(loaded, attention=dit_accel.Dense())
    assert HOOK_NAME in loaded.transformer._diffusers_hook.hooks
    assert (pipeline_output(loaded, kwargs) - stock).abs().max().item() <= 1e-5
    handle.remove()


class _Keeper(dit_accel.Dense):
    """Dense attention that keeps a tensor in its per-layer state, as the sparse methods' forecasts do."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def __call__(self, query, key, value, attn_mask, call=None):
        if call is not None and "x" not in call.state:
            call.state["x"] = torch.zeros(3)
            self.kept.append(weakref.ref(call.state["x"]))
        return super().__call__(query, key, value, attn_mask, call)


def test_remove_frees_method_state_at_once():
    """Removing frees what methods keep per layer right away, not at the next cyclic garbage
    collection (which GPU memory does not trigger): on a bare transformer, whose state lives on
    after its calls (a pipeline's call clears it at its end)."""
    model = make_tiny_pipeline("wan").transformer
    x = torch.randn(1, model.config.in_channels, 3, 16, 16)
    text = torch.randn(1, 8, model.config.text_dim)
    method = _Keeper()
    handle = dit_accel.apply(model, attention=method)
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.full((1,), 999.0), encoder_hidden_states=text, return_dict=False)
    assert method.kept and all(ref() is not None for ref in method.kept)
    gc.disable()
    try:
        handle.remove()
        assert all(ref() is None for ref in method.kept)
    finally:
        gc.enable()
