# The laptop lab: a start-token massive activation grown on 2 CPU cores, on Guo et al.'s (2024)
# synthetic Bigram-Backcopy task (prepare_data.py --dataset=bigram_backcopy). Every window opens
# on <bos> (align_windows resolves to True for this dataset). Use with any arm:
#   python train.py config/lab.py --arch=ledger --out_dir=out/lab/ledger
# See README.md, "The laptop lab", for what it shows and how the setting was chosen.
dataset = "bigram_backcopy"
n_layer = 3
n_head = 1
n_embd = 128
block_size = 64          # <bos> + 63 tokens in, the sequence's 64 tokens out
gate_rank = 8            # Ledger's extra maps, as in the CPU demo
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 3000
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 100
weight_decay = 0.0       # decay caps the start token's growing norm
eval_interval = 250
eval_iters = 10
log_interval = 250
ckpt_interval = 250      # kept snapshots: measure.py --match_loss picks among them
