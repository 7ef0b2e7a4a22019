"""The training loop's contracts: it learns, it resumes bit for bit, DDP equals accumulation,
crashes and signals never cost the last checkpoint, and bad flags fail with one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ledgerlab import cli
import ledger
from ledgerlab import rundir
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--gate_rank=8", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--device=cpu", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--warmup_iters=2", "--ckpt_interval=0"]


def args(char_data, out_dir, *extra):
    data_root, dataset = char_data
    return [f"--data_root={data_root}", f"--dataset={dataset}", f"--out_dir={out_dir}", *TINY, *extra]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(out_dir, name="ckpt.pt"):
    return torch.load(os.path.join(out_dir, name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", ledger.ARCHS)
def test_loss_goes_down_for_every_arm(char_data, tmp_path, arch):
    train.main(args(char_data, tmp_path, f"--arch={arch}", "--max_iters=40", "--eval_interval=40"))
    evals = [r for r in read_log(tmp_path) if "val_loss" in r]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals
    if arch.startswith("ledger"):
        assert len(evals[-1]["commit_gates"]) == 4  # one mean gate per sublayer


def test_resume_is_bit_identical_to_an_uninterrupted_run(char_data, tmp_path):
    common = ["--arch=ledger", "--eval_interval=5", "--lr_decay_iters=20", "--ckpt_interval=10"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(args(char_data, straight, *common, "--max_iters=20"))
    train.main(args(char_data, split, *common, "--max_iters=10"))
    assert load(split)["iter_num"] == 10
    train.main(args(char_data, split, *common, "--max_iters=20", "--init_from=resume"))
    a, b = load(straight), load(split)
    assert a["iter_num"] == b["iter_num"] == 20
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # the kept snapshot holds its own val loss, for matched-loss measurement
    snapshot = load(split, "ckpt_000010.pt")
    assert snapshot["iter_num"] == 10 and snapshot["val_loss"] > 0
    # and each start of the run is recorded, so a results file can say where it was trained
    starts = b["trained_by"]
    assert [s["from_iter"] for s in starts] == [0, 10] and snapshot["trained_by"] == starts[:1]
    assert starts[0]["commit"] and starts[0]["torch"] == torch.__version__ and starts[0]["threads"] >= 1
    assert [s["from_iter"] for s in a["trained_by"]] == [0]


@pytest.mark.parametrize("train_position0", [True, False])
def test_train_position0_false_leaves_only_position_0s_target_out_of_the_loss(char_data, tmp_path, monkeypatch,
                                                                               train_position0):
    seen, loss_of = [], train.training_loss
    monkeypatch.setattr(train, "training_loss", lambda model, x, y, *rest: seen.append(y.clone()) or
                        loss_of(model, x, y, *rest))
    train.main(args(char_data, tmp_path, "--max_iters=3", "--eval_interval=3", f"--train_position0={train_position0}"))
    assert len(seen) == 3
    for y in seen:
        assert bool((y[:, 0] == -1).all()) is not train_position0 and bool((y[:, 1:] >= 0).all())


def test_checkpoints_are_self_describing_and_safe_to_load(char_data, tmp_path):
    train.main(args(char_data, tmp_path, "--arch=ledger-hs", "--max_iters=3", "--eval_interval=3"))
    ckpt = load(tmp_path)  # weights_only=True: no pickled code is needed to read it
    assert ckpt["format"] == rundir.CHECKPOINT_FORMAT
    assert ckpt["model_config"]["arch"] == "ledger-hs" and ckpt["model_config"]["commit_sparsity"] == 0.3
    assert ckpt["train_config"]["max_iters"] == 3 and ckpt["dataset_meta"]["tokenizer"] == "char"
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    model = ledger.GPT(ledger.GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])


def optimizer_of(preset, arch="ledger"):
    """The optimizer train.py builds for a preset, on a small model of the preset's arm."""
    train_settings, model_settings = cli.parse_overrides([os.path.join(REPO, preset)], train.TrainConfig,
                                                           ledger.GPTConfig)
    cfg = train.TrainConfig(**train_settings)
    model = ledger.GPT(ledger.GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11,
                                        gate_rank=4))
    return model, train.configure_optimizer(model, cfg, "cpu")


