"""Behaviour kept: the two checkpoints in tests/fixtures/golden/, measured with today's code, give
every number that measure.py gave them at commit 2c66688 (make_golden.sh there wrote both)."""
import json
import os

import pytest

import measure

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden")
# where the files lay and how long it took, not what was measured
NOT_COMPARED = {"checkpoint", "run_dir", "data_dir", "out_dir", "settings.out_dir", "settings.data_root",
                "timing.seconds", "timing.tokens_per_s", "timing.statistics_s", "timing.dominant_profile_s",
                "timing.interventions_s", "timing.quantization_s", "timing.ledger_streams_s", "timing.figures_s"}


def differences(new, old, path=""):
    """Every place where `new` differs from `old`: floats by more than 1e-9 relative, all else exactly."""
    if path.lstrip(".") in NOT_COMPARED:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        if set(new) != set(old):
            return [f"{path}: keys {sorted(set(new) ^ set(old))} on one side only"]
        return [d for key in old for d in differences(new[key], old[key], f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list):
        if len(new) != len(old):
            return [f"{path}: {len(new)} entries, was {len(old)}"]
        return [d for i, (n, o) in enumerate(zip(new, old)) for d in differences(n, o, f"{path}[{i}]")]
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return [] if new == pytest.approx(old, rel=1e-9, abs=0) else [f"{path}: {new!r}, was {old!r}"]
    return [] if new == old and type(new) is type(old) else [f"{path}: {new!r}, was {old!r}"]


def test_the_golden_checkpoints_measure_to_the_numbers_the_old_code_gave(tmp_path):
    measure.main([os.path.join(GOLDEN, arch) for arch in ("vanilla", "ledger")]
                 + [f"--out_dir={tmp_path}", f"--data_root={os.path.join(GOLDEN, 'dataset')}", "--figures=False",
                    "--threads=1"])
    for arch in ("vanilla", "ledger"):
        with open(os.path.join(GOLDEN, "measured", arch, "metrics.json")) as f:
            old = json.load(f)
        with open(tmp_path / arch / "metrics.json") as f:
            new = json.load(f)
        found = differences(new, old)
        assert not found, f"{arch}: " + "; ".join(found[:10])
