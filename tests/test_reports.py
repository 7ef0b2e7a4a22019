"""reports.py, the reports over many runs, from planted metrics: the across-seeds table counts each
verdict over runs, summary.md's opening asks the paper's three claims of the runs it was given and
says no more than they show, a short lab says so, and the sweep gives a band over seeds per lambda."""
import json

import pytest

from ledgerlab import reports
from ledgerlab.cli import ConfigError


# ----------------------------------------------------------------------------------------------
# Across seeds

def test_the_across_seeds_table_gives_mean_min_and_max_and_counts_each_verdict_over_runs():
    def run(arch, loss, pos0, zero, conc=1.0, verdict="start-token specific: ...", sparsity=None):
        stream = {"peak_pos0_ratio": pos0, "start_token_concentration_peak": conc, "residual_peak": {"max": 2.0},
                  "normalized": {"start_token_concentration_peak": conc / 2},
                  "released_definitions": {"start_token_concentration": pos0 / 10}}
        return {"arch": arch, "measured_val_loss": loss, "decoded_stream": "h", "streams": {"h": stream},
                "model_config": {"arch": arch, "commit_sparsity": sparsity}, "top_tokens": {"peak": {"verdict": verdict}},
                "extreme_tokens": {"sink_max": 0.5}, "interventions": {"zero_delta": zero, "mean_delta": 0.0}}
    table = reports.across_seeds_table([run("vanilla", 1.0, 20.0, 0.1), run("vanilla", 2.0, 40.0, 0.3, conc=12.0),
                                        run("ledger", 1.5, 5.0, 0.0)])
    rows = [line for line in table.splitlines() if line.startswith("| vanilla")]
    assert rows == ["| vanilla | 2 | 1.500 [1.000, 2.000] | 30.0 [20.0, 40.0] | 6.5 [1.0, 12.0] | 3.250 [0.500, 6.000] | 3.000 [2.000, 4.000] "
                    "| 2.000 [2.000, 2.000] "
                    "| 0.500 [0.500, 0.500] | 0.200 [0.100, 0.300] | 0.000 [0.000, 0.000] "
                    "| 2 of 2 | 1 of 2 | 0 of 2 | — |"]   # specific, >= 30x and >= 10x, sink > 0.5, C carries D's
    assert "| ledger" not in table          # one run is no spread
    # a run whose peak sublayer is its last stores the verdict once, under "last": it still counts
    peak_is_last = [dict(run("vanilla", 1.0, 20.0, 0.1), top_tokens={"last": {"verdict": v}})
                    for v in ("start-token specific: ...", "not start-token specific: 't1' carries it")]
    assert "| 1 of 2 | 0 of 2 | 0 of 2 | — |" in reports.across_seeds_table(peak_is_last)
    sgd = [dict(run("vanilla", 3.0, 10.0, 0.0), optimizer="sgd") for _ in range(2)]
    assert "| vanilla + sgd | 2 | 3.000" in reports.across_seeds_table(sgd + [run("vanilla", 1.0, 20.0, 0.1)])
    assert reports.across_seeds_table([run("ledger", 1.5, 5.0, 0.0)]) == ""
    # runs trained another way are other experiments, not seeds of the arm
    other = [run("ledger", 1.5, 5.0, 0.0, sparsity=0.02), run("ledger", 1.5, 5.0, 0.0, sparsity=0.0),
             dict(run("ledger", 1.5, 5.0, 0.0, sparsity=0.02), train_config={"train_position0": False})]
    assert reports.across_seeds_table(other) == ""
    assert "| ledger, commit sparsity 0 | 2 |" in reports.across_seeds_table(other + [other[1]])
    assert "| ledger, no position-0 loss | 2 |" in reports.across_seeds_table(other + [other[2]])
    # and runs on other data, or at another setting, are other experiments that say how they differ
    on = lambda root, seed: dict(run("vanilla", 1.0, 20.0, 0.1), train_config={"data_root": root, "seed": seed})
    table = reports.across_seeds_table([on("data", 1), on("data", 2), on("data_t1", 1), on("data_t1", 2)])
    assert "| vanilla (data_root=data) | 2 |" in table and "| vanilla (data_root=data_t1) | 2 |" in table


