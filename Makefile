# Two entry points for a newcomer; each sets up .venv on first use (offline-capable:
# torch 2.13.0 installs from the machine's local CPU wheel, the rest from the package index).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-browser lint typecheck bench-encoder clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Main job (offline, under 5 minutes on 2 cores): the paper's efficiency study, quick set —
# FastViTHD vs ViT-L/14 vs ConvNeXt-L at 256/512/1024 px with Qwen2-0.5B prefill: tables,
# results.json and plots in results/bench.
demo: $(VENV)/.installed
	$(VENV)/bin/fastvlm bench --quick --out results/bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fastvlm tests benchmarks
	$(VENV)/bin/ruff format --check fastvlm tests benchmarks

# Static types of the package (settings in pyproject.toml's [tool.mypy]).
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# The browser lane (tests marked `browser`) runs apart, in test-browser: it needs a system Chromium.
test: lint typecheck
	$(PY) -m pytest -q -m "not browser"

# The server's web page in headless Chromium, driven by Playwright (tests/serve/test_page.py).
# Playwright cannot download its browser here: it uses the system one (`apt-get install -y chromium`,
# or FASTVLM_CHROMIUM=/path/to/chromium); without it the tests fail and say so.
test-browser: $(VENV)/.installed
	$(PY) -m pytest -q -m browser tests/serve

clean:
	rm -rf $(VENV) results .pytest_cache test-artifacts
