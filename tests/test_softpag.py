"""SoftPAG's perturbation: u = 0 is the unguided model exactly, u = 1 (and u in between) equals an
explicit S x S attention map mixed with the identity for the chosen heads only, on tiny random
models of every family, on image rows and on all rows; it rides on any attention method."""


import pytest
import torch
from helpers import ExplicitMap, pipeline_output

import dit_accel
from dit_accel import Dense, Neighborhood, SoftPAG, TemporalSparse
from dit_accel.geometry import get_hook
from dit_accel.guidance import Perturbed
from dit_accel.methods.base import AttentionMethod
from dit_accel.pipelines.tiny import FAMILIES, make_tiny_pipeline, tiny_inputs

HEADS = {0: [1], 1: [0]}  # every tiny model has >= 2 layers with self / joint attention and >= 2 heads


@pytest.mark.parametrize("family", FAMILIES)
def test_u0_is_exact_and_u_equals_an_explicit_identity_mix(family):
    kwargs = tiny_inputs(family, guidance_scale=1.0, padded_text=True)
    pipe = make_tiny_pipeline(family)
    plain = dit_accel.apply(pipe, attention=Dense())
    unguided = pipeline_output(pipe, kwargs)
    plain.remove()

    pag = SoftPAG(heads=HEADS, strength=0.0)
    handle = dit_accel.apply(pipe, attention=Perturbed(Dense(), pag))  # the perturbation alone, no guidance
    with pag.perturbing():
        assert torch.equal(pipeline_output(pipe, kwargs), unguided)  # u = 0: bit-identical
    handle.remove()

    for rows, u in (("image", 1.0), ("all", 1.0), ("image", 0.4)):
        pag = SoftPAG(heads=HEADS, strength=u, rows=rows)
        handle = dit_accel.apply(pipe, attention=Perturbed(Dense(), pag))
        with pag.perturbing():
            ours = pipeline_output(pipe, kwargs)
        handle.remove()
        oracle = dit_accel.apply(pipe, attention=ExplicitMap(HEADS, u, rows))
        expect = pipeline_output(pipe, kwargs)
        oracle.remove()
        assert (ours - expect).abs().max().item() <= 1e-5, (rows, u)
        assert (ours - unguided).abs().max().item() > 1e-4, (rows, u)  # the perturbation is on the path


class Capture(AttentionMethod):
    """Runs `inner` and keeps what it returned per call (to check heads the perturbation must not touch)."""

    def __init__(self, inner):
        self.inner, self.outs = inner, []

    def __call__(self, query, key, value, attn_mask, call):
        out = self.inner(query, key, value, attn_mask, call)
        self.outs.append((call.module, call.text_span, out.clone(), value.clone()))
        return out


class After(AttentionMethod):
    """The final (perturbed) output of each call, recorded after SoftPAG: wraps the processor's method."""

    def __init__(self, method):
        self.method, self.outs = method, []

    def __call__(self, query, key, value, attn_mask, call):
        out = self.method(query, key, value, attn_mask, call)
        self.outs.append(out.clone())
        return out


@pytest.mark.parametrize("family,method", [(f, Dense()) for f in FAMILIES] + [
    ("wan", Neighborhood(window=(0.5, 1.0, 1.0))),
    ("wan", TemporalSparse(threshold=-1.0, warmup_steps=1, refresh_every=0, estimate=False)),
    ("cogvideox", TemporalSparse(threshold=-1.0, warmup_steps=1, refresh_every=0, estimate=False)),
], ids=[f"{f}-dense" for f in FAMILIES] + ["wan-neighborhood", "wan-temporal-sparse", "cogvideox-temporal-sparse"])
def test_only_chosen_heads_and_rows_change_on_any_method(family, method):
    """Through the same processor path: the chosen heads of the chosen batch row become v exactly
    on the image rows (u = 1); every other head, batch row and text row is bit-identical to the
    method's own output."""
    kwargs = tiny_inputs(family, batch_size=2, guidance_scale=1.0)
    pipe = make_tiny_pipeline(family)
    pag = SoftPAG(heads=HEADS, strength=1.0)
    capture = Capture(method)
    handle = dit_accel.apply(pipe, attention=Perturbed(capture, pag))
    after = After(handle.attention.method)
    handle.attention.method = after
    with pag.perturbing(rows=[1]):
        pipeline_output(pipe, kwargs)
    handle.remove()
    assert len(capture.outs) == len(after.outs) > 0
    perturbed = 0
    for (info, span, inner_out, value), out in zip(capture.outs, after.outs):
        chosen = HEADS.get(info.layer, []) if info.kind in ("self", "joint") else []
        image = torch.ones(out.shape[2], dtype=torch.bool)
        if info.kind == "joint":
            image[span[0]:span[1]] = False
        for b in range(out.shape[0]):
            for h in range(out.shape[1]):
                if b == 1 and h in chosen:
                    assert torch.equal(out[b, h][image], value[b, h][image])
                    assert torch.equal(out[b, h][~image], inner_out[b, h][~image])
                    perturbed += 1
                else:
                    assert torch.equal(out[b, h], inner_out[b, h])
    assert perturbed > 0


