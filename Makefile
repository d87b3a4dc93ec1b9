# The README's commands. On a fresh machine `make demo` / `make test` create a virtual environment (unless one
# is already active), install torch if it is not importable, then install reasonrl in editable mode with its
# compiled extension and its test / benchmark / parity dependencies at the exact versions of
# requirements/lock.txt, and run the job.
#   TORCH_SPEC   pip requirement used when torch is missing (default torch==2.13.0: a CPU build on this
#                machine class's local disk; set e.g. TORCH_SPEC="torch --index-url ..." elsewhere)
#   PYTEST_ARGS  extra pytest arguments for `make test`
#   LOCK         constraints file (default requirements/lock.txt); `make test-latest` empties it
#   VENV         the environment to create (default .venv; `make test-latest` uses .venv-latest)
# Installs go through uv (seconds instead of minutes) and fall back to pip when uv cannot be installed.
SHELL := /bin/bash
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
LOCK ?= requirements/lock.txt
UV_SPEC ?= uv==0.13.9
VENV ?= .venv

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
endif
PY := $(abspath $(VENV))/bin/python
STAMP := $(abspath $(VENV))/.reasonrl
EXTRAS := .[test,bench,trl]
# The lock, plus the torch already installed (never replaced: uv / pip would otherwise be free to swap the
# local CPU build for another one while resolving torch>=2.6).
CONSTRAINTS := $(if $(LOCK),-c $(abspath $(LOCK))) -c $(STAMP)-torch.txt

.PHONY: demo test bench setup test-latest lock clean check-sm90

demo: $(STAMP)-setup
	$(PY) -m reasonrl.cli demo --out-dir bench/results

test: $(STAMP)-setup $(STAMP)-parity
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)-setup
	$(PY) -m reasonrl.cli bench --profile full --out-dir bench/results

setup: $(STAMP)-setup

# Every Triton kernel specialisation the launch helpers produce at realistic shapes, compiled ahead of time
# for Hopper (sm_90a) with Triton's bundled ptxas, no GPU needed: no spills, 16-byte loads in the streaming
# kernels, pipelined cp.async + wgmma in the 16-bit GEMMs (docs/gpu-kernels.md). The test suite runs a subset
# (tests/kernels/test_sm90_compile.py). SM90_ARGS adds options, e.g. SM90_ARGS="--arch 90 --arch 80 --arch 100".
SM90_ARGS ?=
check-sm90: $(STAMP)-setup
	@mkdir -p bench/results
	$(PY) -m reasonrl.bench.sm90_report --subset full --markdown bench/results/sm90_report.md $(SM90_ARGS)

# The suite against the newest releases of every dependency (no lock), in its own environment.
test-latest:
	$(MAKE) test VENV=.venv-latest LOCK=

# Refresh the lock from the environment `make test-latest` validated (torch stays unpinned: TORCH_SPEC).
lock:
	@test -x .venv-latest/bin/python || { echo "run make test-latest first"; exit 1; }
	@{ sed -n '1,/^# Regenerate/p' requirements/lock.txt; \
	  .venv-latest/bin/python -m pip freeze --exclude-editable --all | grep -viE '^(torch|reasonrl)=='; \
	} > requirements/lock.txt.new && mv requirements/lock.txt.new requirements/lock.txt
	@echo "requirements/lock.txt updated: review the diff, run make test, commit"

# `install` is uv when it could be installed, pip otherwise; both read the same constraints.
define INSTALL
if $(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q $(UV_SPEC) >/dev/null 2>&1; then \
  $(PY) -m uv pip install -q --python $(PY) $(CONSTRAINTS) $(1); \
else $(PY) -m pip install -q $(CONSTRAINTS) $(1); fi
endef

# Re-run the install whenever the build inputs or the lock change.
$(STAMP)-setup: pyproject.toml setup.py $(LOCK) $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*/*.cpp)
	@if [ ! -x $(PY) ]; then python3 -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(STAMP)-torch.txt
	@$(call INSTALL,pip setuptools wheel ninja pybind11 numpy)
	$(call INSTALL,--no-build-isolation -e "$(EXTRAS)")
	@touch $@

# Parity tests compare the losses and advantages with verl's own core_algos. verl is installed without its
# dependencies (it pins versions that would replace torch and transformers), plus the few modules its
# core_algos import needs. If this step cannot run, those tests skip with the reason.
$(STAMP)-parity: $(STAMP)-setup
	@{ $(call INSTALL,--no-deps "verl==0.9.1") && \
	  $(call INSTALL,omegaconf codetiming "tensordict==0.8.3" ray); } || \
	  echo "reasonrl: verl parity dependencies unavailable; those tests will be skipped"
	@touch $@

clean:
	rm -rf build reasonrl/_C*.so *.egg-info .setup-done .parity-done
