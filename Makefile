# Every target creates .venv if needed and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test quickstart bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch from the pinned wheels; nothing else may pull another torch.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# youtokentome 1.0.6 only builds against Cython 2 and without build isolation.
	$(PIP) install -q "cython<3" setuptools wheel
	$(PIP) install -q --no-build-isolation youtokentome==1.0.6
	# taming-transformers: only its building blocks are used, not its pytorch-lightning models.
	$(PIP) install -q --no-deps taming-transformers==0.0.1
	$(PIP) install -q -e ".[clip,webdataset,test]"
	for p in $(wildcard plugins/*/pyproject.toml); do $(PIP) install -q --no-deps -e "$$(dirname $$p)"; done
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests $(wildcard plugins/*/tests)

quickstart: $(STAMP)
	$(VENV)/bin/minidalle run configs/quickstart.toml

bench: $(STAMP)
	$(VENV)/bin/minidalle bench configs/l16.toml

clean:
	rm -rf $(VENV) output
