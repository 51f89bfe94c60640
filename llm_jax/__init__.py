"""llm_jax: decoder-only Transformer language models in JAX/Flax, from raw text to generated text."""

__version__ = "0.1.0"