@pytest.mark.parametrize("preset", ["config/paper_160m.py", "config/paper_290m.py"])
@pytest.mark.parametrize("arch", ["vanilla", "ledger", "hc2"])
def test_paper_presets_train_with_the_released_optimizer(preset, arch):
    """torch.optim.AdamW(model.parameters(), lr, weight_decay=0.1): betas (0.9, 0.999), eps 1e-8,
    and decay on every parameter, norm gains and gate biases included."""
    model, optimizer = optimizer_of(preset, arch)
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert any(p.dim() < 2 for p in group["params"])   # gains and biases are decayed too


@pytest.mark.parametrize("preset", ["config/lab.py", "config/cpu_demo.py"])
def test_the_small_presets_keep_nanogpts_optimizer(preset):
    """The lab and the text demo: beta2 0.95, no decay on anything with fewer than 2 dimensions."""
    model, optimizer = optimizer_of(preset)
    decayed, exempt = optimizer.param_groups
    assert decayed["betas"] == (0.9, 0.95) and decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def test_resume_refuses_an_optimizer_built_another_way(char_data, tmp_path):
    train.main(args(char_data, tmp_path, "--max_iters=2", "--eval_interval=2", "--decay_norms_and_biases=False"))
    with pytest.raises(cli.ConfigError, match="trained with --decay_norms_and_biases=False; resume with the same"):
        train.main(args(char_data, tmp_path, "--max_iters=4", "--init_from=resume"))
    # torch would restore the saved beta2 over the flag without a word: refused instead
    with pytest.raises(cli.ConfigError, match="trained with --beta2=0.999; resume with the same"):
        train.main(args(char_data, tmp_path, "--max_iters=4", "--init_from=resume", "--decay_norms_and_biases=False",
                        "--beta2=0.95"))
    train.main(args(char_data, tmp_path, "--max_iters=4", "--init_from=resume", "--decay_norms_and_biases=False"))
    assert load(tmp_path)["iter_num"] == 4


def test_a_checkpoint_from_before_the_mlp_biases_fails_with_one_line_and_is_kept(char_data, tmp_path):
    train.main(args(char_data, tmp_path, "--max_iters=2", "--eval_interval=2"))
    ckpt = load(tmp_path)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not (".fn.up.bias" in k or ".fn.down.bias" in k)}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(cli.ConfigError, match="does not fit this code's vanilla model .*Missing key"):
        train.main(args(char_data, tmp_path, "--max_iters=4", "--init_from=resume"))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_checkpoint_from_before_the_attention_kinds_resumes_as_softmax(char_data, tmp_path):
    train.main(args(char_data, tmp_path, "--max_iters=2", "--eval_interval=2"))
    ckpt = load(tmp_path)
    del ckpt["model_config"]["attention"]   # as every checkpoint written before the setting existed
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train.main(args(char_data, tmp_path, "--attention=softmax", "--max_iters=3", "--init_from=resume"))
    assert load(tmp_path)["iter_num"] == 3 and load(tmp_path)["model_config"]["attention"] == "softmax"
    with pytest.raises(cli.ConfigError, match="drop --attention"):
        train.main(args(char_data, tmp_path, "--attention=gated", "--max_iters=4", "--init_from=resume"))


def test_compiled_model_prefix_never_reaches_the_weights(tmp_path):
    model = ledger.GPT(ledger.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=11))
    prefixed = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    rundir.save_checkpoint(str(tmp_path / "ckpt.pt"), {"format": rundir.CHECKPOINT_FORMAT, "model": prefixed,
                                                      "model_config": {"arch": "vanilla"}})
    assert set(rundir.load_checkpoint(str(tmp_path / "ckpt.pt"))["model"]) == set(model.state_dict())


