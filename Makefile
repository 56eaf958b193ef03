# Two commands do their own set-up on a fresh machine: `make demo` and `make test`.
# They create a virtual environment in $(VENV), reusing a torch already installed on the system
# (CI installs the CPU build first), else installing $(TORCH).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test bench smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[test,bench,cuda-compile]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m bn_gpu demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m pip install -e ".[bench]"
	$(PY) -m bn_gpu bench

smoke: $(VENV)/.installed
	$(PY) -m bn_gpu bench --smoke

clean:
	rm -rf $(VENV) build *.egg-info
