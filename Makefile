# Two entry points for a newcomer; each sets up .venv on first use (offline-capable:
# torch 2.13.0 installs from the machine's local CPU wheel, the rest from the package index).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint bench-encoder clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Main job (offline, ~4 min on 2 cores): FastViTHD latency, released inference form vs our
# fused form (256/512/1024 px); then TTFT of a FastVLM-0.5B-sized model (256..1024 px).
demo: $(VENV)/.installed
	$(PY) benchmarks/encoder_latency.py --json results/encoder_latency.json
	$(PY) benchmarks/ttft.py --json results/ttft.json

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fastvlm tests benchmarks
	$(VENV)/bin/ruff format --check fastvlm tests benchmarks

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache
