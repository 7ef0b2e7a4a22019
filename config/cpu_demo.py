# The CPU demo: char-level Shakespeare, a 4-layer 128-wide model, 4000 steps of 8 x 128 tokens.
#   python train.py config/cpu_demo.py --arch=ledger --out_dir=out/demo/ledger
# At this size a model grows the *precursor* of a massive activation (one fixed dimension ~20x the
# median, on position 0 and on delimiters alike), not the 100-1000x start-token outlier of 100M+
# models. See README.md, "What the CPU demo shows".
dataset = "shakespeare_char"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
gate_rank = 8            # Ledger's extra maps cost ~+11% parameters here, like r=64 at 160M (+7%)
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 4000
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 100
weight_decay = 0.1
# nanoGPT's AdamW, not the released code's (README, "Differences from the released code"): this
# preset was tuned with it, and the released optimizer is one of the lab's explored knobs
beta2 = 0.95
decay_norms_and_biases = False
eval_interval = 250
eval_iters = 20
log_interval = 250
ckpt_interval = 500      # kept snapshots: measure.py --match_loss picks among them
