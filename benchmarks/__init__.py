"""GPU benchmark scripts, installed as `dit_accel.benchmarks`; each prints a table and writes JSON
to `benchmarks/results/`. Run as `python -m dit_accel.benchmarks.<name>` or `python benchmarks/<name>.py`."""
