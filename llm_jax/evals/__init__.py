"""Evaluation: whole-document loss, perplexity and bits per byte, and zero-shot multiple-choice scoring."""
