"""Metrics, suites, runners and reports, installed as `dit_accel.evals` (arrive with the evals issue)."""
