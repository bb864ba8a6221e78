# Quick start: `make demo` runs the streaming in-situ learning demo, `make test` runs the tests.
# Both create the virtual environment on first use. Installing never replaces an importable torch
# (a Jetson's JetPack wheel): the venv then sees the system packages and pins that torch.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel these development machines keep on disk; override on other machines.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= torch,edge,test,plot,aedat,nir,snntorch,fleet

.PHONY: demo test test-slow bench bench-peers bench-step bench-onnx-learn install clean

$(VENV)/.installed: pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then \
	    echo "using the system torch: venv with --system-site-packages"; \
	    python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt; \
	else \
	  $(PY) -m pip install --quiet "$(TORCH_SPEC)" && \
	  $(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt; \
	fi
	$(PY) -m pip install --quiet -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/stoprt demo --json runs/demo.json

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# Real processes in real time (a SuperLink, three SuperNodes and their streams): minutes, not seconds.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) examples/benchmarks/core_bench.py --out runs/bench

bench-peers: $(VENV)/.installed
	$(PY) examples/benchmarks/peers/run.py --out docs/results

# Per-step time of STOP (eager, static) against the plain-torch floor, 1 CPU thread; add
# STEP_ARGS="--device cuda" on a GPU. Results in docs/results/step/<machine>/.
bench-step: $(VENV)/.installed
	$(PY) examples/benchmarks/step_bench.py $(STEP_ARGS)

bench-onnx-learn: $(VENV)/.installed
	$(PY) examples/benchmarks/onnx_learn_bench.py $(ONNX_LEARN_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
