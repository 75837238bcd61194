"""``python -m dit_accel.evals`` (and ``accelerate launch -m dit_accel.evals``): ``dit-accel eval``."""

import argparse
import sys

from dit_accel.cli import add_eval_arguments, run_eval_command

if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m dit_accel.evals", description=__doc__)
    add_eval_arguments(ap)
    sys.exit(run_eval_command(ap.parse_args()))
