"""Dense attention backends vs cuDNN SDPA at real DiT shapes, and the processor-path overhead on a
full-size random-weight Wan2.1-1.3B transformer step. GPU only.

    python benchmarks/dense.py                   # all shapes + the model step
    python benchmarks/dense.py --skip-model --iters 5

Prints a table and writes benchmarks/results/dense-<device>-<date>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit_accel import Dense, apply
from dit_accel.backends import backend_status, flex, sage, xformers_attention
from dit_accel.benchmarks.report import cuda_time_ms, median, print_table, write_result

SHAPES = {
    # name: (sequence length, heads, head_dim)
    "flux-1024px": (4608, 24, 128),
    "wan2.1-1.3b-480p-81f": (21 * 30 * 52, 12, 128),
    "wan2.1-14b-720p-81f": (21 * 45 * 80, 40, 128),
}

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)


def _sdpa_with(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def candidates() -> dict:
    """Backend name -> (q, k, v) -> out, or a string saying why it is not run."""
    dense_auto = Dense()
    runs = {
        "sdpa-cudnn": _sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": _sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": _sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
        "flex": lambda q, k, v: flex(q, k, v),
        "dit_accel-Dense(auto)": lambda q, k, v: dense_auto(q, k, v, None),
    }
    for name, fn in (("sage", sage), ("xformers", xformers_attention)):
        status = backend_status(name)
        runs[name] = (lambda f: (lambda q, k, v: f(q, k, v)))(fn) if status.available else status.detail
    return runs


def bench_shape(shape: str, seq: int, heads: int, dim: int, iters: int) -> list[dict]:
    """Every backend at one shape, each timed between two baseline measurements."""
    q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    flops = 4 * seq * seq * heads * dim

    def baseline():
        return median(cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v), iters=iters))

    base = baseline()
    rows = [dict(shape=shape, backend="sdpa (default, baseline)", ms=round(base, 3), ratio=1.0,
                 tflops=round(flops / base / 1e9, 1), max_abs_err=0.0)]
    for name, fn in candidates().items():
        if isinstance(fn, str):
            rows.append(dict(shape=shape, backend=name, ms=None, ratio=None, note=fn))
            continue
        try:
            err = float((fn(q, k, v).float() - ref.float()).abs().max())
            # The baseline is timed right before and after each candidate, so clock and
            # thermal drift over the run hit both sides of the ratio alike.
            before = baseline()
            ms = median(cuda_time_ms(lambda fn=fn: fn(q, k, v), iters=iters))
            base_pair = (before + baseline()) / 2
            rows.append(dict(shape=shape, backend=name, ms=round(ms, 3), baseline_ms=round(base_pair, 3),
                             ratio=round(base_pair / ms, 3), tflops=round(flops / ms / 1e9, 1),
                             max_abs_err=round(err, 5)))
        except Exception as exc:  # report a backend without a kernel for this shape, keep going
            rows.append(dict(shape=shape, backend=name, ms=None, ratio=None, note=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def bench_kernels(iters: int) -> list[dict]:
    rows = []
    for shape, (seq, heads, dim) in SHAPES.items():
        rows += bench_shape(shape, seq, heads, dim, iters)
        torch.cuda.empty_cache()
    return rows


def bench_model(rounds: int, iters: int) -> dict:
    """Stock WanAttnProcessor vs dit_accel.apply(Dense()) on one full-size transformer step,
    alternating rounds so drift hits both equally."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
        latents = torch.randn(1, 16, 21, 60, 104, dtype=torch.bfloat16)
        text = torch.randn(1, 512, 4096, dtype=torch.bfloat16)
        timestep = torch.tensor([500.0])

    def step():
        with torch.no_grad():
            return model(latents, timestep, text, return_dict=False)[0]

    stock_out = step()
    handle = apply(model, attention=Dense())
    ours_out = step()
    handle.remove()
    stock, ours = [], []
    for _ in range(rounds):
        stock += cuda_time_ms(step, warmup=1, iters=iters)
        handle = apply(model, attention=Dense())
        ours += cuda_time_ms(step, warmup=1, iters=iters)
        handle.remove()
    return dict(
        model="Wan2.1-1.3B (random weights)", input="1x16x21x60x104 latents (480p, 81 frames), 512 text tokens, bf16",
        stock_ms=round(median(stock), 2), dit_accel_ms=round(median(ours), 2),
        overhead=round(median(ours) / median(stock) - 1, 4), stock_all_ms=[round(x, 2) for x in stock],
        dit_accel_all_ms=[round(x, 2) for x in ours],
        max_abs_diff_vs_stock=float((ours_out.float() - stock_out.float()).abs().max()),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="alternating stock/dit_accel rounds of the model step")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/dense.py needs a CUDA GPU; run it through the device tool or on a GPU host.")
    logging.basicConfig(level=logging.WARNING)

    rows = bench_kernels(args.iters)
    print_table(rows, ["shape", "backend", "ms", "baseline_ms", "ratio", "tflops", "max_abs_err", "note"])
    payload = {"dtype": "bfloat16", "batch": 1, "shapes": {k: dict(seq=s, heads=h, head_dim=d)
                                                          for k, (s, h, d) in SHAPES.items()},
               "ratio_meaning": "default-SDPA (cuDNN) time, timed before and after the backend / backend time "
                                "(>1 = faster)",
               "kernels": rows}
    if not args.skip_model:
        model = bench_model(args.rounds, args.iters)
        print(f"\nWan2.1-1.3B step: stock {model['stock_ms']} ms, dit_accel {model['dit_accel_ms']} ms, "
              f"overhead {100 * model['overhead']:+.2f}%")
        payload["model_step"] = model
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    print("wrote", write_result("dense", payload, args.out))


if __name__ == "__main__":
    main()
