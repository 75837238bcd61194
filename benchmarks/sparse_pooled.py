"""Probe: does a pooled estimate of the skipped key tiles bring sparse attention close to dense on
the ShapesBench reference model?

    python -m dit_accel.benchmarks.sparse_pooled                      # GPU, 64 held-out prompts
    python -m dit_accel.benchmarks.sparse_pooled --prompts 1 --steps 1 --configs "Neighborhood(estimate=False)"  # smoke

The reference model attends broadly, so skipping tiles changes its videos a lot
(``sparse_quality.py``). Here every sparse attention call is patched: besides the visited tiles
(the block-sparse kernel, with its log-sum-exp), each query also attends to one summary token per
skipped key tile (the tile's mean key and mean value, its score raised by log(tile length), as if
every key of the tile scored like the mean key), and the two parts are merged through their
log-sum-exps. This is the first-order estimate of the skipped mass (NSA's compressed branch,
restricted to the skipped tiles); it costs one extra key per tile and is computed here in PyTorch,
outside the kernel. Per configuration, with and without the estimate: PSNR/SSIM against the dense
video of the same seed, the checker's change from dense, and the measured density (pairs the kernel
computed; the summary tokens are not counted).

Writes ``benchmarks/results/sparse-pooled-<device>-<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from dit_accel.benchmarks.reference import _generate
from dit_accel.benchmarks.report import command_line, print_table, write_result
from dit_accel.benchmarks.sparse_quality import fidelity
from dit_accel.evals import shapes as checker
from dit_accel.methods.estimate import merge, summary_attention
from dit_accel.pipelines import load_reference
from dit_accel.pipelines.shapes.pipeline import DEFAULT_SIZE, DEFAULT_STEPS
from dit_accel.pipelines.shapes.suite import held_out_suite

import dit_accel
import dit_accel.methods.sparse as sparse_methods

N, T = dit_accel.Neighborhood, dit_accel.TemporalSparse
NO_REFRESH = dict(warmup_steps=2, refresh_every=0, refresh_tol=None, estimate=False)
CONFIGS = {
    "Neighborhood(estimate=False)": lambda: N(estimate=False),
    "Neighborhood(window=(1.0, 0.5, 0.5), estimate=False)": lambda: N(window=(1.0, 0.5, 0.5), estimate=False),
    "Neighborhood(window=(0.75, 0.5, 1.0), estimate=False)": lambda: N(window=(0.75, 0.5, 1.0), estimate=False),
    "Neighborhood(window=(0.5, 0.5, 1.0), dense_steps=3, estimate=False)":
        lambda: N(window=(0.5, 0.5, 1.0), dense_steps=3, estimate=False),
    "TemporalSparse(threshold=-4, max_density=0.4, refresh off, estimate=False)":
        lambda: T(threshold=-4.0, max_density=0.4, **NO_REFRESH),
    "TemporalSparse(threshold=-6, max_density=0.3, refresh off, estimate=False)":
        lambda: T(threshold=-6.0, max_density=0.3, **NO_REFRESH),
    "TemporalSparse(threshold=-6, max_density=0.2, refresh off, estimate=False)":
        lambda: T(threshold=-6.0, max_density=0.2, **NO_REFRESH),
}


def pooled_estimate(q, k, v, blocks, counts, out, lse, tile_len, seq_index):
    """``out`` (model order) merged with attention to one summary token per skipped key tile.

    ``lse``: the sparse pass's log-sum-exp per tiled slot ``[B, H, slots]`` (natural log)."""
    out_c, lse_c, idx, valid = summary_attention(q, k, v, blocks, counts, tile_len, seq_index)
    merged = merge(out.float().index_select(2, idx), lse, out_c, lse_c)
    new = out.clone()
    new[:, :, idx[valid]] = merged[:, :, valid].to(out.dtype)
    return new


@contextlib.contextmanager
def with_pooled_estimate():
    """Patch the sparse methods' kernel call to add the pooled estimate of skipped tiles."""
    kernel = sparse_methods.block_sparse_attention

    def call(q, k, v, blocks, counts, *, tile_len=None, seq_index=None, return_lse=False, return_gap=False,
             **kw):
        res = kernel(q, k, v, blocks, counts, tile_len=tile_len, seq_index=seq_index, return_lse=True,
                     return_gap=return_gap, **kw)
        out = res[0] if seq_index is None else pooled_estimate(q, k, v, blocks, counts, res[0], res[1], tile_len,
                                                                seq_index)
        extra = ([res[1]] if return_lse else []) + ([res[-1]] if return_gap else [])
        return (out, *extra) if extra else out

    sparse_methods.block_sparse_attention = call
    try:
        yield
    finally:
        sparse_methods.block_sparse_attention = kernel


def probe_parser(doc: str, configs: dict, name: str) -> argparse.ArgumentParser:
    """The arguments the sparse probes share (``configs``: their named configurations)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default=";".join(configs), help=f"';'-separated, from: {'; '.join(configs)}")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=name, help="result file name prefix (NAME-<device>-<date>.json)")
    return ap


def probe_configs(ap: argparse.ArgumentParser, args, configs: dict) -> list[str]:
    """The names given to ``--configs``, each one of ``configs`` (else an argument error naming it)."""
    names = [c.strip() for c in args.configs.split(";") if c.strip()]
    unknown = [c for c in names if c not in configs]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {'; '.join(configs)}")
    return names


def run_probe(args, variants, command: str, pipe=None, extra: dict | None = None) -> None:
    """Generate the held-out suite dense, then with each variant, and write one row per variant.

    ``variants``: ``(label, make_method, context)`` triples: the row's leading fields, a factory of
    the attention method, and a factory of the context the generation runs in. ``pipe``: the loaded
    reference pipeline (loaded here when None); ``extra``: more fields for the result file."""
    device = torch.device(args.device)
    if pipe is None:
        pipe = load_reference(device=device, dtype=None)
        pipe.set_progress_bar_config(disable=True)
    suite = held_out_suite(args.prompts)
    prompts = [r["prompt"] for r in suite]
    size = dict(num_inference_steps=args.steps, **DEFAULT_SIZE)
    payload = {"command": command, "prompts": len(suite), "size": DEFAULT_SIZE, "steps": args.steps, **(extra or {})}
    if variants:
        dense = _generate(pipe, suite, device, args.batch, **size)
        dense_scores = checker.score(dense, prompts)
        rows = []
        for label, make_method, context in variants:
            method = make_method()
            with dit_accel.apply(pipe, attention=method), context():
                videos = _generate(pipe, suite, device, args.batch, **size)
            rows.append({**label, "density": round(method.density(), 4),
                         **fidelity(videos, dense, prompts, dense_scores)})
            print_table(rows[-1:], list(rows[-1]))
        print_table(rows, list(rows[0]))
        payload |= {"dense": {k: dense_scores[k] for k in ("color", "shape", "motion")}, "rows": rows}
    print(f"wrote {write_result(args.name, payload, args.out)}")


def main(argv=None) -> None:
    ap = probe_parser(__doc__, CONFIGS, "sparse-pooled")
    args = ap.parse_args(argv)
    names = probe_configs(ap, args, CONFIGS)
    variants = [({"config": name, "pooled_estimate": pooled}, CONFIGS[name],
                 with_pooled_estimate if pooled else contextlib.nullcontext)
                for name in names for pooled in (False, True)]
    run_probe(args, variants, command_line("dit_accel.benchmarks.sparse_pooled", argv))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
