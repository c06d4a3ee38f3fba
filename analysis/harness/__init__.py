"""Test and benchmark harness: vLLM server processes and tiny checkpoints."""
