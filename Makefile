# One venv per checkout. `make test` and `make demo` install what they need first (CI machines start bare).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install test demo

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	# the CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,data,augment,peft,captioning]"
	# test oracle only: open_clip's loss.py needs torch alone, its torchvision dependency breaks beside CPU torch
	$(PIP) install --no-deps open_clip_torch
	# transformers' shared model tests (tests/test_transformers_conformance.py): the installed version's source
	# distribution, from the package registry, unpacked into ~/.cache/hf_siglip (the tests fetch it themselves too)
	$(PY) tests/upstream_tests.py || echo "warning: transformers' tests unavailable; the conformance tests will skip"
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto

demo: install
	$(VENV)/bin/hf-siglip train
