"""The `dit-accel` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> str:
    """Versions, device, dense backends (with reasons for the missing ones), families and methods."""
    import torch

    from . import SUPPORTED_MODELS, __version__
    from .backends import auto_backend, detect_backends
    from .methods import METHODS

    lines = [f"dit-accel {__version__}", "", "versions:"]
    lines.append(f"  {'python':<13} {platform.python_version()}")
    for dist in ("torch", "triton", "diffusers", "accelerate", "transformers", "safetensors", "numpy"):
        lines.append(f"  {dist:<13} {_version(dist)}")
    lines += ["", "device:"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append(f"  cpu only ({torch.get_num_threads()} threads); no CUDA device")
    name, why = auto_backend()
    lines += ["", f"dense backends (auto -> {name}: {why}):"]
    for status in detect_backends().values():
        mark = "yes" if status.available else "no "
        lines.append(f"  {status.name:<9} {mark}  {status.detail}")
    lines += ["", "supported families:"]
    for family, cls in SUPPORTED_MODELS.items():
        lines.append(f"  {family:<14} {cls}")
    lines += ["", "attention methods:"]
    for method in METHODS:
        lines.append(f"  {method}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit-accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, device, backends, supported families and methods")
    ev = sub.add_parser("eval", help="run the baseline and every configuration on a prompt suite (resumable)",
                        description="Run the baseline and every configuration of --configs on the same prompts and "
                                    "seeds; rerunning into the same --out resumes. Under `accelerate launch -m "
                                    "dit_accel.evals` the prompts are sharded across processes.")
    add_eval_arguments(ev)
    rp = sub.add_parser("report", help="markdown + CSV table and a speed-quality Pareto plot of an eval run",
                        description="Write report.md, report.csv and pareto.png into an eval run folder (the real "
                                    "VBench's scores are included once `dit-accel vbench` has merged them).")
    rp.add_argument("run", help="the run folder (dit-accel eval --out)")
    rp.add_argument("--no-plot", action="store_true", help="skip pareto.png (no matplotlib needed)")
    vb = sub.add_parser("vbench", help="score an eval run's videos with the real VBench (separate environment)",
                        description="Export the run's videos and score them with the vbench package (installed "
                                    "with its weights, in its own environment); writes vbench.jsonl for the report.")
    vb.add_argument("run", help="the run folder (dit-accel eval --out)")
    vb.add_argument("--dimensions", default="subject_consistency,background_consistency,motion_smoothness,"
                    "dynamic_degree,temporal_flickering", help="comma-separated VBench custom-input dimensions")
    vb.add_argument("--format", default="mp4", choices=("mp4", "gif"), help="video files handed to VBench")
    vb.add_argument("--device", default=None)
    vb.add_argument("--full-info", default=None, help="VBench_full_info.json (default: the one in the vbench package)")
    hh = sub.add_parser("headhunt", help="HeadHunter: search the heads whose SoftPAG guidance best serves an objective",
                        description="Greedy search over attention heads (resumable: rerun the same command). Saves a "
                                    "preset JSON for SoftPAG(preset=...) and the UI. Under `accelerate launch -m "
                                    "dit_accel.cli headhunt ...` the candidate heads are sharded across processes.")
    add_headhunt_arguments(hh)
    ui = sub.add_parser("ui", help="the Gradio app on the reference model (or a local pipeline), on localhost",
                        description="Compare speed against quality, tune head guidance and run evals in the browser.")
    ui.add_argument("--pipeline", default="reference", help="'reference' or a local diffusers pipeline directory")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when available)")
    ui.add_argument("--runs", default="runs", help="folder of eval runs")
    args = parser.parse_args(argv)
    if args.command == "ui":
        try:
            from dit_accel.ui.app import launch
        except ImportError as exc:
            print(f"dit-accel ui: needs Gradio ({exc}); pip install 'dit-accel[ui]'", file=sys.stderr)
            return 2
        launch(args.pipeline, host=args.host, port=args.port, device=args.device, runs_dir=args.runs)
        return 0
    if args.command == "headhunt":
        return run_headhunt_command(args)
    if args.command == "info":
        print(info())
    elif args.command == "eval":
        return run_eval_command(args)
    elif args.command == "report":
        return _report_command(args)
    elif args.command == "vbench":
        return _vbench_command(args)
    return 0


def _report_command(args) -> int:
    from dit_accel.evals.report import write_report

    try:
        paths = write_report(args.run, plot=not args.no_plot)
    except FileNotFoundError as exc:
        print(f"dit-accel report: {exc}", file=sys.stderr)
        return 2
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _vbench_command(args) -> int:
    import logging

    from dit_accel.evals.report import write_report
    from dit_accel.evals.vbench import run_vbench

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dims = [d.strip() for d in args.dimensions.split(",") if d.strip()]
    try:
        path = run_vbench(args.run, dims, device=args.device, video_format=args.format, full_info=args.full_info)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"dit-accel vbench: {exc}", file=sys.stderr)
        return 2
    write_report(args.run)
    print(f"wrote {path}; report updated")
    return 0


def add_headhunt_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pipeline", default="reference", help="'reference' or a local diffusers pipeline directory")
    ap.add_argument("--suite", default="shapes-search:16",
                    help="search prompts: shapes-search[:N] (kept apart from the held-out suite), shapes-heldout[:N], "
                         "a .txt or a VBench .json prompt list")
    ap.add_argument("--objective", default="checker",
                    help="checker, sharpness, contrast, colorfulness, clip:PATH, pickscore:PATH or imagereward:PATH")
    ap.add_argument("--rounds", type=int, default=3, help="greedy rounds")
    ap.add_argument("--top-k", type=int, default=1, help="heads added per round")
    ap.add_argument("--strength", type=float, default=1.0, help="SoftPAG u while searching")
    ap.add_argument("--scale", type=float, default=3.0, help="SoftPAG s while searching")
    ap.add_argument("--rows", default="image", choices=("image", "all"))
    ap.add_argument("--layers", default=None, help="comma-separated layers whose heads are candidates (default: all)")
    ap.add_argument("--min-gain", type=float, default=0.0, help="stop when a round improves the objective by less")
    ap.add_argument("--steps", type=int, default=None, help="inference steps (default: the pipeline's)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    ap.add_argument("--num-frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    ap.add_argument("--out", required=True, help="the preset JSON to write")
    ap.add_argument("--cache-dir", default=None,
                    help="per-set scores, for resuming (default: OUT without .json + .search)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_headhunt_command(args) -> int:
    """`dit-accel headhunt`: check the arguments, load the pipeline, search, save the preset."""
    import logging

    from dit_accel.evals.objectives import check_objective
    from dit_accel.evals.runner import load_pipeline, process_device
    from dit_accel.evals.suites import load_suite
    from dit_accel.headhunt import headhunt, perturbable_heads

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    try:
        if out.suffix != ".json":
            raise ValueError(f"--out {args.out}: expected a .json file (the preset)")
        items = load_suite(args.suite)
        check_objective(args.objective)
        layers = None
        if args.layers:
            try:
                layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
            except ValueError:
                raise ValueError(f"--layers {args.layers}: expected comma-separated layer numbers") from None
        kwargs = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance_scale),
                                    ("num_frames", args.num_frames), ("height", args.height), ("width", args.width))
                  if v is not None}
        pipe = load_pipeline(args.pipeline, device=process_device(args.device))
        candidates = None
        if layers is not None:
            available = perturbable_heads(pipe)
            bad = [x for x in layers if x not in available]
            if bad:
                raise ValueError(f"--layers: {bad} have no self or joint attention in this model; layers: "
                                 f"{sorted(available)}")
            candidates = [(x, h) for x in layers for h in range(available[x])]
        cache = args.cache_dir or str(out.with_suffix("")) + ".search"
        result = headhunt(pipe, [it["prompt"] for it in items], [it["seed"] for it in items], objective=args.objective,
                          rounds=args.rounds, top_k=args.top_k, strength=args.strength, scale=args.scale,
                          rows=args.rows, candidates=candidates, cache_dir=cache, output=out,
                          batch_size=args.batch_size, min_gain=args.min_gain, progress=not args.no_progress, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dit-accel headhunt: {exc}", file=sys.stderr)
        return 2
    from dit_accel.evals.runner import _shard

    if _shard()[0] != 0:  # one summary per search, from the main process
        return 0
    print(f"unguided {args.objective}: {result.baseline:.4f}")
    for r in result.rounds:
        best = max(r["scores"].items(), key=lambda kv: kv[1])
        print(f"round {r['round']}: best candidate {best[0]} -> {best[1]:.4f}; added "
              f"{['.'.join(map(str, h)) for h in r['added']] or 'nothing'}")
    print(f"chosen heads {result.preset()['heads']} -> {result.score:.4f} ({result.stopped}); preset: {out}")
    return 0


def add_eval_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pipeline", default="reference", help="'reference' or a local diffusers pipeline directory")
    ap.add_argument("--suite", default="shapes-heldout",
                    help="shapes-heldout[:N], a .txt file (one prompt per line) or a VBench .json prompt list")
    ap.add_argument("--configs", required=True,
                    help="YAML or JSON file: the configurations (see dit_accel.evals.config)")
    ap.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--subject-features", default="classical",
                    help="features of subject consistency: classical, dino:PATH or clip:PATH (local checkpoints)")
    ap.add_argument("--background-features", default="classical",
                    help="features of background consistency: classical, dino:PATH or clip:PATH")


def run_eval_command(args) -> int:
    """`dit-accel eval`: validate everything first, then run; bad input exits 2 with the message."""
    import logging

    from dit_accel.evals.config import ConfigError, load_configs, parse_spec
    from dit_accel.evals.features import check_spec
    from dit_accel.evals.runner import run_eval
    from dit_accel.evals.suites import load_suite

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = parse_spec(load_configs(args.configs))
        load_suite(args.suite, spec.seeds)
        for flag, value in (("--subject-features", args.subject_features),
                            ("--background-features", args.background_features)):
            try:
                check_spec(value)
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from None
    except (ConfigError, ValueError) as exc:
        print(f"dit-accel eval: {exc}", file=sys.stderr)
        return 2
    try:
        path = run_eval(args.pipeline, args.suite, spec, args.out, device=args.device, progress=not args.no_progress,
                        subject_features=args.subject_features, background_features=args.background_features)
    except ConfigError as exc:  # the run folder holds another run: refused before generating
        print(f"dit-accel eval: {exc}", file=sys.stderr)
        return 2
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