# ----------------------------------------------------------------------------------------------
# The paper's three claims, and a short lab

def arm(arch, seed, pos0, normalized, verdict="start-token specific: ...", sparsity=None, carries=False, steps=2000):
    """A run's metrics as the claims read them: the decoded stream's pos-0 ratio and normalised concentration."""
    stream = {"dominant_dim": 7, "peak_pos0_ratio": pos0, "start_token_concentration_peak": 100.0,
              "normalized": {"start_token_concentration_peak": normalized}}
    ledger = arch != "vanilla"
    return {"arch": arch, "train_seed": seed, "decoded_stream": "C" if ledger else "h", "streams": {"C" if ledger else "h": stream},
            "model_config": {"arch": arch, "commit_sparsity": sparsity}, "top_tokens": {"peak": {"verdict": verdict}},
            "ledger_streams": {"C_carries_D_dim": carries} if ledger else None,
            "train_config": {"dataset": "bigram_backcopy", "max_iters": steps}}


def test_the_claims_say_what_this_run_shows_and_point_to_the_five_seed_verdicts():
    vanilla, ledger = arm("vanilla", 1, 129.6, 6.9), arm("ledger", 1, 81.3, 3.0)
    hs = arm("ledger-hs", 1, 2.8, 0.9, verdict="not start-token specific: 't1' ...")
    text = reports.claims([vanilla, ledger, hs])
    lines = text.splitlines()
    assert "one seed is no verdict" in lines[0] and "`docs/results/lab-seeds.md`" in lines[0]
    assert lines[2] == ("1. C rebuilds the start-token outlier. This run: yes (C's dimension 7 is 81.3x the median "
                        "at position 0, start-token specific, and not D's dimension).")
    assert lines[3] == ("2. It is smaller, but more concentrated on token 0 than vanilla's h. This run: no (smaller, "
                        "81.3x at position 0 against vanilla's 129.6x; not more concentrated, normalised concentration "
                        "3.0x against 6.9x).")
    assert lines[4] == ("3. A stronger commit-sparsity penalty makes it stronger (ledger-hs against ledger). This run: no "
                        "(ledger-hs's C is 2.8x the median at position 0 against ledger's 81.3x, normalised "
                        "concentration 0.9x against 3.0x).")
    # only the claims whose arms were measured, and none without Ledger
    assert [ln[:2] for ln in reports.claims([vanilla, ledger]).splitlines()[2:]] == ["1.", "2."]
    assert reports.claims([vanilla]) == ""
    # several seeds: how many show it, not one seed's numbers
    seeds = [arm("ledger", s, pos0, 3.0) for s, pos0 in ((1, 81.3), (2, 12.0), (3, 75.0))]
    assert "1. C rebuilds the start-token outlier. These runs: 2 of 3 seeds." in reports.claims(seeds)
    # runs trained another way are not the arm the claim is about
    assert reports.claims([arm("ledger", 1, 81.3, 3.0, sparsity=0.0)]) == ""


def test_a_lab_trained_shorter_than_config_lab_says_it_is_a_short_run():
    short = reports.short_run([arm("vanilla", 1, 50.0, 3.0, steps=1000), arm("ledger", 1, 50.0, 3.0, steps=1000)])
    assert short.startswith("A short run: trained for 1000 steps, where the full lab trains 2000 (config/lab.py).")
    assert "`docs/results/lab-seeds.md`" in short
    assert reports.short_run([arm("vanilla", 1, 50.0, 3.0)]) == ""
    other_data = dict(arm("vanilla", 1, 50.0, 3.0, steps=20), train_config={"dataset": "shakespeare", "max_iters": 20})
    assert reports.short_run([other_data]) == ""   # not the lab's data: not a short lab


