"""metrics.json: measure.py writes exactly the keys metrics_json.py documents, and the two checkpoints in
tests/fixtures/golden/, measured with today's code, give every number that measure.py gave them at
commit 2c66688 (make_golden.sh there wrote both)."""
import json
import os
import re
import sys

import pytest
import torch

import measure
from ledgerlab import metrics_json
from ledger import ATTENTIONS, GPT, GPTConfig
from ledgerlab.rundir import CHECKPOINT_FORMAT

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from compare_metrics import differences  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden")
DATA = [f"--data_root={os.path.join(GOLDEN, 'dataset')}", "--figures=False", "--threads=1"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{arch: metrics.json} of the golden vanilla and ledger checkpoints, measured together."""
    out = tmp_path_factory.mktemp("golden")
    measure.main([os.path.join(GOLDEN, arch) for arch in ("vanilla", "ledger")] + [f"--out_dir={out}", *DATA])
    return {arch: metrics_json.read_metrics(out / arch) for arch in ("vanilla", "ledger")}


# ----------------------------------------------------------------------------------------------
# The keys: the table in metrics_json.py's docstring, read as a reader reads it

def expand(keys):
    """'a.{b,c}_d, e' -> ['a.b_d', 'a.c_d', 'e']."""
    out = []
    for key in re.split(r",\s*(?![^{]*})", keys):   # the commas outside braces
        braces = re.search(r"{([^}]*)}", key)
        if braces:
            out += [k for part in braces.group(1).split(",")
                    for k in expand(key[:braces.start()] + part + key[braces.end():])]
        else:
            out.append(key)
    return out


def documented():
    """{key: its tag, or None when it is always written}."""
    rows = []   # [keys, meaning]: a meaning may go on over the next, indented lines
    for line in metrics_json.__doc__.split("\nkey ", 1)[1].splitlines()[1:]:
        if line.startswith(" "):
            rows[-1][1] += " " + line.strip()
        elif line.strip():
            keys, _, meaning = line.partition("  ")
            rows.append([keys, meaning.strip()])
    tags = {}
    for keys, meaning in rows:
        tag = re.match(r"\[([a-z_ ]+)\]", meaning.strip())   # [ledger], [run dir]; not "[dim, mean |x|]"
        tags.update({key: tag and tag.group(1) for key in expand(keys)})
    return tags


def written(m, keys):
    """Every key of a metrics.json, named as the table names it; a documented key without documented
    keys below it (settings, a per-sublayer list) is one key."""
    found = set()

    def walk(value, path):
        below = [k for k in keys if k.startswith(path + ".") or k.startswith(path + "[]")] if path else keys
        if isinstance(value, dict) and below:
            for key, v in value.items():
                name = {"streams": "<stream>", "top_tokens": "<where>"}.get(path, key)
                walk(v, f"{path}.{name}" if path else name)
        elif isinstance(value, list) and any(k.startswith(path + "[]") for k in below):
            for v in value:
                walk(v, path + "[]")
        else:
            found.add(path)

    walk(m, "")
    return found


def test_measure_writes_exactly_the_documented_keys(measured):
    keys = documented()
    for arch, m in measured.items():
        got = written(m, keys)
        assert got <= set(keys), f"{arch} writes keys metrics_json.py does not document: {sorted(got - set(keys))}"
        parents = {k for k in keys if any(other.startswith(k + ".") for other in keys)}   # null, or holding the rest
        expected = {k for k, tag in keys.items() if k not in parents and tag in (None, "run dir", "checkpoint", arch)}
        assert expected <= got, f"{arch} does not write {sorted(expected - got)}"
    assert not any(k.startswith("ledger_streams.") for k in written(measured["vanilla"], keys))


@pytest.mark.parametrize("attention", [kind for kind in ATTENTIONS if kind != "softmax"])
def test_each_attention_kind_writes_its_own_documented_keys(attention, tmp_path):
    golden = torch.load(os.path.join(GOLDEN, "vanilla", "ckpt.pt"), weights_only=True)
    config = {**golden["model_config"], "attention": attention}
    torch.manual_seed(0)
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": config, "model": GPT(GPTConfig(**config)).state_dict(),
                "train_config": golden["train_config"], "iter_num": 0}, tmp_path / "ckpt.pt")
    measure.main([str(tmp_path / "ckpt.pt"), f"--out_dir={tmp_path / 'm'}", "--num_windows=4", "--interventions=False",
                  "--quantization=False", *DATA])
    keys = documented()
    got = written(metrics_json.read_metrics(tmp_path / "m"), keys)
    assert got <= set(keys), sorted(got - set(keys))
    assert {k for k, tag in keys.items() if tag == attention} <= got


# ----------------------------------------------------------------------------------------------
# The numbers: those the code before the restructure gave the golden checkpoints

# How closely each golden checkpoint must measure as before. Vanilla computes what it computed: on the
# CPU kind that wrote the golden numbers (Intel Xeon) they are the same to the last digit, and on
# another (AMD EPYC: other float32 kernels) they differ by ~6e-8 relative, so they must agree to 1e-6,
# and a loss difference (two losses) to two float32 steps of a loss, 4.8e-7.
# Ledger's model reads u with four matmuls where it had one fused matmul, which rounds differently in
# float32: its numbers agree to float32 rounding, a loss (about 3) to one float32 step of 2.4e-7, and a
# loss difference to two.
TOLERANCE = {"vanilla": dict(rtol=1e-6, atol=5e-7), "ledger": dict(rtol=1e-5, atol=5e-7)}


def test_the_golden_checkpoints_measure_to_the_numbers_the_old_code_gave(measured):
    for arch, new in measured.items():
        with open(os.path.join(GOLDEN, "measured", arch, "metrics.json")) as f:
            old = json.load(f)
        found = differences(new, old, **TOLERANCE[arch])
        assert not found, f"{arch}: " + "; ".join(found[:10])
