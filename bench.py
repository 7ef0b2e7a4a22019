"""
The training step of every arm, timed side by side in one process (nanoGPT's bench.py, for the arms).

    python bench.py config/cpu_demo.py --arms=all,vanilla+attn_bias,vanilla+sigmoid,vanilla+gated \\
        --vocab_size=65                                               # as `make bench`: CPU, eager, ~1 min
    python bench.py config/paper_160m.py --arms=vanilla,ledger --batch_size=24 \\
        --gradient_accumulation_steps=1                               # as `make bench-gpu`: bf16, compiled
    python bench.py --help                                            # every setting

An arm is ARCH (ledger.ARCHS) or ARCH+ATTENTION (ledger.ATTENTIONS): vanilla+sigmoid is vanilla
with sigmoid attention, one of the positive controls; a bare ARCH runs with --attention (softmax by
default), and vanilla with that kind is the baseline of every ratio. Each arm takes train.py's step,
written out below as nanoGPT's bench.py writes its own (the forward with the commit-sparsity term,
backward, clip, AdamW; tests/test_bench.py holds it equal to train.py's), on random tokens: no
dataset is needed: the vocabulary is --vocab_size (GPT-2's by default). A preset of train.py's gives
the model and the batch; its other settings do not change a step and are skipped. After `warmup`
untimed steps per arm (compilation happens there), the arms take turns for `rounds` rounds of
`steps` timed steps each, so that machine noise hits them alike. Per arm it prints tokens/s and ms/step (median over rounds, and the min-max
spread); the step-time ratio to vanilla; the analytic FLOP ratio (6N + 12LdT per token) and the
parameter ratio; on CUDA the peak memory and MFU. The same numbers go to `out_json`.
"""
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ledger import ARCHS, ATTENTIONS, GPT, GPTConfig, arm_name
from ledgerlab import cli
from ledgerlab.device import peak_flops, setup_device


@dataclass
class BenchConfig:
    arms: str = "vanilla,ledger"     # comma-separated arms, ARCH or ARCH+ATTENTION (vanilla+gated); 'all': every ARCH
    steps: int = 5                   # timed steps per arm and round
    rounds: int = 3                  # the arms take turns once per round
    warmup: int = 2                  # untimed steps per arm first (compilation happens here)
    threads: int = 0                 # CPU threads (torch.set_num_threads); 0: torch's default
    out_json: str = "out/bench.json"  # where the numbers of every arm are written; the table goes beside it (.md)
    profile: bool = False            # then profile `steps` steps of each arm and print its top ops
    # the step, as train.py's settings of the same names
    batch_size: int = 24             # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per step
    seed: int = 1337                 # seeds the initial weights
    device: str = "auto"             # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"              # auto: bf16 where supported, else fp16 on GPU; fp32 on CPU
    compile: bool = False            # torch.compile the model

    # Checked by cli.parse_overrides as each setting is read
    LIMITS = {"steps": ">= 1", "rounds": ">= 1", "warmup": ">= 0", "threads": ">= 0", "batch_size": ">= 1",
              "gradient_accumulation_steps": ">= 1", "seed": ">= 0",
              "dtype": ("auto", "float32", "bfloat16", "float16")}

# train.py's defaults for what a step does but a benchmark does not vary
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 0.1, 1.0


def train_step(model, step_model, optimizer, scaler, xs, ys, autocast, commit_sparsity):
    """One step as train.py takes it: the micro-steps' forward (plus the paper's commit-sparsity term
    for Ledger arms) and backward, then clip, step and free the gradients. Returns the last loss."""
    for x, y in zip(xs, ys):
        with autocast:
            _, loss, commit_gates = step_model(x, y)
            total = loss if commit_gates is None else loss + commit_sparsity * commit_gates.mean()
        scaler.scale(total / len(xs)).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()   # train.py reads the loss every iteration: the same sync


