# Two commands from a fresh machine: `make demo` (a start-token massive activation grown on a CPU,
# and the paper's question asked of it) and `make test`.
PYTHON ?= python3
SEED ?= 1337
# Installed only when torch is missing: the CPU build, not a multi-GB CUDA one.
TORCH ?= torch==2.13.0
DEMO_OUT ?= out/demo-$(SEED)
LAB_OUT ?= out/lab
LAB_ARMS ?= vanilla suppress ledger ledger-hs
# arms trained side by side, one thread each: a tiny model uses one core well
LAB_JOBS ?= 2
LAB_SEEDS ?= 1337 1338 1339
# SGD needs a far larger step than AdamW to learn the task in as many steps, and no weight decay:
# at that step a decay of 0.1 shrinks every weight by 5% per step and the model learns nothing
LAB_SGD_FLAGS ?= --optimizer=sgd --learning_rate=0.5 --min_lr=0.05 --weight_decay=0


.PHONY: install demo demo-text demo-text-all demo-arms lab lab-all lab-runs test bench bench-gpu

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -c "import numpy, tiktoken, matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q -r requirements.txt

# The demo is the laptop lab (below).
demo: lab

# The text demo: prepare char-level Shakespeare, train each arm (a finished or interrupted arm is
# resumed, not redone), then measure all arms at matched validation loss and print the table. At
# this size a model grows only the precursor of a massive activation (README, "The text demo").
# `make demo-text` trains vanilla and ledger (~13 min on 2 cores); `make demo-text-all` adds
# suppress and ledger-hs (~27 min in all), reusing the runs `make demo-text` already finished.
demo-text: install
	@$(MAKE) --no-print-directory demo-arms DEMO_ARMS="vanilla ledger"

demo-text-all: install
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

# The laptop lab: Bigram-Backcopy sequences that open on <bos> (Guo et al. 2024), the four arms of
# the paper trained two at a time into out/lab/<arm>-s<seed>, then measured at matched loss.
# `make lab-all` adds two more seeds and a vanilla run with SGD per seed, reusing finished runs.
lab: install
	@$(MAKE) --no-print-directory lab-runs LAB_RUNS="$(foreach a,$(LAB_ARMS),$(a)-s$(SEED))" \
	  LAB_MEASURE=$(LAB_OUT)/measure-s$(SEED)

lab-all: install
	@$(MAKE) --no-print-directory lab-runs LAB_MEASURE=$(LAB_OUT)/measure-all \
	  LAB_RUNS="$(foreach s,$(LAB_SEEDS),$(foreach a,$(LAB_ARMS) vanilla-sgd,$(a)-s$(s)))"

# LAB_RUNS names run folders <arm>-s<seed>; the arm vanilla-sgd is vanilla trained with SGD, and an
# arm ARCH+KIND (vanilla+gated) is ARCH with that attention kind: the positive controls, e.g.
# make lab LAB_ARMS="vanilla vanilla+attn_bias vanilla+sigmoid vanilla+gated"
lab-runs:
	@start=$$(date +%s); \
	$(PYTHON) prepare_data.py --dataset=bigram_backcopy || exit 1; \
	printf '%s\n' $(LAB_RUNS) | xargs -P $(LAB_JOBS) -I{} sh -c '\
	  run={}; arm=$${run%-s*}; seed=$${run##*-s}; dir=$(LAB_OUT)/$$run; flags=""; \
	  [ $$arm = vanilla-sgd ] && arm=vanilla flags="$(LAB_SGD_FLAGS)"; \
	  case $$arm in *+*) flags="--attention=$${arm#*+}"; arm=$${arm%%+*};; esac; \
	  init=scratch; [ -f $$dir/ckpt.pt ] && init=resume; mkdir -p $$dir; \
	  echo "=== training $$run ($$init) -> $$dir"; \
	  OMP_NUM_THREADS=1 $(PYTHON) train.py config/lab.py --arch=$$arm --seed=$$seed --out_dir=$$dir \
	    --init_from=$$init $$flags > $$dir/train.log 2>&1 \
	    && echo "    $$run: $$(tail -n 1 $$dir/train.log)" || { tail -n 5 $$dir/train.log; exit 255; }' || exit 1; \
	echo "=== measuring at matched loss -> $(LAB_MEASURE)"; \
	$(PYTHON) measure.py $(addprefix $(LAB_OUT)/,$(LAB_RUNS)) --match_loss=auto --num_windows=512 \
	  --batch_size=128 --threads=2 --out_dir=$(LAB_MEASURE) || exit 1; \
	echo "lab done in $$(( $$(date +%s) - start )) s; table in $(LAB_MEASURE)/summary.md, figures beside it"

test: install
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install -q pytest
	$(PYTHON) -m pytest -q tests

# Training-step speed of all six arms side by side, and of vanilla with each other attention kind
# (the positive controls): the demo size on CPU, eager, ~1.5 min on 2 cores.
# Extra settings go in BENCH_ARGS, e.g. BENCH_ARGS="--threads=1" or "--compile=True".
BENCH_ARGS ?=
BENCH_ARMS ?= all,vanilla+attn_bias,vanilla+sigmoid,vanilla+gated
bench: install
	$(PYTHON) bench.py config/cpu_demo.py --arms=$(BENCH_ARMS) --vocab_size=65 --device=cpu --compile=False \
	  --warmup=3 --rounds=7 --steps=8 --out_json=out/bench.json $(BENCH_ARGS)

# One CUDA GPU, < 5 min on an H200 with compilation: the exact-reduction and causality tests on
# CUDA, then the 160M preset's step (bf16, compiled, 24 x 1024 tokens) for vanilla, ledger, suppress.
bench-gpu:
	LEDGER_TEST_DEVICE=cuda $(PYTHON) -m pytest -q tests/test_ledger.py -k "reduces_exactly or never_changes_earlier"
	$(PYTHON) bench.py config/paper_160m.py --arms=vanilla,ledger,suppress --device=cuda --dtype=bfloat16 \
	  --compile=True --batch_size=24 --gradient_accumulation_steps=1 --warmup=3 --rounds=3 --steps=10 \
	  --out_json=out/bench-gpu.json $(BENCH_ARGS)
