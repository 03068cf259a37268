"""The adapter family: one module per method, one registry (`registry.py`)."""
