"""Tree-draft generation for Speculative Streaming (see `utils.py`)."""
