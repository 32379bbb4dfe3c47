"""Patched modules of Hugging Face `transformers`, laid out like upstream."""
