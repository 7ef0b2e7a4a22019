# Two commands from a fresh machine: `make demo` (the paper's effect on a CPU) and `make test`.
PYTHON ?= python3
SEED ?= 1337
# Installed only when torch is missing: the CPU build, not a multi-GB CUDA one.
TORCH ?= torch==2.13.0
DEMO_OUT ?= out/demo-$(SEED)


.PHONY: install demo demo-all demo-arms test bench bench-gpu

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -c "import numpy, tiktoken, matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q -r requirements.txt

# Prepare char-level Shakespeare, train each arm (a finished or interrupted arm is resumed, not
# redone), then measure all arms at matched validation loss and print the comparison table.
# `make demo` trains vanilla and ledger (~13 min on 2 cores); `make demo-all` adds suppress and
# ledger-hs (~27 min in all), reusing the runs `make demo` already finished.
demo: install
	@$(MAKE) --no-print-directory demo-arms DEMO_ARMS="vanilla ledger"

demo-all: install
	@$(MAKE) --no-print-directory demo-arms DEMO_ARMS="vanilla suppress ledger ledger-hs"

demo-arms:
	@start=$$(date +%s); \
	$(PYTHON) prepare_data.py --dataset=shakespeare --tokenizer=char || exit 1; \
	for arm in $(DEMO_ARMS); do \
	  init=scratch; [ -f $(DEMO_OUT)/$$arm/ckpt.pt ] && init=resume; \
	  echo "=== training $$arm ($$init) -> $(DEMO_OUT)/$$arm"; \
	  $(PYTHON) train.py config/cpu_demo.py --arch=$$arm --seed=$(SEED) --out_dir=$(DEMO_OUT)/$$arm --init_from=$$init || exit 1; \
	done; \
	echo "=== measuring at matched loss -> $(DEMO_OUT)"; \
	$(PYTHON) measure.py $(addprefix $(DEMO_OUT)/,$(DEMO_ARMS)) --match_loss=auto --out_dir=$(DEMO_OUT) || exit 1; \
	echo "demo done in $$(( $$(date +%s) - start )) s; table in $(DEMO_OUT)/summary.md, figures in $(DEMO_OUT)/<arm>/"

test: install
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install -q pytest
	$(PYTHON) -m pytest -q tests

# Training-step speed of all six arms side by side: the demo size on CPU, eager, ~1 min on 2 cores.
# Extra settings go in BENCH_ARGS, e.g. BENCH_ARGS="--threads=1" or "--compile=True".
BENCH_ARGS ?=
bench: install
	$(PYTHON) bench.py config/cpu_demo.py --arms=all --vocab_size=65 --device=cpu --compile=False \
	  --warmup=3 --rounds=7 --steps=8 --out_json=out/bench.json $(BENCH_ARGS)

# One CUDA GPU, < 5 min on an H200 with compilation: the exact-reduction and causality tests on
# CUDA, then the 160M preset's step (bf16, compiled, 24 x 1024 tokens) for vanilla, ledger, suppress.
bench-gpu:
	LEDGER_TEST_DEVICE=cuda $(PYTHON) -m pytest -q tests/test_ledger.py -k "reduces_exactly or never_changes_earlier"
	$(PYTHON) bench.py config/paper_160m.py --arms=vanilla,ledger,suppress --device=cuda --dtype=bfloat16 \
	  --compile=True --batch_size=24 --gradient_accumulation_steps=1 --warmup=3 --rounds=3 --steps=10 \
	  --out_json=out/bench-gpu.json $(BENCH_ARGS)
