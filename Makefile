# Quick start: `make demo` then `make test`. Both create .venv and install on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The PyTorch reference for tests/test_convert_taming.py, in a venv of its own (its torch
# pins conflict with the main environment's).
TAMING_VENV := .venv-taming
TAMING_STAMP := $(TAMING_VENV)/.installed
# libtpu, for compiling the training steps for TPU slices on any host (python -m
# vqgan_jax.dry_run --topology ...): a venv whose only own package is libtpu and which
# reads the main environment's packages (a .pth file). Kept out of .venv because libtpu
# logs errors in every JAX program on a host without TPUs.
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed
LIBTPU := libtpu==0.0.42.1

.PHONY: demo test test-fast install taming-reference tpu-tools clean

$(STAMP): requirements.txt requirements-lock.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c requirements-lock.txt
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(TEST_STAMP)

$(TAMING_STAMP): requirements-taming.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -x $(TAMING_VENV)/bin/python || $(PYTHON) -m venv $(TAMING_VENV)
	$(TAMING_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-taming.txt
	touch $(TAMING_STAMP)

taming-reference: $(TAMING_STAMP)

$(TPU_STAMP): $(STAMP)
	test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/vqgan-main-venv.pth', 'w').write(sys.argv[1] + '\n')" "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(TPU_VENV)/bin/python -m pip install --quiet --no-deps $(LIBTPU)
	touch $(TPU_STAMP)

tpu-tools: $(TPU_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vqgan_jax.demo --workdir runs/demo

test: $(TEST_STAMP) $(TAMING_STAMP) $(TPU_STAMP)
	$(PY) -m pytest -q tests

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) $(TAMING_VENV) $(TPU_VENV) runs