def costs(model_config):
    """(parameters, training FLOPs per token) of a model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(model_config)
    return model.num_params(), model.flops_per_token()


def cell(value, spec):
    """A table cell: the number, or '-' where there is none (no vanilla to compare with, no CUDA)."""
    return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def arm_configs(arms, model_overrides):
    """(baseline name, baseline GPTConfig, {name: GPTConfig} to time) for --arms. 'all' is every ARCH;
    ARCH+ATTENTION runs ARCH with that attention kind, a bare ARCH with the kind the settings give
    (softmax by default). The baseline, which every ratio is taken to, is vanilla with that kind."""
    def named(spec):
        arch, plus, attention = spec.partition("+")
        if arch not in ARCHS or (plus and attention not in ATTENTIONS):
            raise cli.ConfigError(f"--arms takes 'all' or ARCH[+ATTENTION] with ARCH one of {','.join(ARCHS)} "
                                    f"and ATTENTION one of {','.join(ATTENTIONS)}; got {spec!r}")
        try:
            config = GPTConfig(**{**model_overrides, "arch": arch, **({"attention": attention} if plus else {})})
        except ValueError as e:  # heads that do not divide the width, ...
            raise cli.ConfigError(str(e)) from None
        return arm_name(config.arch, config.attention), config

    specs = [arm for spec in arms.split(",") for arm in (ARCHS if spec == "all" else [spec])]
    return (*named("vanilla"), dict(map(named, specs)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    bench_overrides, model_overrides = cli.parse_overrides(argv, BenchConfig, GPTConfig, others_in_files=True,
                                                           doc=__doc__)
    cfg = BenchConfig(**bench_overrides)
    base, mc, configs = arm_configs(cfg.arms, model_overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, device_type, cfg.dtype, ptdtype, autocast = setup_device(cfg.device, cfg.dtype)
    sync = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * mc.block_size
    title = (f"bench: {device}, {cfg.dtype}, {'compiled' if cfg.compile else 'eager'}, {torch.get_num_threads()} "
             f"threads | {mc.n_layer} layers x {mc.n_embd} wide, vocab {mc.vocab_size} | "
             f"{cfg.gradient_accumulation_steps} x {cfg.batch_size} x {mc.block_size} tokens per step | "
             f"{cfg.rounds} rounds x {cfg.steps} steps per arm, after {cfg.warmup} warm-up steps")
    print(title, flush=True)

    runs = {}
    for arm in configs:
        torch.manual_seed(cfg.seed)
        before = torch.cuda.memory_allocated(device) if device_type == "cuda" else 0
        model = GPT(configs[arm]).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                      fused=device_type == "cuda")
        scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
        step_model = torch.compile(model) if cfg.compile else model
        shape = (cfg.gradient_accumulation_steps, cfg.batch_size, mc.block_size)  # random tokens per micro-step
        xs, ys = (torch.randint(mc.vocab_size, shape, device=device) for _ in range(2))
        step = functools.partial(train_step, model, step_model, optimizer, scaler, xs, ys, autocast,
                                 configs[arm].commit_sparsity)
        t0 = time.perf_counter()
        for _ in range(cfg.warmup):
            step()
        sync()
        resident = torch.cuda.memory_allocated(device) - before if device_type == "cuda" else 0
        runs[arm] = {"step": step, "ms": [], "peak": 0, "resident": resident,
                     "warmup_s": time.perf_counter() - t0}
        print(f"  {arm}: warm-up {runs[arm]['warmup_s']:.1f} s", flush=True)

    for _ in range(cfg.rounds):
        for run in runs.values():
            if device_type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start = torch.cuda.memory_allocated(device)
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                run["step"]()
            sync()
            run["ms"].append(1000 * (time.perf_counter() - t0) / cfg.steps)
            if device_type == "cuda":  # this step's transient memory on top of this arm's own state
                run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated(device) - start + run["resident"])

    peak, (base_params, base_flops) = peak_flops(device), costs(mc)
    base_ms = statistics.median(runs[base]["ms"]) if base in runs else None
    results, width = {}, max(10, *map(len, runs))
    table = [f"{'arm':{width}s} {'tokens/s':>9s} {'ms/step (min-max)':>21s} {'x vanilla':>9s} {'FLOPs x':>8s} "
             f"{'params x':>8s} {'peak GiB':>8s} {'MFU':>6s}"]
    print(table[0])
    for arm, run in runs.items():
        (params, flops), ms = costs(configs[arm]), statistics.median(run["ms"])
        r = results[arm] = {
            "arch": configs[arm].arch, "attention": configs[arm].attention,
            "tokens_per_s": tokens_per_step / ms * 1000, "ms_per_step": ms, "ms_per_step_rounds": run["ms"],
            "ratio_to_vanilla": ms / base_ms if base_ms else None, "flops_per_token": flops,
            "flop_ratio": flops / base_flops, "params": params, "param_ratio": params / base_params,
            "peak_memory_gib": run["peak"] / 2**30 if device_type == "cuda" else None,
            "mfu": flops * tokens_per_step / (ms / 1000) / peak if peak else None, "warmup_s": run["warmup_s"]}
        spread = f"{ms:.1f} ({min(run['ms']):.1f}-{max(run['ms']):.1f})"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "-"
        table.append(f"{arm:{width}s} {r['tokens_per_s']:9,.0f} {spread:>21s} {cell(r['ratio_to_vanilla'], '9.2f')} "
                     f"{r['flop_ratio']:8.2f} {r['param_ratio']:8.2f} {cell(r['peak_memory_gib'], '8.1f')} {mfu:>6s}")
        print(table[-1])
    os.makedirs(os.path.dirname(cfg.out_json) or ".", exist_ok=True)
    with open(cfg.out_json, "w") as f:
        gpu = torch.cuda.get_device_name(device) if device_type == "cuda" else None
        json.dump({"device": device, "gpu": gpu, "dtype": cfg.dtype, "compile": cfg.compile,
                   "threads": torch.get_num_threads(), "tokens_per_step": tokens_per_step, "bench": asdict(cfg),
                   "model": asdict(mc), "arms": results}, f, indent=1)
    out_md = os.path.splitext(cfg.out_json)[0] + ".md"  # the table with its provenance: a results file
    with open(out_md, "w") as f:
        f.write(cli.results_header("bench.py", argv) +
                f"\n{title}\n\n```\n" + "\n".join(table) + "\n```\n")
    print(f"wrote {cfg.out_json} and {out_md}")

    if cfg.profile:  # where each arm's step spends its time
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device_type == "cuda" else [])
        for arm, run in runs.items():
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(cfg.steps):
                    run["step"]()
                sync()
            print(f"--- {arm}: top ops over {cfg.steps} steps")
            sort = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))
    return results


if __name__ == "__main__":
    cli.run_main(main)

# `make bench` on the idle 2-core Intel Xeon VM, commit 60ce0b1 (1 x 8 x 128 tokens per step, vocab 65):
# arm                tokens/s     ms/step (min-max) x vanilla  FLOPs x params x peak GiB    MFU
# vanilla              24,603      41.6 (37.9-43.1)      1.00     1.00     1.00        -      -
# suppress             20,438      50.1 (47.8-51.6)      1.20     1.00     1.00        -      -
# ledger               12,550      81.6 (77.0-86.5)      1.96     1.09     1.10        -      -
# ledger-hs            12,661      80.9 (74.6-85.5)      1.94     1.09     1.10        -      -
# delta                15,291      67.0 (65.5-69.1)      1.61     1.42     1.48        -      -
# hc2                  18,424      55.6 (51.7-57.8)      1.34     1.00     1.00        -      -
# vanilla+attn_bias    23,561      43.5 (43.1-46.8)      1.04     1.00     1.00        -      -
# vanilla+sigmoid      18,587      55.1 (52.3-55.6)      1.32     1.00     1.00        -      -
# vanilla+gated        22,430      45.7 (44.3-47.3)      1.10     1.07     1.08        -      -
