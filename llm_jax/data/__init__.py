"""Text corpora, cleaning, packing and the grain input pipeline."""
