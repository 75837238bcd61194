"""What SoftPAG's batched perturbed pass costs: a full-size random-weight FLUX.1-dev transformer
step at 1024x1024 (bf16), GPU only.

    python -m dit_accel.benchmarks.guidance

Times, in one process: the stock transformer call (batch 1), the stock call at batch 2 (what one
extra pass batched in costs), and the guided call through ``apply(pipe, guidance=SoftPAG(...))``
(the conditional row plus its perturbed copy in one batch, the perturbation applied in the chosen
heads). The target compares the guided call's extra time with one extra transformer forward:
``(guided - stock) / stock <= 1.05``.

Prints a table and writes benchmarks/results/guidance-<device>-<date>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import sys

import torch
from dit_accel.benchmarks.report import command_line, cuda_time_ms, median, print_table, write_result

import dit_accel

# FLUX.1-dev's transformer (its published config)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# a head selection of the size HeadHunter returns (8 heads over 6 blocks, double and single)
HEADS = {2: [3, 7], 10: [0], 18: [5], 30: [11, 12], 45: [2], 52: [9]}


def inputs(batch: int, size: int = 1024, text: int = 512, device="cuda", dtype=torch.bfloat16) -> dict:
    side = size // 16  # VAE /8, then 2x2 packing
    g = torch.Generator(device="cpu").manual_seed(0)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(batch, side * side, 64, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text, 4096, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, 768, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=torch.float32),
        img_ids=img_ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device),
        return_dict=False,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/guidance.py needs a CUDA GPU")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = FluxTransformer2DModel(**FLUX_DEV).eval()
        finally:
            torch.set_default_dtype(previous)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    one, two = inputs(1, args.size), inputs(2, args.size)

    def timed(kw) -> float:
        with torch.no_grad():
            return median(cuda_time_ms(lambda: model(**kw), warmup=2, iters=args.iters))

    stock = timed(one)
    stock2 = timed(two)
    pag = dit_accel.SoftPAG(heads=HEADS, strength=1.0, scale=3.0)
    with dit_accel.apply(pipe, guidance=pag):
        guided = timed(one)
    again = timed(one)
    base = (stock + again) / 2
    rows = [
        dict(call="stock, batch 1 (mean of before and after)", ms=round(base, 2)),
        dict(call="stock, batch 2", ms=round(stock2, 2), extra_vs_one_forward=round((stock2 - base) / base, 3)),
        dict(call=f"SoftPAG guided (batch 1 + perturbed copy, {sum(map(len, HEADS.values()))} heads)",
             ms=round(guided, 2), extra_vs_one_forward=round((guided - base) / base, 3)),
    ]
    print_table(rows, ["call", "ms", "extra_vs_one_forward"])
    args_given = argv if argv is not None else sys.argv[1:]
    payload = {"command": command_line("dit_accel.benchmarks.guidance", args_given),
               "model": "FluxTransformer2DModel, FLUX.1-dev config, random weights, bf16",
               "size": args.size, "image_tokens": (args.size // 16) ** 2, "text_tokens": 512, "heads": HEADS,
               "target": "(guided - stock) / stock <= 1.05", "rows": rows,
               "meets_target": bool((guided - base) / base <= 1.05)}
    print("wrote", write_result("guidance", payload, args.out))


if __name__ == "__main__":
    main()
