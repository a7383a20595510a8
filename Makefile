# Two commands do everything on a fresh machine: `make train` and `make test`.
# TORCH pins PyTorch and torchvision (timm, a test dependency, needs torchvision). 2.14.1 + 0.29.1 is the newest
# pair whose torchvision imports on the CI machines (PyPI's torchvision cannot load beside the 2.13.0 CPU-only
# wheel there); it runs on CPU as well as on GPUs. Override for your platform, e.g. TORCH="torch torchvision".
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install train test lint typecheck gpu-check gpu-check-system clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-installs when pyproject.toml changes (the editable install picks up new modules by itself).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/aimpre train $(ARGS)

# The tests run in parallel processes (pytest-xdist), one per core up to 4: the suite is mostly single-threaded
# CPU work, and CI has 2 cores. PYTEST_ARGS="-n 0" runs them in one process.
PYTEST_ARGS ?= -n auto --maxprocesses 4
test: install lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: install typecheck
	$(BIN)/ruff check aimpre kernels scaling tests
	$(BIN)/ruff format --check aimpre kernels scaling tests

# mypy knows nothing of setuptools' package-dir, so it checks a link view of the installed layout
# (aimpre/ with kernels/ and scaling/ linked in as aimpre/kernels and aimpre/scaling).
typecheck: install
	@rm -rf build/typecheck && mkdir -p build/typecheck/aimpre
	@for f in aimpre/*; do ln -s "$(CURDIR)/$$f" build/typecheck/aimpre/; done
	@ln -s "$(CURDIR)/kernels" build/typecheck/aimpre/kernels
	@ln -s "$(CURDIR)/scaling" build/typecheck/aimpre/scaling
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml --cache-dir ../../.mypy_cache -p aimpre

# The device check (issue 11; docs/benchmarks.md): the GPU tests, then bench attention, ops, step and fp8, into one
# report, gpu-check.md (meant to take under 8 minutes on one H100/H200). E.g. ARGS="--steps tests attention".
gpu-check: install
	$(BIN)/aimpre bench gpu --out gpu-check.md $(ARGS)

# The same on a machine whose system python already has a CUDA torch + triton and no internet (a device machine):
# wheels of what it lacks (webdataset + braceexpand; liger-kernel, torchao; pytest if absent) go in .whl/ (ignored)
# and are installed without an index or their dependencies into build/site; a link view of the package (as for
# typecheck) and build/site go on PYTHONPATH, and -P keeps the checkout's own aimpre/ (which has no kernels/ or
# scaling/ inside) off sys.path; the steps inherit both. PYTHON picks the interpreter.
gpu-check-system:
	@rm -rf build/gpucheck build/site && mkdir -p build/gpucheck/aimpre build/site
	@for f in aimpre/*; do ln -s "$(CURDIR)/$$f" build/gpucheck/aimpre/; done
	@ln -s "$(CURDIR)/kernels" build/gpucheck/aimpre/kernels
	@ln -s "$(CURDIR)/scaling" build/gpucheck/aimpre/scaling
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(PYTHON) -m pip install -q --no-index --no-deps --target build/site .whl/*.whl; fi
	PYTHONPATH="$(CURDIR)/build/gpucheck:$(CURDIR)/build/site$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(PYTHON) -P -m aimpre bench gpu --out gpu-check.md $(ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache *.egg-info
