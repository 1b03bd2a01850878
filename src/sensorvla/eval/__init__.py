"""Evaluation: offline metrics and reports, closed-loop rollouts, latency, plots and the CNN reference."""
