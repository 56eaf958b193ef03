# Two commands do their own set-up on a fresh machine: `make demo` and `make test`.
# They create a virtual environment in $(VENV), reusing a torch already installed on the system
# (CI installs torch==2.13.0 first), else installing $(TORCH). `make demo` installs bn_gpu alone;
# `make test` adds the test, bench, cuda-compile and examples extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# pytest-xdist workers for `make test`: CI's machines have 2 cores. --dist loadgroup hands tests out
# one by one, except each xdist_group (the nvcc and Triton AOT compile modules), which one worker runs,
# so their module fixtures start once.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast bench smoke model clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -e ".[test,bench,cuda-compile,examples]"
	touch $@

demo: $(VENV)/.base
	$(PY) -m bn_gpu demo

# -rs: one line per reason a test was skipped (GPU tests on a machine without a GPU, ...)
test: $(VENV)/.installed
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup tests

# The suite without the tests marked slow (the compiles, the multi-process and end-to-end runs, the
# costlier interpreter cases): what to run between edits, about 4 minutes on 2 cores. CI runs `make test`.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) -m bn_gpu bench

# The static model of every launch on an H200 (no GPU needed): profiling/MODEL.md and profiling/results/.
model: $(VENV)/.installed
	$(PY) -m bn_gpu model --write-model-md profiling/MODEL.md

smoke: $(VENV)/.installed
	$(PY) -m bn_gpu bench --smoke

clean:
	rm -rf $(VENV) build *.egg-info