# ----------------------------------------------------------------------------------------------
# The sweep report, from planted metrics

def planted(name, lam, pos0, zero, carries=None, gate=None, optimizer="adamw"):
    ledger = lam is not None
    stream = {"peak_pos0_ratio": pos0, "start_token_concentration_peak": 10 * pos0,
              "normalized": {"start_token_concentration_peak": pos0 / 10},
              "mean_norm_pos0_per_sublayer": [0.0, 2 * pos0], "mean_norm_later_per_sublayer": [0.0, 1.0]}
    return {"arch": "ledger" if ledger else "vanilla", "optimizer": optimizer, "run_dir": f"out/lab/{name}",
            "decoded_stream": "C" if ledger else "h", "model_config": {"commit_sparsity": lam or 0.0},
            "streams": {"C" if ledger else "h": stream}, "interventions": {"zero_delta": zero},
            "ledger_streams": {"C_carries_D_dim": carries, "commit_gate_mean": gate} if ledger else None}


def test_the_sweep_gives_mean_min_and_max_over_seeds_per_lambda_and_vanillas_band(tmp_path):
    metrics = [planted("ledger-cs0-s1", 0.0, 20.0, 0.5, True, 0.4), planted("ledger-cs0-s2", 0.0, 40.0, None, False, 0.2),
               planted("ledger-cs0.3-s1", 0.3, 60.0, 0.1, True, 0.01),
               planted("vanilla-s1", None, 30.0, 0.2), planted("vanilla-s2", None, 50.0, 0.4),
               planted("vanilla-sgd-s1", None, 1.0, 0.0, optimizer="sgd"),   # not the reference
               {**planted("ledger-cs0-nopos0-s1", 0.0, 1.0, 0.0), "train_config": {"train_position0": False}},  # nor a point
               {**planted("ledger+gated-cs0-s1", 0.0, 1.0, 0.0), "attention": "gated"}]                           # nor this
    summary = reports.sweep_report(metrics, str(tmp_path))
    assert summary["lambdas"] == [0.0, 0.3]
    zero = summary["ledger"][0.0]
    assert zero["runs"] == ["ledger-cs0-s1", "ledger-cs0-s2"]
    assert zero["pos0_ratio"] == {"mean": 30.0, "min": 20.0, "max": 40.0, "n": 2}
    assert zero["zero_delta"] == {"mean": 0.5, "min": 0.5, "max": 0.5, "n": 1}     # a skipped intervention drops out
    assert zero["carries_D_dim"]["mean"] == 0.5 and zero["commit_gate"]["mean"] == pytest.approx(0.3)
    assert zero["norm_pos0"] == {"mean": 60.0, "min": 40.0, "max": 80.0, "n": 2}
    vanilla = summary["vanilla"]
    assert vanilla["runs"] == ["vanilla-s1", "vanilla-s2"] and vanilla["pos0_ratio"]["mean"] == 40.0
    assert "commit_gate" not in vanilla and "carries_D_dim" not in vanilla
    table = (tmp_path / "sweep.md").read_text()
    assert "| 0 | 2 | 30.0 [20.0, 40.0] | 300 [200, 400] | 3.00 [2.00, 4.00] | 1 of 2 | 0.500 [0.500, 0.500] |" in table
    assert "| vanilla (h) | 2 | 40.0 [30.0, 50.0] |" in table and "| 0.3 | 1 | 60.0 [60.0, 60.0] |" in table
    assert "| 0.0100 [0.0100, 0.0100] |" in table   # a closed gate keeps its significant digits
    assert json.loads((tmp_path / "sweep.json").read_text())["ledger"]["0.3"]["commit_gate"]["max"] == 0.01
    assert (tmp_path / "sweep.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="no Ledger run"):
        reports.sweep_summary(metrics[3:])