def test_a_corrupt_or_foreign_checkpoint_fails_clearly(char_data, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(cli.ConfigError, match="not a readable checkpoint"):
        train.main(args(char_data, tmp_path, "--init_from=resume", "--max_iters=1"))
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(cli.ConfigError, match="not a ledger-residuals checkpoint"):
        train.main(args(char_data, tmp_path, "--init_from=resume", "--max_iters=1"))
    with pytest.raises(cli.ConfigError, match="exists; continue it with --init_from=resume"):
        train.main(args(char_data, tmp_path, "--max_iters=1"))  # never overwrite a run by accident


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(char_data, tmp_path, monkeypatch, capsys):
    real_forward = ledger.GPT.forward
    steps = []

    def forward_that_diverges(self, idx, targets=None, stream_hook=None):
        logits, loss, gates = real_forward(self, idx, targets, stream_hook)
        if self.training:
            steps.append(1)
            if len(steps) > 7:  # the 8th training step (iter 7) blows up
                loss = loss * float("nan")
        return logits, loss, gates

    monkeypatch.setattr(ledger.GPT, "forward", forward_that_diverges)
    with pytest.raises(SystemExit) as stopped:
        train.main(args(char_data, tmp_path, "--max_iters=20", "--eval_interval=5"))
    assert stopped.value.code == 3
    assert "non-finite loss (nan) at iter 7" in capsys.readouterr().err
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def run_cli(*argv, **kwargs):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True, **kwargs)


