# The two commands of the README. Both bring .venv up to date first (idempotent: seconds when done).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m analysis.demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)
