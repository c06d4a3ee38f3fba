"""Command-line tools: ``python -m analysis.cli.<name>``."""