def test_unknown_and_ill_typed_flags_fail_with_one_line(char_data, tmp_path):
    result = run_cli(*args(char_data, tmp_path), "--n_layr=3")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown setting 'n_layr'; did you mean 'n_layer'?"
    result = run_cli(*args(char_data, tmp_path), "--max_iters=ten")
    assert result.returncode == 2 and result.stderr.strip() == "error: max_iters='ten': expected int"
    with pytest.raises(cli.ConfigError, match="unknown arch 'ledgr'"):
        train.main(args(char_data, tmp_path, "--arch=ledgr"))
    with pytest.raises(cli.ConfigError, match="compile='maybe': expected bool"):
        cli.parse_overrides(["--compile=maybe"], train.TrainConfig)
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_config_files_and_overrides_compose(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("n_layer = 6\nlearning_rate = 1e-3\narch = 'ledger'\ncompile = True\n")
    train_settings, model_settings = cli.parse_overrides([str(preset), "--n_layer=2", "--compile"],
                                                           train.TrainConfig, ledger.GPTConfig)
    assert train_settings == {"learning_rate": 1e-3, "compile": True}
    assert model_settings == {"n_layer": 2, "arch": "ledger"}
    with pytest.raises(cli.ConfigError, match="expected int"):
        cli.parse_overrides(["--n_layer=2.5"], train.TrainConfig, ledger.GPTConfig)


def start_training(char_data, out_dir, *extra):
    return subprocess.Popen([sys.executable, "train.py", *args(char_data, out_dir, *extra)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc, prefix, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        assert line or proc.poll() is None, "training exited early"
    raise AssertionError(f"no line starting with {prefix!r}")


@pytest.mark.slow
def test_kill_9_leaves_a_loadable_checkpoint(char_data, tmp_path):
    proc = start_training(char_data, tmp_path, "--max_iters=100000", "--eval_interval=1", "--eval_iters=1")
    wait_for_line(proc, "eval iter 3")
    time.sleep(0.5)  # land somewhere in the middle of a step or a save
    proc.kill()
    proc.wait()
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] >= 2
    ledger.GPT(ledger.GPTConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])


@pytest.mark.slow
def test_sigterm_saves_a_fresh_checkpoint_and_exits_cleanly(char_data, tmp_path):
    proc = start_training(char_data, tmp_path, "--max_iters=100000", "--eval_interval=100000")
    wait_for_line(proc, "iter 5:")
    assert not os.path.exists(tmp_path / "ckpt.pt")  # no evaluation has saved one yet
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "stopped by signal" in out
    assert load(tmp_path)["iter_num"] >= 5
    # and the run continues from there
    train.main(args(char_data, tmp_path, "--init_from=resume", f"--max_iters={load(tmp_path)['iter_num'] + 2}",
                    "--eval_interval=100000"))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_twice_the_accumulation(char_data, tmp_path):
    # gradient_accumulation_steps is global: 4 means 2 micro-steps in each of the 2 processes.
    common = args(char_data, tmp_path, "--arch=ledger", "--max_iters=6", "--eval_interval=6",
                  "--gradient_accumulation_steps=4")
    single = run_cli(*common, f"--out_dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *common, f"--out_dir={tmp_path}/ddp"],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "world size 2" in ddp.stdout
    steps_single = [r for r in read_log(tmp_path / "single") if "loss" in r]
    steps_ddp = [r for r in read_log(tmp_path / "ddp") if "loss" in r]
    assert [r["iter"] for r in steps_single] == [r["iter"] for r in steps_ddp] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(steps_single, steps_ddp):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    a, b = load(tmp_path / "single"), load(tmp_path / "ddp")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("arch", ["ledger", "delta"])
def test_format_1_checkpoints_load_with_their_maps_renamed(tmp_path, arch):
    """Format 1 held D's erase and write maps under `residual.scratch.`; they load into today's model."""
    model = ledger.GPT(ledger.GPTConfig(arch=arch, n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=11))
    old = {k.replace(".residual.", ".residual.scratch.") if any(m in k for m in (
        "erase_key", "write_map", "erase_gate", "write_gate")) else k: v for k, v in model.state_dict().items()}
    assert any(".scratch." in k for k in old)
    rundir.save_checkpoint(str(tmp_path / "ckpt.pt"), {"format": "ledger-residuals-ckpt/1", "model": old,
                                                      "model_config": {"arch": arch}})
    loaded = rundir.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert list(loaded["model"]) == list(model.state_dict())


def test_a_second_writer_of_a_run_directory_gets_one_line_and_writes_nothing(char_data, tmp_path):
    train.main(args(char_data, tmp_path, "--max_iters=2", "--eval_interval=2"))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with rundir.claim_run_dir(str(tmp_path)):   # a run holds the directory
        # a run in another process, as a second train.py would be, is refused with one line
        done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                               *args(char_data, tmp_path, "--max_iters=4", "--init_from=resume")],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: ") and "is in use by another run (pid " in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)
            if name != rundir.LOCK_NAME} == {k: v for k, v in before.items() if k != rundir.LOCK_NAME}


def test_a_lock_left_by_a_killed_run_does_not_block(char_data, tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ledgerlab import rundir\n"
                               f"with rundir.claim_run_dir({str(tmp_path)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "held"
    killed.kill()
    killed.wait()
    assert (tmp_path / rundir.LOCK_NAME).read_text().startswith("pid ")   # the file stays behind
    train.main(args(char_data, tmp_path, "--max_iters=2", "--eval_interval=2"))
    assert load(tmp_path)["iter_num"] == 2


def test_resume_without_dataset_goes_on_with_the_checkpoints_dataset(char_data, tmp_path):
    data_root, dataset = char_data
    common = [f"--data_root={data_root}", f"--out_dir={tmp_path}", *TINY, "--eval_interval=2"]
    train.main([f"--dataset={dataset}", *common, "--max_iters=2"])
    assert dataset != train.TrainConfig.dataset
    train.main([*common, "--max_iters=4", "--init_from=resume"])   # no --dataset
    assert load(tmp_path)["iter_num"] == 4 and load(tmp_path)["train_config"]["dataset"] == dataset
