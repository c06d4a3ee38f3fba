# The two commands of the README. Both bring .venv up to date first (idempotent: seconds when done).
PY := .venv/bin/python

.PHONY: setup demo test test-fast gpu-check
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m analysis.cli.demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

# The fast tier: everything that needs no vLLM server (a few minutes). `make test` runs both tiers.
test-fast: setup
	$(PY) -m pytest -m "not vllm" $(ARGS)

# The GPU acceptance run (a CUDA machine with the README's GPU set-up; without CUDA it says so and exits 0):
# tiny checkpoints of every family, V1 and V2 model runner, served = reference at bf16; last line gpu_check=pass|fail.
gpu-check: setup
	$(PY) -m analysis.cli.gpu_check $(ARGS)
