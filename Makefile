# The README's two commands: `make demo` and `make test`. Both build what they need and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test install data browser stop clean lock

demo: install data
	$(BIN)/vecaf demo

test: install data browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first, by exact version, so pip takes them from this machine's disk (see README).
$(STAMP): requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; without root, `vecaf data fetch` uses torchvision.
data:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	else \
	  echo "Fashion-MNIST is not at $(FASHION_MNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist' or 'vecaf data fetch'"; \
	fi

# The browser tests (tests/browser) drive Debian's Chromium with Playwright; without root they skip and say why.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium (browser tests)"; \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); \
	else \
	  echo "Chromium is not at $(CHROMIUM): run 'sudo apt-get install chromium' for the browser tests"; \
	fi

stop:
	@if [ -x $(BIN)/vecaf ]; then $(BIN)/vecaf stack down; fi

# Re-resolve the pinned set (run after changing pyproject.toml's dependencies).
lock: $(BIN)/python
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
