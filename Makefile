# The two commands of the README:  `make demo`  and  `make test`.
# Both create the virtual environment on first use; torch is pinned to the CPU wheel
# (never let pip resolve an unpinned torch: it would download several GB of CUDA).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-random venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m eenn demo

test: $(STAMP)
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
		echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; fi
	$(PY) -m pytest -q -p no:randomly

# The same suite in a random order (pytest-randomly): the seed is printed at the top of the run;
# repeat an order with  SEED=<n> make test-random
test-random: $(STAMP)
	$(PY) -m pytest -q $(if $(SEED),--randomly-seed=$(SEED),)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
