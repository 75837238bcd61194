"""SoftPAGGuider in a real modular pipeline (diffusers' Wan core denoise blocks on a tiny random
Wan transformer): each step's guided prediction equals eps_u + g (eps_c - eps_u) + s (eps_c - eps_pert),
with the perturbed prediction recomputed by an explicit float64 attention-map oracle."""

import pytest
import torch
from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep
from helpers import ExplicitMap

import dit_accel
from dit_accel import AttnProcessor, Dense, Neighborhood
from dit_accel.guidance import Perturbed
from dit_accel.guiders import SoftPAGGuider
from dit_accel.pipelines.tiny import make_tiny_pipeline, tiny_inputs

HEADS = {0: [1], 1: [0]}


def _modular(guider):
    pipe = make_tiny_pipeline("wan")
    mp = WanCoreDenoiseStep().init_pipeline()
    mp.update_components(transformer=pipe.transformer, scheduler=pipe.scheduler, guider=guider)
    return mp, pipe.transformer, pipe.scheduler


def _run(mp, kw, steps=3):
    pe = kw["prompt_embeds"]
    return mp(prompt_embeds=pe, negative_prompt_embeds=torch.zeros_like(pe), num_inference_steps=steps,
              height=kw["height"], width=kw["width"], num_frames=kw["num_frames"],
              generator=torch.Generator().manual_seed(0), output="latents")


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_guider_equals_three_predictions_by_hand(cfg):
    u, s = 0.6, 2.5
    guider = SoftPAGGuider(guidance_scale=cfg, heads=HEADS, strength=u, perturbed_guidance_scale=s)
    mp, t, scheduler = _modular(guider)
    kw = tiny_inputs("wan")
    calls, steps = [], []
    hook = t.register_forward_pre_hook(lambda m, a, k: calls.append({n: v.clone() if torch.is_tensor(v) else v
                                                                      for n, v in k.items()}), with_kwargs=True)
    step = scheduler.step
    scheduler.step = lambda out, *a, **k: (steps.append(out.detach().clone()), step(out, *a, **k))[1]
    _run(mp, kw)
    hook.remove()
    per_step = 3 if cfg > 1 else 2
    assert len(steps) == 3 and len(calls) == 3 * per_step

    def predict(method, kwargs):
        t.set_attn_processor(AttnProcessor(method))
        with torch.no_grad():
            return t(**kwargs)[0]

    oracle = ExplicitMap({k: v for k, v in HEADS.items()}, u, "image")
    for i, got in enumerate(steps):
        c = calls[per_step * i: per_step * (i + 1)]
        eps_c = predict(Dense(), c[0])
        eps_p = predict(oracle, c[-1])
        assert torch.equal(c[-1]["encoder_hidden_states"], c[0]["encoder_hidden_states"])  # perturbed = cond inputs
        expect = eps_c + s * (eps_c - eps_p)
        if cfg > 1:
            eps_u = predict(Dense(), c[1])
            expect = expect + (eps_u + cfg * (eps_c - eps_u) - eps_c)
        assert (got - expect).abs().max().item() <= 1e-5, (got - expect).abs().max().item()
    guider.remove()


def test_guider_keeps_an_installed_method_and_restores_the_processors():
    guider = SoftPAGGuider(guidance_scale=4.0, heads=HEADS)
    mp, t, _ = _modular(guider)
    stock = {k: type(v) for k, v in t.attn_processors.items()}
    method = Neighborhood(window=(1.0, 1.0, 1.0))
    handle = dit_accel.apply(t, attention=method)
    _run(mp, tiny_inputs("wan"), steps=2)
    procs = list(t.attn_processors.values())
    assert all(isinstance(p.method, Perturbed) and p.method.inner is method for p in procs)
    guider.remove()
    assert all(p.method is method for p in t.attn_processors.values())
    handle.remove()
    assert {k: type(v) for k, v in t.attn_processors.items()} == stock


def test_guider_checks_heads_and_loads_presets(tmp_path):
    guider = SoftPAGGuider(heads={40: [0]})
    mp, _, _ = _modular(guider)
    with pytest.raises(ValueError, match="layer 40"):
        _run(mp, tiny_inputs("wan"), steps=1)
    preset = tmp_path / "p.json"
    preset.write_text('{"heads": {"1": [0]}, "strength": 0.5, "scale": 1.5}')
    g = SoftPAGGuider(preset=str(preset))
    assert (g.pag.heads, g.pag.strength, g.perturbed_guidance_scale) == ({1: (0,)}, 0.5, 1.5)
    assert SoftPAGGuider(preset=str(preset), perturbed_guidance_scale=4.0).perturbed_guidance_scale == 4.0
