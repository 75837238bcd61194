"""The `dit-accel` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


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
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "eval":
        return run_eval_command(args)
    return 0


def add_eval_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pipeline", default="reference", help="'reference' or a local diffusers pipeline directory")
    ap.add_argument("--suite", default="shapes-heldout",
                    help="shapes-heldout[:N], a .txt file (one prompt per line) or a VBench .json prompt list")
    ap.add_argument("--configs", required=True, help="YAML or JSON file: the configurations (see dit_accel.evals.config)")
    ap.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval_command(args) -> int:
    """`dit-accel eval`: validate everything first, then run; bad input exits 2 with the message."""
    import logging

    from dit_accel.evals.config import ConfigError, load_configs, parse_spec
    from dit_accel.evals.runner import run_eval
    from dit_accel.evals.suites import load_suite

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = parse_spec(load_configs(args.configs))
        load_suite(args.suite, spec.seeds)
    except (ConfigError, ValueError) as exc:
        print(f"dit-accel eval: {exc}", file=sys.stderr)
        return 2
    try:
        path = run_eval(args.pipeline, args.suite, spec, args.out, device=args.device, progress=not args.no_progress)
    except ConfigError as exc:  # the run folder holds another run: refused before generating
        print(f"dit-accel eval: {exc}", file=sys.stderr)
        return 2
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
