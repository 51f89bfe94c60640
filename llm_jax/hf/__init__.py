"""Hugging Face interop: tensor name/layout mapping, HF directories in and out, and HF tokenizer.json files."""
