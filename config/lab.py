# The laptop lab: a start-token massive activation grown on 2 CPU cores, on Guo et al.'s (2024)
# synthetic Bigram-Backcopy task (ledgerlab/bigram_backcopy.py, written by prepare_data.py
# --dataset=bigram_backcopy). Every window opens on <bos> (align_windows resolves to True for this
# dataset), with one trigger token (prepare_data's default --bb_triggers=1: 3 grew a weaker,
# seed-dependent outlier; docs/lab.md). Use with any arm:
#   python train.py config/lab.py --arch=ledger --out_dir=out/lab/ledger
# docs/lab.md says what it shows and lists every setting tried to find this one.
dataset = "bigram_backcopy"
n_layer = 3
n_head = 1               # one head per layer: dormant except after a trigger, so it parks on <bos>
n_embd = 128
block_size = 16          # <bos> + 15 tokens in; short windows grew the outlier fastest (16 > 32 > 64)
gate_rank = 8            # Ledger's extra maps, as in the text demo
batch_size = 128         # small batches (32) grew it far more slowly per step
gradient_accumulation_steps = 1
max_iters = 2000
learning_rate = 1e-2     # 6e-3 grew it more slowly, 2e-2 grew every token's norm instead
min_lr = 1e-3
warmup_iters = 100
weight_decay = 0.1       # without decay other tokens grow large too and the outlier is less specific
# nanoGPT's AdamW, not the released code's (README, "Differences from the released code"): this
# preset was tuned with it, and the released optimizer is one of the lab's explored knobs
beta2 = 0.95
decay_norms_and_biases = False
eval_interval = 250
eval_iters = 10
log_interval = 50       # a progress line and a log.jsonl record: what lab.py's status shows
ckpt_interval = 250      # kept snapshots: measure.py --match_loss picks among them
