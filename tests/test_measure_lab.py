"""metrics.py's and measure.py's numbers for the lab's answer: the headline metrics after per-token
normalisation on planted tensors (a second StreamStats fed x / rms(x)), Ledger's stream report, and
--trajectory, whose every row is the measurement the same snapshot gets on its own."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import measure
from ledgerlab import metrics
from ledgerlab import reports
from ledgerlab.summary import normalized_table
from ledger import GPT, GPTConfig
from ledgerlab.metrics import StreamStats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_windows=6", "--batch_size=4", "--seq_len=32", "--threads=1", "--quantization=False"]


def signs(shape, gen):
    """Entries of +-1: |x| is exactly 1 everywhere, so every ratio below is known in closed form."""
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def summary(scale_pos0, outlier=None, B=4, T=16, D=32, n_sublayers=2):
    """A +-1 stream, optionally with dim 7 set to `outlier` at position 0, whose position 0 is then
    scaled by `scale_pos0`."""
    gen, stats = torch.Generator().manual_seed(0), StreamStats(n_sublayers, D)
    for i in range(n_sublayers):
        x = signs((B, T, D), gen)
        if outlier is not None:
            x[:, 0, 7] = outlier
        x[:, 0] *= scale_pos0
        stats.update(i, x)
    return stats.summarize()


# ----------------------------------------------------------------------------------------------
# Per-token normalisation on planted tensors

def test_a_stream_scaled_up_at_position_0_has_a_raw_concentration_of_the_scale_and_a_normalised_one_of_1():
    s = summary(scale_pos0=1000.0)
    u = s["normalized"]
    assert s["start_token_concentration_peak"] == pytest.approx(1000.0)   # every |x| is 1000 there, 1 elsewhere
    assert s["residual_peak"]["max"] == pytest.approx(1000.0)
    assert u["start_token_concentration_peak"] == pytest.approx(1.0)
    assert u["residual_peak"]["max"] == pytest.approx(1.0) and u["residual_peak"]["final"] == pytest.approx(1.0)
    assert s["peak_pos0_ratio"] == pytest.approx(1.0) == u["peak_pos0_ratio"]   # no dim stands out in a token


def test_normalisation_divides_out_position_0s_scale_but_keeps_its_within_token_outlier():
    D, value = 32, 40.0
    plain, scaled = summary(1.0, outlier=value), summary(1000.0, outlier=value)
    rms0 = ((value ** 2 + D - 1) / D) ** 0.5        # position 0's RMS: dim 7 at 40, 31 dims at 1
    # raw: the scale multiplies the concentration and the residual peak, not the within-token ratio
    assert plain["start_token_concentration_peak"] == pytest.approx(value)
    assert scaled["start_token_concentration_peak"] == pytest.approx(1000 * value)
    assert scaled["residual_peak"]["max"] == pytest.approx(1000 * rms0)
    assert plain["peak_pos0_ratio"] == pytest.approx(value) == scaled["peak_pos0_ratio"]
    # normalised: the same for both streams, and known by hand
    for s in (plain, scaled):
        u = s["normalized"]
        assert u["start_token_concentration_peak"] == pytest.approx(value / rms0)   # 40 / 7.14, over 1 / 1
        assert u["peak_pos0_ratio"] == pytest.approx(value)
        assert u["residual_peak"]["max"] == pytest.approx(1.0)
        assert u["released_start_token_concentration"] == pytest.approx((value / rms0) / ((value / rms0 + 15) / 16))
    # the norms that the Ledger report reads: position 0 and the rest, raw
    assert scaled["mean_norm_pos0_per_sublayer"][-1] == pytest.approx(1000 * rms0 * D ** 0.5)
    assert scaled["mean_norm_later_per_sublayer"][-1] == pytest.approx(D ** 0.5)


def test_the_normalised_table_puts_raw_and_normalised_side_by_side_and_says_what_compares():
    s = summary(1000.0, outlier=40.0)
    m = {"label": "ledger", "decoded_stream": "C", "streams": {"C": s}}
    table = normalized_table([m])
    assert "| ledger | C | 40.0x | 40.0x | 40000.0x | 5.6x | 7139.2x | 1.00x |" in table
    assert "compare them normalised" in table


# ----------------------------------------------------------------------------------------------
# Ledger's two streams

def test_the_ledger_report_reads_gates_norms_and_dims():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="ledger", vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16,
                          gate_rank=4)).eval()
    x = torch.randint(0, 20, (6, 8))
    batch_fn = lambda: ((x[i:i + 4], torch.zeros_like(x[i:i + 4])) for i in (0, 4))   # batches of 4 and 2 windows
    stats, _ = metrics.collect_stream_stats(model, batch_fn)
    summaries = {name: st.summarize() for name, st in stats.items()}
    report = metrics.ledger_stream_report(model, batch_fn, summaries, metrics.mean_loss(model, batch_fn()))
    with torch.no_grad():
        gates = (4 * model(x[:4])[2] + 2 * model(x[4:])[2]) / 6    # weighted by windows per batch
    assert report["commit_gate_per_sublayer"] == pytest.approx(gates.tolist())
    assert report["commit_gate_mean"] == pytest.approx(float(gates.mean()))
    C, D = summaries["C"], summaries["D"]
    assert report["C_over_D_norm_final"] == pytest.approx(C["mean_norm_per_sublayer"][-1] / D["mean_norm_per_sublayer"][-1])
    assert report["C_carries_D_dim"] == (C["dominant_dim"] == D["dominant_dim"])
    assert set(report["loss_change_commit_logits_shifted"]) == {"-2", "+2"}


def test_the_commit_shift_moves_every_commit_gate_by_the_shift_and_puts_it_back():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="ledger", vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16,
                          gate_rank=4)).eval()
    x = torch.randint(0, 20, (4, 8))
    batch_fn = lambda: iter([(x, torch.roll(x, -1, 1))])
    commit_biases = lambda: [m.commit_gate.bias.item() for m in model.modules() if hasattr(m, "commit_gate")]
    before, biases = metrics.mean_loss(model, batch_fn()), commit_biases()
    cost = metrics.commit_shift_cost(model, batch_fn, before)
    assert len(biases) == 4 and commit_biases() == biases                # put back exactly
    for shift in metrics.COMMIT_SHIFTS:
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for m in shifted.modules():
                if hasattr(m, "commit_gate"):
                    m.commit_gate.bias.add_(shift)
        assert cost[f"{shift:+g}"] == metrics.mean_loss(shifted, batch_fn()) - before
        assert cost[f"{shift:+g}"] != 0.0      # gates at sigmoid(bias), open at init: a shift changes C's mix


# ----------------------------------------------------------------------------------------------
# --trajectory on a tiny run with 3 snapshots

@pytest.fixture(scope="module")
def ledger_run(tmp_path_factory, char_data):
    data_root, dataset = char_data
    out = tmp_path_factory.mktemp("trajectory") / "ledger-run"
    done = subprocess.run([sys.executable, "train.py", "--arch=ledger", f"--dataset={dataset}", f"--data_root={data_root}",
                           f"--out_dir={out}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
                           "--batch_size=4", "--max_iters=30", "--eval_interval=10", "--eval_iters=2",
                           "--ckpt_interval=10", "--learning_rate=3e-3", "--warmup_iters=2", "--device=cpu",
                           "--seed=1", "--log_interval=10"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return str(out)


@pytest.mark.slow
def test_the_trajectory_has_one_row_per_snapshot_matching_each_snapshots_own_measurement(ledger_run, tmp_path,
                                                                                        monkeypatch):
    measured = []
    real = measure.measure_checkpoint
    monkeypatch.setattr(measure, "measure_checkpoint", lambda path, *a: measured.append(path) or real(path, *a))
    out = tmp_path / "trajectory"
    trajectories = measure.main([ledger_run, "--trajectory", f"--out_dir={out}", *FAST])
    rows = trajectories["ledger-run"]["rows"]
    snapshots = [os.path.join(ledger_run, f"ckpt_{i:06d}.pt") for i in (10, 20, 30)]
    assert [r["iter"] for r in rows] == [10, 20, 30]
    assert measured == snapshots   # one measurement per snapshot; ckpt.pt repeats step 30, so it is not measured again
    for snapshot, row in zip(snapshots, rows):
        [alone] = measure.main([snapshot, f"--out_dir={tmp_path / os.path.basename(snapshot)}", "--figures=False", *FAST])
        assert row == reports.trajectory_row(alone)
        assert len(row["commit_gate_per_sublayer"]) == 4 and row["C_carries_D_dim"] in (True, False)
    saved = json.loads((out / "trajectory.json").read_text())
    assert [r["iter"] for r in saved["runs"]["ledger-run"]["rows"]] == [10, 20, 30]
    table = (out / "trajectory.md").read_text()
    assert sum(line.startswith("| ledger-run |") for line in table.splitlines()) == 3
    assert f"| {rows[-1]['commit_gate_mean']:.4f} | " in table   # closed gates (~0.001) need more than 2 decimals
    assert (out / "trajectory.png").exists() and (out / "ckpt_000020" / "metrics.json").exists()


def test_the_trajectory_takes_run_directories_only(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_text("a file, not a run directory")
    for argv, message in (([str(tmp_path / "ckpt.pt"), "--trajectory"], "takes run directories"),
                          ([str(tmp_path), "--trajectory", "--match_loss=auto"], "drop --match_loss")):
        with pytest.raises(SystemExit) as stopped:
            measure.main([*argv, f"--out_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()
