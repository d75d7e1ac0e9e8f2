"""Evaluation: perplexity and fidelity to dense attention on real text."""
