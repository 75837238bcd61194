"""Train the ShapesBench reference model from scratch (GPU), resumably.

    python -m dit_accel.pipelines.shapes.train --out artifacts/shapes --minutes 24

trains for 24 minutes of GPU time in total and exports the EMA weights as a diffusers directory
to ``OUT/pipeline``. The run can be cut anywhere: ``--budget-s`` stops this process after that
many seconds with a checkpoint, and running the same command again resumes where it stopped
(the GPU machine here allows 10 minutes per command). Every ``--log-every`` steps a line goes to
``OUT/log.jsonl``; sample grids of held-out prompts land in ``OUT/samples/``.

Training: rectified flow (x_t = (1 - s) x_0 + s eps, predict eps - x_0) in pixel space,
logit-normal noise levels shifted toward noise like the inference scheduler, 10% empty prompts
for classifier-free guidance, AdamW with warm-up and a cosine decay over the time budget, EMA
weights for export. About 65% of the scenes have two objects. Each step draws one of three sizes
(17x64x64 video, 9x48x48 video, 64x64 image) so the model generates at all of them; batch sizes keep
the token count per step similar.
On CUDA the transformer blocks are compiled with ``torch.compile`` (regional compilation, one graph
per size; compile time counts as training time; 1.7x the eager throughput on the H100, median 523 vs 310
samples/s); ``--no-compile`` turns that off, ``--compile`` turns it on for CPU.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...files import atomic_write
from .data import render, sample_spec
from .pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    SCHEDULER_SHIFT,
    ShapesPipeline,
    build_components,
    encode_text,
    with_time_channel,
)
from .suite import held_out_suite, save_grid

# (name, frames, height, width, batch, probability)
MODES = [
    ("video", 17, 64, 64, 24, 0.60),
    ("small", 9, 48, 48, 80, 0.25),
    ("image", 1, 64, 64, 160, 0.15),
]
PROMPT_DROPOUT = 0.1
# Two-object scenes are where the model has to bind each color to its own shape and motion, and
# what it learns last; this share of samples is forced to two objects (the rest draw one or two
# evenly), so about 65% of the training scenes have two objects.
FORCE_TWO_OBJECTS = 0.3
_GOLDEN = (math.sqrt(5) - 1) / 2


def _n_objects(seed: int) -> int | None:
    """2 for a ``FORCE_TWO_OBJECTS`` share of sample seeds (spread evenly), otherwise None (random)."""
    return 2 if (seed * _GOLDEN) % 1.0 < FORCE_TWO_OBJECTS else None


def _atomic_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, params, alpha=1 - decay)


def export_pipeline(pipe: ShapesPipeline, out_dir: Path) -> None:
    """Save a copy of ``pipe`` with fp16 weights (sharded, with checksums), replacing ``out_dir`` atomically."""
    half = ShapesPipeline(
        pipe.tokenizer, copy.deepcopy(pipe.text_encoder).half(), copy.deepcopy(pipe.transformer).half(), pipe.scheduler
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    half.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def sample(pipe: ShapesPipeline, path: Path, n: int = 8, steps: int = DEFAULT_STEPS) -> None:
    suite = held_out_suite(n)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    device = next(pipe.transformer.parameters()).device
    gens = [torch.Generator(device).manual_seed(r["seed"]) for r in suite]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = pipe([r["prompt"] for r in suite], generator=gens, num_inference_steps=steps,
                   guidance_scale=DEFAULT_GUIDANCE).frames
    save_grid(path, list(out))
    (path.with_suffix(".txt")).write_text("\n".join(r["prompt"] for r in suite) + "\n")
    pipe.transformer.train(was_training)
    pipe.text_encoder.train(was_training)


def train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    comps = build_components(seed=args.seed)
    tok, te, tr = comps["tokenizer"], comps["text_encoder"], comps["transformer"]
    te.to(device).train()
    tr.to(device).train()
    params = [p for m in (tr, te) for p in m.parameters()]
    # fused: one kernel for the whole update on CUDA (the model is small, so launches add up)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    ema = [p.detach().clone().float() for p in params]
    step, counter, train_s, last_sample = 0, 0, 0.0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        tr.load_state_dict(state["transformer"])
        te.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        for e, s in zip(ema, state["ema"]):
            e.copy_(s)
        step, counter, train_s, last_sample = state["step"], state["counter"], state["train_s"], state["last_sample"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        print(f"resumed at step {step}, {train_s / 60:.1f} of {args.minutes} training minutes", flush=True)
    rng = np.random.default_rng([args.seed, step])
    total_s = args.minutes * 60
    started = time.time()

    def save_checkpoint():
        _atomic_save(
            {
                "transformer": tr.state_dict(), "text_encoder": te.state_dict(), "optimizer": opt.state_dict(),
                "ema": ema, "step": step, "counter": counter, "train_s": train_s, "last_sample": last_sample,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "args": vars(args),
            },
            ckpt,
        )

    def ema_pipeline() -> ShapesPipeline:
        """The pipeline with the EMA weights, in fresh modules built from the trained ones' configs.

        Fresh, not deep copies: with ``--compile`` the trained blocks carry compiled call wrappers
        bound to themselves, and a copy would keep calling the live (non-EMA) weights.
        """
        snap_tr = type(tr).from_config(tr.config).to(device)
        snap_te = type(te)(te.config).to(device)
        snap_tr.load_state_dict(tr.state_dict())
        snap_te.load_state_dict(te.state_dict())
        with torch.no_grad():
            for p, e in zip([p for m in (snap_tr, snap_te) for p in m.parameters()], ema):
                p.copy_(e)
        return ShapesPipeline(tok, snap_te, snap_tr, comps["scheduler"])

    if args.compile:
        # regional compilation: the transformer blocks (one compiled graph serves all of them, per
        # mode's shape); parameter names, the state dict and the EMA export are unchanged. A block
        # that fails to compile runs eagerly, with dynamo's warning.
        torch._dynamo.config.suppress_errors = True
        tr.compile_repeated_blocks(dynamic=False)
        print("compiling the transformer blocks (torch.compile, one graph per training size)", flush=True)
    probs = np.array([m[5] for m in MODES])
    window: list[float] = []
    t_log = time.time()
    samples_since = 0
    while train_s < total_s:
        if args.budget_s and time.time() - started > args.budget_s:
            break
        t0 = time.time()
        _name, nf, h, w, bs, _ = MODES[int(rng.choice(len(MODES), p=probs))]
        bs = max(1, int(bs * args.batch_scale))
        specs = [sample_spec(counter + i, image=(nf == 1), n_objects=_n_objects(counter + i)) for i in range(bs)]
        counter += bs
        x0 = render(specs, nf, h, w, device=device)
        drop = rng.random(bs) < PROMPT_DROPOUT
        prompts = ["" if d else s.prompt for s, d in zip(specs, drop)]
        u = torch.sigmoid(torch.randn(bs, device=device))
        sigma = SCHEDULER_SHIFT * u / (1 + (SCHEDULER_SHIFT - 1) * u)
        noise = torch.randn_like(x0)
        s5 = sigma.view(bs, 1, 1, 1, 1)
        xt = (1 - s5) * x0 + s5 * noise
        target = noise - x0
        frac = min(1.0, train_s / total_s)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            emb = encode_text(tok, te, prompts, device, torch.float32)
            pred = tr(hidden_states=with_time_channel(xt), timestep=sigma * 1000, encoder_hidden_states=emb,
                           return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            _ema_update(ema, [p.detach().float() for p in params], min(args.ema, (1 + step) / (10 + step)))
        step += 1
        samples_since += bs
        window.append(loss.detach())
        if step % args.log_every == 0:
            losses = torch.stack(window).float().cpu().numpy()
            window.clear()
            now = time.time()
            row = {"step": step, "loss": float(losses.mean()), "lr": lr, "train_min": round(train_s / 60, 3),
                   "samples": counter, "samples_per_s": round(samples_since / (now - t_log), 1)}
            t_log, samples_since = now, 0
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        train_s += time.time() - t0
        if args.sample_every and train_s - last_sample > args.sample_every * 60:
            last_sample = train_s
            sample(ema_pipeline(), out / "samples" / f"step{step:06d}.png", n=args.sample_prompts,
                   steps=args.sample_steps)
    save_checkpoint()
    if train_s < total_s:
        print(f"stopped after --budget-s at step {step} ({train_s / 60:.1f}/{args.minutes} min); "
              "run the same command again to resume", flush=True)
        return
    final = ema_pipeline()
    sample(final, out / "samples" / f"final-step{step:06d}.png", n=args.sample_prompts, steps=args.sample_steps)
    export_pipeline(final, out / "pipeline")
    log = out / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    from dit_accel.benchmarks.report import environment

    summary = {"environment": environment(), "steps": step, "samples": counter,
               "train_minutes": round(train_s / 60, 2), "args": vars(args), "modes": MODES,
               "force_two_objects": FORCE_TWO_OBJECTS,
               "loss_curve": [[r["step"], r["train_min"], r["loss"]] for r in rows]}
    atomic_write(out / "training.json", json.dumps(summary, indent=1) + "\n")
    print(f"done: {step} steps, {counter} samples, {train_s / 60:.1f} min; pipeline in {out / 'pipeline'}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory (checkpoint, logs, samples, exported pipeline)")
    ap.add_argument("--minutes", type=float, default=24.0, help="total training time (GPU minutes)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop this process after this many seconds")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--batch-scale", type=float, default=1.0, help="multiply every mode's batch size")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the transformer blocks (compile time counts as training time; "
                         "default: on for CUDA, where it trains 1.7x faster on the H100, off on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--sample-every", type=float, default=5.0, help="minutes between sample grids (0: only at the end)")
    ap.add_argument("--sample-prompts", type=int, default=8, help="held-out prompts per sample grid")
    ap.add_argument("--sample-steps", type=int, default=DEFAULT_STEPS, help="denoising steps of the sample grids")
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error("--minutes: must be > 0")
    if args.sample_prompts < 1:
        ap.error("--sample-prompts: must be >= 1")
    if args.compile is None:
        args.compile = torch.device(args.device).type == "cuda"
    train(args)


if __name__ == "__main__":
    main()
