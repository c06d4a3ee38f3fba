"""Accuracy of a served model on streaming-video benchmarks, through the server's stream routes.

* :mod:`analysis.eval.formats`  — the benchmarks' question files (StreamingBench, OVO-Bench) → :class:`Question`
* :mod:`analysis.eval.conventions` — each benchmark's prompts, answer parsing and scoring
* :mod:`analysis.eval.runner`  — plays each video into a stream up to each question's time and asks
* :mod:`analysis.eval.evaluate` — a run: videos × modes over a server, resumable
* :mod:`analysis.eval.results` — the resumable store, per-task summaries, OVO-Bench's aggregate, the HTML report
* :mod:`analysis.eval.inspect` — what one question saw (frames, keep mask)
* :mod:`analysis.eval.demo` — a small question set on the bundled clips

``python -m analysis.eval_stream`` is the command line; notebook 04 calls the same functions.
"""
