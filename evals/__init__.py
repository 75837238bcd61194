"""Metrics, suites, runners and reports, installed as `dit_accel.evals` (issue #5)."""
