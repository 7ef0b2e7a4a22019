"""
Compare two measurements of the same checkpoints, number by number: did a change of code change what
measure.py computes?

    python tools/compare_metrics.py OLD_DIR NEW_DIR [--rtol=1e-9] [--atol=0]

Each DIR is a measure.py --out_dir (or one run's folder): every metrics.json below OLD_DIR is paired
with the one at the same relative path below NEW_DIR. Floats agree within |new - old| <= atol + rtol
|old|; everything else must be equal, keys and types included. Where the files lay and how long the
passes took is not what was measured, so those keys are not compared. Exits 1 on any difference.
tests/test_metrics_json.py holds the golden checkpoints to the same rule.
"""
import json
import os
import sys

NOT_COMPARED = {"checkpoint", "run_dir", "data_dir", "out_dir", "settings.out_dir", "settings.data_root",
                "timing.seconds", "timing.tokens_per_s", "timing.statistics_s", "timing.dominant_profile_s",
                "timing.interventions_s", "timing.quantization_s", "timing.ledger_streams_s", "timing.figures_s",
                "timing.load_s", "timing.plain_forward_s", "timing.statistics_overhead",
                # settings a checkpoint's measurement does not use (a pretrained model's), and the prose
                # summary.md writes from the numbers, whose wording may change while the numbers do not
                "settings.text", "settings.bos", "settings.dtype", "settings.dry_run", "notes"}


def differences(new, old, rtol=1e-9, atol=0.0, path=""):
    """Every place where `new` differs from `old`, as one line each."""
    if path.lstrip(".") in NOT_COMPARED:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        one_side = {key for key in set(new) ^ set(old) if f"{path}.{key}".lstrip(".") not in NOT_COMPARED}
        if one_side:
            return [f"{path}: keys {sorted(one_side)} on one side only"]
        return [d for key in old if key in new for d in differences(new[key], old[key], rtol, atol, f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list):
        if len(new) != len(old):
            return [f"{path}: {len(new)} entries, was {len(old)}"]
        return [d for i, (n, o) in enumerate(zip(new, old)) for d in differences(n, o, rtol, atol, f"{path}[{i}]")]
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return [] if abs(new - old) <= atol + rtol * abs(old) else [f"{path}: {new!r}, was {old!r}"]
    return [] if new == old and type(new) is type(old) else [f"{path}: {new!r}, was {old!r}"]


def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if len(paths) != 2 or set(options) - {"rtol", "atol"}:
        print("error: usage: python tools/compare_metrics.py OLD_DIR NEW_DIR [--rtol=1e-9] [--atol=0]",
              file=sys.stderr)
        return 2
    rtol, atol = float(options.get("rtol", 1e-9)), float(options.get("atol", 0.0))
    old_root, new_root = paths
    files = sorted(os.path.relpath(os.path.join(d, f), old_root) for d, _, fs in os.walk(old_root)
                   for f in fs if f == "metrics.json")
    if not files:
        print(f"error: no metrics.json below {old_root}", file=sys.stderr)
        return 2
    failed = False
    for rel in files:
        if not os.path.isfile(os.path.join(new_root, rel)):
            print(f"{rel}: no such file below {new_root}")
            failed = True
            continue
        with open(os.path.join(old_root, rel)) as f_old, open(os.path.join(new_root, rel)) as f_new:
            found = differences(json.load(f_new), json.load(f_old), rtol, atol)
        print(f"{rel}: {'the same' if not found else f'{len(found)} differences'} (rtol {rtol:g}, atol {atol:g})")
        for line in found[:20]:
            print(f"  {line}")
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
