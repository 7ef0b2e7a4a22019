"""Shared test set-up: the offline GPT-2 tokenizer files, a `slow` marker, and one tiny dataset."""
import os
import random
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# CI clones the repo with ../shared beside it; tiktoken reads the GPT-2 BPE files from there.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(REPO, "..", "shared", "tiktoken_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by `make test`)")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A small char-level dataset with learnable structure (`data_root`, `dataset`)."""
    import prepare_data

    root = tmp_path_factory.mktemp("char_data")
    rng = random.Random(0)
    words = "the king and queen of a castle shall speak to thee my lord now".split()
    for d in range(12):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(300))
        (root / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    prepare_data.main(["--dataset=text", f"--input={root}/doc*.txt", "--tokenizer=char",
                       f"--out_root={root}/data", "--num_proc=1"])
    return str(root / "data"), "text_char"
