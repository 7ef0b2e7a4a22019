"""
Compare two measurements of the same checkpoints, number by number: did a change of code change what
measure.py computes?

    python tools/compare_metrics.py OLD_DIR NEW_DIR [--rtol=1e-9]

Each DIR is a measure.py --out_dir (or one run's folder): every metrics.json below OLD_DIR is paired
with the one at the same relative path below NEW_DIR. Numbers are compared with a relative
tolerance, everything else exactly. Where and when it ran (timing, provenance, paths, the command's
own settings) is not what it computed, so those keys are skipped. Prints the largest relative
difference per file and every difference beyond the tolerance; exits 1 if there is one.
"""
import json
import math
import os
import sys

SKIPPED = {"timing", "trained_by", "checkpoint", "run_dir", "out_dir", "data_dir", "settings", "figures", "notes",
           "format"}


def differences(old, new, path=""):
    """(path, old, new, relative difference or None) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key in SKIPPED:
                continue
            if key not in old or key not in new:
                yield f"{path}/{key}", old.get(key, "<absent>"), new.get(key, "<absent>"), None
            else:
                yield from differences(old[key], new[key], f"{path}/{key}")
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from differences(a, b, f"{path}[{i}]")
    elif isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        if old != new:
            scale = max(abs(old), abs(new))
            yield path, old, new, abs(old - new) / scale if scale and math.isfinite(scale) else math.inf
    elif old != new:
        yield path, old, new, None


def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    rtol = float(next((a.split("=", 1)[1] for a in argv if a.startswith("--rtol=")), 1e-9))
    if len(paths) != 2:
        print("error: give OLD_DIR and NEW_DIR (python tools/compare_metrics.py OLD_DIR NEW_DIR)", file=sys.stderr)
        return 2
    old_root, new_root = paths
    files = sorted(os.path.relpath(os.path.join(d, f), old_root) for d, _, fs in os.walk(old_root)
                   for f in fs if f == "metrics.json")
    if not files:
        print(f"error: no metrics.json below {old_root}", file=sys.stderr)
        return 2
    failed = False
    for rel in files:
        if not os.path.isfile(os.path.join(new_root, rel)):
            print(f"{rel}: missing below {new_root}")
            failed = True
            continue
        with open(os.path.join(old_root, rel)) as f_old, open(os.path.join(new_root, rel)) as f_new:
            found = list(differences(json.load(f_old), json.load(f_new)))
        numeric = [d for _, _, _, d in found if d is not None]
        beyond = [x for x in found if x[3] is None or x[3] > rtol]
        print(f"{rel}: {len(found)} values differ, largest relative difference "
              f"{max(numeric, default=0.0):.2e}, {len(beyond)} beyond rtol {rtol:g}")
        for where, a, b, d in beyond[:20]:
            print(f"  {where}: {a!r} -> {b!r}" + (f" (relative {d:.2e})" if d is not None else ""))
        failed |= bool(beyond)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