def test_bad_heads_and_parameters_are_named(tmp_path):
    pipe = make_tiny_pipeline("wan")
    with pytest.raises(ValueError, match=r"heads\[0\]=\[5\]"):
        dit_accel.apply(pipe, guidance=SoftPAG(heads={0: [5]}))
    with pytest.raises(ValueError, match="layer 9"):
        dit_accel.apply(pipe, guidance=SoftPAG(heads={9: [0]}))
    with pytest.raises(ValueError, match="strength"):
        SoftPAG(heads=HEADS, strength=1.5)
    with pytest.raises(ValueError, match="rows"):
        SoftPAG(heads=HEADS, rows="text")
    with pytest.raises(ValueError, match="heads"):
        SoftPAG(heads={})
    with pytest.raises(FileNotFoundError, match="preset"):
        SoftPAG(preset=str(tmp_path / "missing.json"))
    preset = tmp_path / "p.json"
    preset.write_text('{"heads": {"1": [0, 1]}, "strength": 0.5}')
    assert SoftPAG(preset=str(preset)).heads == {1: (0, 1)}


class Spy:
    """Records each transformer call's inputs as the pipeline made them (before any wrapper) and each
    prediction the scheduler's step receives."""

    def __init__(self, pipe):
        self.calls, self.steps = [], []
        self.handle = pipe.transformer.register_forward_pre_hook(self._pre, with_kwargs=True)
        step = pipe.scheduler.step

        def spy_step(model_output, *a, **k):
            self.steps.append(model_output.detach().clone())
            return step(model_output, *a, **k)

        pipe.scheduler.step = spy_step

    def _pre(self, module, args, kwargs):
        hook = get_hook(module)
        ctx = hook.cache_context._context if hook is not None else None
        self.calls.append((ctx.name if ctx is not None else None, args,
                           {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))


@pytest.mark.parametrize("family,cfg,batched", [
    ("sd3", 4.0, True), ("cogvideox", 4.0, True), ("ltx", 4.0, True),  # batched CFG: [uncond, cond]
    ("wan", 4.0, False),                                                # separate cond / uncond calls
    ("flux", 1.0, None),                                                # guidance-distilled: no CFG
    ("hunyuan-video", 1.0, None),
])
def test_guided_prediction_equals_three_separate_passes(family, cfg, batched):
    """At every step the scheduler receives eps_u + g (eps_c - eps_u) + s (eps_c - eps_pert), with the
    three predictions recomputed here by separate, unbatched transformer calls on the recorded inputs."""
    kwargs = tiny_inputs(family, guidance_scale=cfg, num_inference_steps=3)
    pipe = make_tiny_pipeline(family)
    pag = SoftPAG(heads=HEADS, strength=0.7, scale=2.5)
    spy = Spy(pipe)  # first: the scheduler step it records is the one the guidance wraps
    handle = dit_accel.apply(pipe, guidance=pag)
    pipeline_output(pipe, kwargs)
    assert len(spy.steps) == 3
    t = pipe.transformer

    if batched is None or batched:
        assert len(spy.calls) == 3
        for (_, args, kw), got in zip(spy.calls, spy.steps):
            if batched:
                eps = _plain(t, args, kw)
                eps_u, eps_c = eps.chunk(2)
                cond_kw = {k: (v.chunk(2)[1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == eps.shape[0]
                               else v) for k, v in kw.items()}
                with pag.perturbing():
                    eps_p = _plain(t, args, cond_kw)
                expect = eps_u + cfg * (eps_c - eps_u) + 2.5 * (eps_c - eps_p)
            else:
                eps_c = _plain(t, args, kw)
                with pag.perturbing():
                    eps_p = _plain(t, args, kw)
                expect = eps_c + 2.5 * (eps_c - eps_p)
            assert (got - expect).abs().max().item() <= 1e-4, (got - expect).abs().max().item()
    else:
        assert [c[0] for c in spy.calls] == ["cond", "uncond"] * 3
        for i, got in enumerate(spy.steps):
            (_, a_c, k_c), (_, a_u, k_u) = spy.calls[2 * i], spy.calls[2 * i + 1]
            eps_c, eps_u = _plain(t, a_c, k_c), _plain(t, a_u, k_u)
            with pag.perturbing():
                eps_p = _plain(t, a_c, k_c)
            expect = eps_u + cfg * (eps_c - eps_u) + 2.5 * (eps_c - eps_p)
            assert (got - expect).abs().max().item() <= 1e-4, (got - expect).abs().max().item()
    handle.remove()
    assert getattr(t.forward, "__name__", "") != "guided_forward" and "step" not in vars(pipe.scheduler) or \
        getattr(pipe.scheduler.step, "__name__", "") == "spy_step"


def _plain(t, args, kw):
    """One transformer call without the guidance runner (the forward it wrapped); the perturbation
    still applies inside perturbing()."""
    forward = t.forward
    if getattr(forward, "__name__", "") == "guided_forward":
        forward = forward.__kwdefaults__["_forward"]
    with torch.no_grad():
        out = forward(*args, **kw)
    return out[0] if isinstance(out, tuple) else out.sample
