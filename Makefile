# Two commands on a fresh machine:
#   make demo   — the main job (creates .venv, installs the package and the real data, runs it)
#   make test   — the test suite in both supported environments (CI runs this):
#                 Python 3.11 + megatron-core 0.16.1 (editable install, the whole suite), then
#                 Python 3.12 + the newest megatron-core 0.19.x (the built wheel installed like a
#                 user's, the suite run from a copy of tests/ outside the source tree)
# torch is pinned by constraints.txt so nothing pulls CUDA wheels on a CPU machine (on 3.12 the
# pinned release is the registry's CUDA build, ≈ 4.7 GB, which runs on the CPU).

PYTHON    ?= python3
VENV      ?= .venv
PIP        = $(VENV)/bin/pip
RUN       ?= runs/demo
# Python 3.12: on PATH, else the newest one pyenv has (its shim alone may refuse to run it)
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do $$p -c 'import sys' >/dev/null 2>&1 && echo $$p && break; done)
VENV312   ?= .venv312
MCORE312  ?= megatron-core~=0.19.0
WHEELDIR  ?= dist

SOURCES   := setup.py pyproject.toml README.md $(shell git ls-files minitron_megatron 2>/dev/null || find minitron_megatron -name '*.py')

.PHONY: demo test test311 test312 lint venv venv312 wheel clean

$(VENV)/.installed: setup.py constraints.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=61"
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $@

venv: $(VENV)/.installed

# The wheel users install (`pip install minitron-megatron`), built from this tree.
$(WHEELDIR)/.built: $(VENV)/.installed $(SOURCES)
	rm -rf $(WHEELDIR) build
	$(VENV)/bin/python -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELDIR) .
	touch $@

wheel: $(WHEELDIR)/.built

$(VENV312)/.base: constraints.txt requirements-data.txt setup.py
	@test -n "$(PYTHON312)" || { echo "make test312: no Python 3.12 found; set PYTHON312=/path/to/python3.12"; exit 2; }
	rm -rf $(VENV312)
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install -q --upgrade pip
	$(VENV312)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV312)/bin/pip install -q --no-deps -r requirements-data.txt
	touch $@

# Dependencies as pip resolves them for the wheel (the newest megatron-core 0.19.x), then the
# wheel itself, reinstalled whenever the sources change.
$(VENV312)/.installed: $(VENV312)/.base $(WHEELDIR)/.built
	$(VENV312)/bin/pip install -q -c constraints.txt "$$(ls $(WHEELDIR)/minitron_megatron-*.whl)[test]" "$(MCORE312)"
	$(VENV312)/bin/pip install -q --no-deps --force-reinstall $(WHEELDIR)/minitron_megatron-*.whl
	touch $@

venv312: $(VENV312)/.installed

demo: venv
	$(VENV)/bin/minitron demo --output-dir $(RUN)

test: test311 test312

test311: venv
	$(VENV)/bin/python -m pytest -q --durations=15

# The installed wheel is what runs: the tests, benchmarks and recipes are copied out of the
# source tree so `import minitron_megatron` finds site-packages (test_wheel.py, which builds the
# wheel from the source tree, is this whole target here); ModelOpt 0.43 (the peer) needs
# megatron-core 0.16, so its side-by-side tests run in the 3.11 environment only.
test312: venv312
	rm -rf $(VENV312)/suite && mkdir -p $(VENV312)/suite
	cp -r tests benchmarks examples launch pyproject.toml README.md $(VENV312)/suite/
	cd $(VENV312)/suite && ../bin/python -c "import minitron_megatron, sys; assert 'site-packages' in minitron_megatron.__file__, minitron_megatron.__file__; from minitron_megatron.runtime.mcore_compat import mcore_version; print('Python', sys.version.split()[0], '| megatron-core', mcore_version(), '| installed wheel')"
	cd $(VENV312)/suite && PATH=$(CURDIR)/$(VENV312)/bin:$$PATH ../bin/python -m pytest -q --durations=15 -m "not modelopt" --ignore=tests/test_wheel.py

lint: venv
	$(VENV)/bin/ruff check minitron_megatron tests benchmarks

clean:
	rm -rf $(VENV) $(VENV312) $(WHEELDIR) build runs
