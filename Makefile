# Two commands on a fresh machine: `make demo` (set up, run the embedded demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch (local wheel on this machine). GPU users: install the torch build for
# your CUDA into the venv first (or `make setup TORCH_SPEC=torch`); an importable torch is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo lint test bench soak clean

setup: $(VENV)/.llavadi-installed

$(VENV)/.llavadi-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[plots,logging]"
	touch $@

# what the tests import besides: pytest, hypothesis, peft, deepspeed (DeepSpeed builds its CPU op once,
# into .venv/torch_extensions, on the first DeepSpeed test)
$(VENV)/.llavadi-test-installed: $(VENV)/.llavadi-installed pyproject.toml
	$(PY) -m pip install -q -e ".[test,plots,logging]"
	touch $@

demo: setup
	$(VENV)/bin/llavadi demo --out $(DEMO_OUT)

# ruff: pyflakes, import order and bugbear on the code, the tests and the benchmarks ([tool.ruff] in pyproject.toml)
$(VENV)/.llavadi-lint-installed: $(VENV)/.llavadi-installed pyproject.toml
	$(PY) -m pip install -q -e ".[lint]"
	touch $@

lint: setup $(VENV)/.llavadi-lint-installed
	$(VENV)/bin/ruff check llavadi tests benchmarks

test: setup $(VENV)/.llavadi-test-installed
	$(PY) -m pytest -q -p no:cacheprovider tests

# what the benchmarks import besides: trl (benchmarks/kd_loss.py compares with TRL's loss functions)
$(VENV)/.llavadi-bench-installed: $(VENV)/.llavadi-installed pyproject.toml
	$(PY) -m pip install -q -e ".[bench,plots,logging]"
	touch $@

bench: setup $(VENV)/.llavadi-bench-installed
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/image_check.py
	$(PY) benchmarks/kd_loss.py --plain
	$(PY) benchmarks/kd_step.py
	$(PY) benchmarks/scale_estimate.py

# not part of `make test` (tens of minutes): 2-process DDP and ZeRO-2 runs SIGKILLed at random moments,
# restarted, and compared bit for bit with an uninterrupted run (tests/reliability/soak.py, docs/reliability.md)
soak: setup $(VENV)/.llavadi-test-installed
	$(PY) tests/reliability/soak.py --kills 10

clean:
	rm -rf $(VENV) runs
