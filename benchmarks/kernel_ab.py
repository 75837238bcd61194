"""The block-sparse kernel of an earlier commit against this tree's, as the sparse methods call it.

A kernel change that should leave the methods' path alone (model-order q, k, v read through
``seq_index``, online softmax, pointer loads) is checked here: both kernels on the same inputs and
layout (TemporalSparse's packed tile order at the Wan2.1-1.3B 480p shape, random layouts), their
outputs compared, and each call timed in rounds that alternate the candidates. Also timed: the same
call on inputs already in tile order, on that path and at this tree's default launch (on Hopper TMA
loads with the fixed softmax shift), which shows what reading through the index forgoes.

    python -m dit_accel.benchmarks.kernel_ab --base 7438bb7

The earlier kernel is read with ``git show BASE:kernels/block_sparse.py``, so run it from a clone.
Needs a CUDA GPU. Writes ``benchmarks/results/kernel-ab-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from dit_accel.benchmarks import sparse as sb
from dit_accel.benchmarks.report import command_line, cuda_time_ms, median, print_table, write_result
from dit_accel.kernels import block_sparse as current


def load_base_kernel(rev: str):
    """kernels/block_sparse.py at ``rev`` as a module (Triton needs its source in a file)."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:kernels/block_sparse.py"], capture_output=True,
                         text=True)
    if src.returncode:
        raise SystemExit(f"--base: git show {rev}:kernels/block_sparse.py failed ({src.stderr.strip()}); run from a "
                         "clone that has that commit")
    path = Path(tempfile.mkdtemp()) / "base_block_sparse.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("base_block_sparse", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="7438bb7", help="the earlier commit whose kernel is compared")
    ap.add_argument("--densities", default="0.25,0.5")
    ap.add_argument("--rounds", type=int, default=7, help="rounds; each times every call (median of --iters)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_ab.py needs a CUDA GPU; run it through the device tool or on a GPU host.")
    base = load_base_kernel(args.base)
    grid, text, heads, dim = sb.SHAPES[sb.WAN480]
    rows = []
    for density in (float(d) for d in args.densities.split(",")):
        _, order, (q, k, v), dense_ms = sb._method_inputs(grid, text, heads, dim, density, args.iters)
        qt, kt, vt = order.gather(q), order.gather(k), order.gather(v)
        mask, blocks, counts = sb._method_layout(order, heads, density)
        lens, index = order.tile_len, order.index
        calls = {  # name -> (call, output in model order?)
            "base, indexed": (lambda: base.block_sparse_attention_triton(q, k, v, blocks, counts, tile_len=lens,
                                                                         seq_index=index), True),
            "this tree, indexed": (lambda: current.block_sparse_attention_triton(q, k, v, blocks, counts,
                                                                                tile_len=lens, seq_index=index), True),
            "base, tiled inputs": (lambda: base.block_sparse_attention_triton(qt, kt, vt, blocks, counts,
                                                                              tile_len=lens), False),
            "this tree, tiled inputs, online softmax, pointer loads": (
                lambda: current.block_sparse_attention_triton(qt, kt, vt, blocks, counts, tile_len=lens,
                                                              fixed_shift=False, tma=False), False),
            "this tree, tiled inputs, default launch": (
                lambda: current.block_sparse_attention_triton(qt, kt, vt, blocks, counts, tile_len=lens), False),
        }
        ref = calls["base, indexed"][0]()
        diffs = {}
        for name, (fn, model_order) in calls.items():
            out = fn() if model_order else order.scatter(fn())
            diffs[name] = float((out.float() - ref.float()).abs().max())
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, (fn, _) in calls.items():
                times[name].append(median(cuda_time_ms(fn, iters=args.iters)))
        for name, t in times.items():
            rows.append(dict(density=round(mask.float().mean().item(), 4), call=name, ms=round(median(t), 3),
                             of_dense=round(median(t) / dense_ms, 4), max_abs_diff_vs_base_indexed=diffs[name],
                             ms_per_round=[round(x, 3) for x in t], dense_ms=round(dense_ms, 3)))
        torch.cuda.empty_cache()
    print_table(rows, ["density", "call", "ms", "of_dense", "max_abs_diff_vs_base_indexed"])
    payload = {"command": command_line("dit_accel.benchmarks.kernel_ab", argv if argv is not None else sys.argv[1:]),
               "base": args.base, "shape": sb.WAN480, "dtype": "bfloat16", "rows": rows}
    print("wrote", write_result("kernel-ab", payload, args.out))


if __name__ == "__main__":
    main()
