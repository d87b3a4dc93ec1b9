# The README's commands. On a fresh machine `make demo` / `make test` create .venv (unless a virtual
# environment is already active), install torch if it is not importable, install reasonrl in editable mode
# with its compiled extension, then run the job.
#   TORCH_SPEC   pip requirement used when torch is missing (default torch==2.13.0: a CPU build on this
#                machine class's local disk; set e.g. TORCH_SPEC="torch --index-url ..." elsewhere)
#   PYTEST_ARGS  extra pytest arguments for `make test`
SHELL := /bin/bash
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(CURDIR)/.venv/bin/python
endif

.PHONY: demo test bench setup clean

demo: .setup-done
	$(PY) -m reasonrl.cli demo --out-dir bench/results

test: .setup-done .parity-done
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: .setup-done
	$(PY) -m reasonrl.cli bench --profile full

setup: .setup-done

# Re-run the install whenever the build inputs change.
.setup-done: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*/*.cpp csrc/*/*.cu)
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q ninja pybind11 numpy
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,trl]"
	@touch $@

# Parity tests compare the losses and advantages with verl's own core_algos. verl is installed without its
# dependencies (it pins versions that would replace torch and transformers), plus the few modules its
# core_algos import needs; pip's note about verl's other unmet pins is expected. If this step cannot run,
# those tests skip with the reason.
.parity-done: .setup-done
	$(PY) -m pip install -q --no-deps "verl==0.9.1" && \
	  $(PY) -m pip install -q omegaconf codetiming "tensordict==0.8.3" ray || \
	  echo "reasonrl: verl parity dependencies unavailable; those tests will be skipped"
	@touch $@

clean:
	rm -rf build .setup-done .parity-done reasonrl/_C*.so *.egg-info
