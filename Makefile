# fsinfo_fast: `make demo` runs the main job, `make test` the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsinfo-fast-installed
# The CPU build of torch is pinned here (and only here): package metadata keeps a range so GPU
# machines can use the torch they already have.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1
# installed with --no-deps: its backpack-for-pytorch dependency needs torchvision, whose wheel would
# replace the pinned CPU torch (its other dependencies are in the dev extra)
CURVLINOPS_PIN ?= curvlinops-for-pytorch==3.0.1

.PHONY: venv test test-fast demo bench bench-quick bench-compare lint format clean info gpu-check

venv: $(STAMP)

# csrc/ is listed so that editing the C++/CUDA sources rebuilds fsinfo_fast._C.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(PY) -m pip install -q --no-build-isolation -e ".[all,dev]" "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(PY) -m pip install -q --no-deps "$(CURVLINOPS_PIN)"
	@# the pinned torch is still there, torchvision never came in, curvlinops imports without backpack
	$(PY) -c 'import importlib.util as u, sys, torch; \
	  want = "$(TORCH_PIN)".split("==")[-1]; \
	  sys.exit(f"torch {torch.__version__} is not the pinned {want}" \
	           if torch.__version__.split("+")[0] != want.split("+")[0] else \
	           "torchvision was installed (it replaces the pinned torch)" \
	           if u.find_spec("torchvision") else None)'
	$(PY) -c 'from curvlinops import hutchinson_diag, xdiag'
	@touch $(STAMP)

test: venv
	$(PY) -m pytest -q --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

demo: venv
	$(VENV)/bin/fsinfo-fast profile

bench: venv
	$(PY) -m pytest benchmarks --benchmark-only -q

# The side-by-side runner (JSON, CSV, plots under benchmarks/results/).
bench-quick: venv
	$(PY) -m fsinfo_fast.bench --quick --threads 2 --out benchmarks/results/

bench-compare: venv
	$(PY) -m fsinfo_fast.bench --quick --threads 2 --out /tmp/fsinfo-bench-new/ \
	  --compare benchmarks/results/bench_quick.json --fail-if-regression

# On a machine with a CUDA GPU and its own torch (no venv): build the CUDA extension, run the GPU
# tests and the GPU benchmark (scripts/gpu_check.sh, about 7 minutes on an H200 without
# the torch.compile rows).
gpu-check:
	bash scripts/gpu_check.sh

info: venv
	$(VENV)/bin/fsinfo-fast info

lint: venv
	$(VENV)/bin/ruff check fsinfo_fast tests benchmarks examples

format: venv
	$(VENV)/bin/ruff format fsinfo_fast tests benchmarks examples

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
