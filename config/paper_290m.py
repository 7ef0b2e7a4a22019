# The paper's 290M runs: 12 layers, 16 heads, 1024 wide, GPT-2 BPE on FineWeb-Edu (sample-10BT).
# 16 x 1024 tokens per step across all processes, 8k steps (~131M tokens). Use with any arm:
#   torchrun --standalone --nproc_per_node=8 train.py config/paper_290m.py --arch=ledger --out_dir=out/290m-ledger
# gradient_accumulation_steps is global: 8 processes do 1 micro-step each, 1 process does 8.
# On one GPU, --batch_size=16 --gradient_accumulation_steps=1 takes the same step, faster.
dataset = "fineweb_edu"
n_layer = 12
n_head = 16
n_embd = 1024
block_size = 1024
batch_size = 2
gradient_accumulation_steps = 8
max_iters = 8000
learning_rate = 3e-4
min_lr = 3e-5            # cosine to 0.1x
warmup_iters = 300
weight_decay = 0.1
# The released code's optimizer: torch's AdamW(model.parameters(), lr, weight_decay=0.1), i.e. betas
# (0.9, 0.999), eps 1e-8, decay on every parameter (these are also train.py's defaults)
beta2 = 0.999
decay_norms_and_biases = True
eval_interval = 500
eval_iters = 100
ckpt_interval = 1000     # kept snapshots: measure.py --match_loss picks among them
compile = True
