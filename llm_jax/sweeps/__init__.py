"""Ablation sweeps: sweep files into runs (plan), run cards (run.json) and result reports."""
