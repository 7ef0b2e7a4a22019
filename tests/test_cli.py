"""The command line as a new user meets it: the used-by commands work verbatim, every script's --help
lists every setting with its meaning, and a bad setting is one `error:` line with exit status 2 before
any data or checkpoint is touched."""
import dataclasses
import os
import runpy
import subprocess
import sys

import pytest

import ledger
import measure
import prepare_data
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"train.py": (train.TrainConfig, ledger.GPTConfig), "measure.py": (measure.MeasureConfig,)}
# ----------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_help_exits_0_and_lists_every_setting_with_its_meaning(script):
    shown = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stderr == ""
    lines = shown.stdout.splitlines()
    for config_type in CONFIGS[script]:
        comments = dict(train.documented_fields(config_type))
        for field in dataclasses.fields(config_type):
            [line] = [ln for ln in lines if ln.startswith(f"  --{field.name}=")]
            assert line.endswith(comments[field.name]), line
    if script == "train.py":
        assert all(arch in shown.stdout for arch in ledger.ARCHS)
        assert "  --batch_size=24" in shown.stdout and "int, >= 1: sequences per micro-batch" in shown.stdout


def test_prepare_data_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as stopped:
        prepare_data.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps to the terminal's width
    assert stopped.value.code == 0
    options = vars(prepare_data.parse_args([]))
    assert all(f"--{name}" in out for name in options)
    assert out.count("(default:") == len(options) and "(default: shakespeare)" in out


def test_prepare_data_takes_key_value_flags_like_the_other_scripts():
    assert prepare_data.parse_args(["--force=True"]).force is True
    assert prepare_data.parse_args(["--force"]).force is True
    assert prepare_data.parse_args(["--force=False"]).force is False
    assert prepare_data.parse_args(["--dataset=text", "--input=a.txt", "--num_proc=1"]).input == ["a.txt"]


def test_every_setting_has_a_comment_to_show_as_help():
    for config_type in (train.TrainConfig, ledger.GPTConfig, measure.MeasureConfig):
        rows = [row for row in train.documented_fields(config_type) if row[0] is not None]
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
    assert train.documented_fields(Planted) == [(None, "a heading"), ("documented", "what it means"),
                                                ("wrapped", "a long meaning, continued here"), ("bare", "")]
    text = train.help_text("Planted.", Planted).splitlines()
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
    ("--init_from=resum", "init_from='resum': must be one of scratch, resume"),
    ("--dtype=fp16", "dtype='fp16': must be one of auto, float32, bfloat16, float16"),
    ("--n_head=5 --n_embd=48", "n_embd=48 is not divisible by n_head=5"),   # the config's own check
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
