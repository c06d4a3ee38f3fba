# The two commands of the README. Both bring .venv up to date first (idempotent: seconds when done).
PY := .venv/bin/python

.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m analysis.cli.demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

# The fast tier: everything that needs no vLLM server (a few minutes). `make test` runs both tiers.
test-fast: setup
	$(PY) -m pytest -m "not vllm" $(ARGS)
