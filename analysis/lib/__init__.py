"""The workbench library: what notebooks and tools import."""
