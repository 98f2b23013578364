# Every target creates .venv if needed and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ARCH := $(shell uname -m)

# The tested torch wheels for each platform (pyproject.toml only states the supported range).
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

# The second pass of `make test`: the CPU-path-sensitive tests (marker cpu_paths) again with
# the capability probe forced down, so the fallbacks this CPU does not take run too. On x86
# the libraries are capped as well (PyTorch's kernels, oneDNN's ISA), as on such a CPU.
ifeq ($(ARCH),x86_64)
FORCED_PATHS := "MINIDALLE_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" \
                "MINIDALLE_CPU=generic ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"
else
FORCED_PATHS := "MINIDALLE_CPU=generic"
endif

.PHONY: venv test test-forced quickstart bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch from the pinned wheels; nothing else may pull another torch.
	$(PIP) install -q $(TORCH_PINS)
	# youtokentome 1.0.6 only builds against Cython 2 and without build isolation.
	$(PIP) install -q "cython<3" setuptools wheel
	$(PIP) install -q --no-build-isolation youtokentome==1.0.6
	# taming-transformers: only its building blocks are used, not its pytorch-lightning models.
	$(PIP) install -q --no-deps taming-transformers==0.0.1
	$(PIP) install -q -e ".[clip,clipscore,webdataset,eval,test]" $(TORCH_PINS)
	for p in $(wildcard plugins/*/pyproject.toml); do $(PIP) install -q --no-deps -e "$$(dirname $$p)"; done
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests $(wildcard plugins/*/tests)
	$(MAKE) --no-print-directory test-forced

test-forced: $(STAMP)
	@for forced in $(FORCED_PATHS); do \
	  echo "== CPU-path tests with $$forced"; \
	  env $$forced $(PY) -m pytest -q -m cpu_paths -p no:cacheprovider tests || exit 1; \
	done

quickstart: $(STAMP)
	$(VENV)/bin/minidalle run configs/quickstart.toml

bench: $(STAMP)
	$(VENV)/bin/minidalle bench configs/l16.toml

clean:
	rm -rf $(VENV) output
