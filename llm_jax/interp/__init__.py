"""Looking inside a model: per-token losses, attention maps and the logit lens (computed, drawn, written as HTML)."""
