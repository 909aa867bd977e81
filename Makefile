# Two entry points for a newcomer; each sets up .venv on first use (offline-capable:
# torch 2.13.0 installs from the machine's local CPU wheel, the rest from the package index).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-browser test-js test-vllm lint typecheck bench-encoder clean

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

# The browser lane (tests marked `browser`) runs apart, in test-browser: it needs a system Chromium;
# the Transformers.js lane (tests marked `js`) in test-js: it needs Node.js and the npm registry.
test: lint typecheck
	$(PY) -m pytest -q -m "not browser and not js" --ignore=tests/integrations/vllm

# The server's web page in headless Chromium, driven by Playwright (tests/serve/test_page.py).
# Playwright cannot download its browser here: it uses the system one (`apt-get install -y chromium`,
# or FASTVLM_CHROMIUM=/path/to/chromium); without it the tests fail and say so.
test-browser: $(VENV)/.installed
	$(PY) -m pytest -q -m browser tests/serve

# The Transformers.js lane: `fastvlm export onnx` folders loaded by @huggingface/transformers in
# Node (onnxruntime-node, CPU) as its docs show; greedy tokens against FastVLM.generate in fp32
# (tests/export/test_transformersjs.py). npm installs the pinned package from package-lock.json;
# ONNXRUNTIME_NODE_INSTALL=skip: the CPU binaries ship in the npm package, only the optional CUDA
# ones would be fetched (from NuGet).
JS_DIR := tests/export/js

$(JS_DIR)/node_modules/.installed: $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	cd $(JS_DIR) && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	touch $@

test-js: $(VENV)/.installed $(JS_DIR)/node_modules/.installed
	$(PY) -m pytest -q -m js tests/export

# The vLLM lane: our plugin inside vLLM's CPU build, in its own environment (.venv-vllm, built by
# integrations/vllm_env.sh: vLLM pins its own transformers). Greedy tokens against FastVLM.generate,
# the OpenAI server, tensor parallelism, `fastvlm eval/serve --engine vllm` (tests/integrations/vllm).
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/.installed: pyproject.toml integrations/vllm_env.sh
	VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash integrations/vllm_env.sh
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q tests/integrations/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(JS_DIR)/node_modules results .pytest_cache test-artifacts
