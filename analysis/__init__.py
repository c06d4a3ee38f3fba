"""The research workbench.

* :mod:`analysis.lib` — the library the notebooks and tools import (videos, tokens, sweeps, the
  reference pipeline, figures, offline reports);
* :mod:`analysis.cli` — command-line tools (``python -m analysis.cli.<tool>``): demo, sweep, bench,
  bench_stream, load, stream_example; they import the library and the harness, never each other;
* :mod:`analysis.harness` — what tests and benchmarks run against: a vLLM server process
  (:mod:`analysis.harness.server`) and tiny random-weight checkpoints (:mod:`analysis.harness.tiny_model`).
"""
