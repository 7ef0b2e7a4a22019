# The paper's 160M runs: 12 layers, 12 heads, 768 wide, GPT-2 BPE on FineWeb-Edu (sample-10BT).
# 24 x 1024 tokens per step across all processes, 14k steps (~344M tokens). Use with any arm:
#   python prepare_data.py --dataset=fineweb_edu --max_tokens=400000000
#   torchrun --standalone --nproc_per_node=8 train.py config/paper_160m.py --arch=ledger --out_dir=out/160m-ledger
# gradient_accumulation_steps is global: 8 processes do 1 micro-step each, 1 process does 8.
# On one GPU, --batch_size=24 --gradient_accumulation_steps=1 takes the same step, faster.
dataset = "fineweb_edu"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 3
gradient_accumulation_steps = 8
max_iters = 14000
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
