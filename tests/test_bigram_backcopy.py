"""The laptop lab's contracts: the Bigram-Backcopy data obey their rules, and every window that
training, evaluation and measurement look at opens on the start token, so position 0 is <bos>."""
import numpy as np
import pytest

from ledgerlab import bigram_backcopy
import measure
import prepare_data
from ledgerlab import cli
from ledgerlab import rundir
import train
from ledgerlab.bigram_backcopy import BOS_ID, bigram_backcopy_sequences, process_loss
from ledgerlab import data

SMALL = ["--dataset=bigram_backcopy", "--bb_vocab=8", "--bb_triggers=2", "--bb_seq_len=16",
         "--bb_train_seqs=400", "--bb_val_seqs=50"]


def bb_args(*extra):
    return prepare_data.parse_args([*SMALL, *extra])


@pytest.fixture(scope="module")
def bb_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    prepare_data.main([*SMALL, f"--out_root={root}"])
    return str(root), "bigram_backcopy"


def read_split(data_root, split="train"):
    meta = data.load_meta(f"{data_root}/bigram_backcopy")
    return np.asarray(data.open_split(f"{data_root}/bigram_backcopy", split, meta)), meta


def test_the_generator_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_data.main([*SMALL, f"--out_root={tmp_path / name}", f"--seed={seed}"])
    a, b, c = (read_split(tmp_path / n)[0] for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_every_sequence_opens_on_bos_and_every_trigger_is_followed_by_the_token_before_it(bb_data):
    tokens, meta = read_split(bb_data[0])
    assert meta["seq_len"] == 17 and meta["tokenizer"] == "names" and meta["eot_id"] is None
    seqs = tokens.reshape(-1, meta["seq_len"])
    assert len(seqs) == 400
    assert (seqs[:, 0] == BOS_ID).all() and (seqs[:, 1:] != BOS_ID).all()
    triggers = meta["triggers"]
    assert len(triggers) == 2 and all(meta["itos"][t].endswith("*") for t in triggers)
    after_trigger = np.isin(seqs[:, 1:-1], triggers)
    assert after_trigger.sum() > 100   # the rule is exercised, not vacuous
    assert (seqs[:, 2:][after_trigger] == seqs[:, :-2][after_trigger]).all()
    assert data.decoder(meta)([0, triggers[0]]) == f"<bos> {meta['itos'][triggers[0]]}"


def test_ordinary_transitions_follow_the_bigram_table():
    # 40,000 x 32 draws from an 8-token table: each row is seen >= 15,000 times, so a frequency
    # is within 0.015 of its probability at well over 5 standard errors (sd <= 0.5 / sqrt(15000)).
    args = bb_args()
    P, _ = bigram_backcopy.bigram_table(args)
    triggers = bigram_backcopy.frequent_tokens(P, 2)
    seqs = bigram_backcopy_sequences(P, triggers, 40_000, 32, np.random.default_rng(7)) - 1
    prev, nxt = seqs[:, 1:-1].ravel(), seqs[:, 2:].ravel()
    ordinary = ~np.isin(prev, triggers)
    counts = np.zeros_like(P)
    np.add.at(counts, (prev[ordinary], nxt[ordinary]), 1)
    seen = counts.sum(1)
    rows = np.flatnonzero(~np.isin(np.arange(len(P)), triggers))
    assert seen[rows].min() > 15_000
    assert np.abs(counts[rows] / seen[rows, None] - P[rows]).max() < 0.015


def test_the_process_loss_of_a_uniform_chain_without_triggers_is_log_vocab():
    P = np.full((5, 5), 0.2)
    seqs = bigram_backcopy_sequences(P, np.array([], int), 100, 10, np.random.default_rng(0))
    assert process_loss(P, np.array([], int), seqs) == pytest.approx(np.log(5))


def test_bad_bigram_backcopy_settings_are_one_line_errors(tmp_path, capsys):
    for bad in ("--bb_triggers=8", "--bb_alpha=0", "--bb_bigram=zipf", "--tokenizer=char", "--val_fraction=0.1"):
        with pytest.raises(SystemExit) as e:
            prepare_data.main([*SMALL, f"--out_root={tmp_path}", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (bad, err)
    assert not (tmp_path / "bigram_backcopy" / "meta.json").exists()


def test_training_and_evaluation_windows_open_on_bos(bb_data, tmp_path, monkeypatch):
    seen = []
    real_get_batch = train.get_batch

    def spy(data_dir, meta, split, *rest):
        x, y = real_get_batch(data_dir, meta, split, *rest)
        seen.append((split, x[:, 0].tolist()))
        return x, y

    monkeypatch.setattr(train, "get_batch", spy)
    data_root, dataset = bb_data
    train.main([f"--data_root={data_root}", f"--dataset={dataset}", f"--out_dir={tmp_path}", "--n_layer=1",
                "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=3",
                "--eval_interval=3", "--eval_iters=2", "--ckpt_interval=0", "--device=cpu"])
    assert {split for split, _ in seen} == {"train", "val"}
    assert all(first == [BOS_ID] * 4 for _, first in seen)
    ckpt = rundir.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["train_config"]["align_windows"] is True    # resolved from the dataset, and recorded

    # measurement places its windows as training did
    cfg = measure.MeasureConfig(num_windows=6, batch_size=3, figures=False, interventions=False, quantization=False)
    m = measure.measure_checkpoint(str(tmp_path / "ckpt.pt"), ckpt, cfg, str(tmp_path / "m"), {"distance": None})
    assert m["settings"]["align_windows"] is True
    data = measure.open_data(ckpt, cfg, "ckpt")
    starts = measure.window_starts(data, cfg, 16, True)
    assert (data.tokens[starts.numpy()] == BOS_ID).all()


def test_unaligned_windows_of_text_can_be_aligned_to_the_end_of_text_token(char_data):
    data_root, dataset = char_data
    data_dir = f"{data_root}/{dataset}"
    meta = data.load_meta(data_dir)
    x, _ = train.get_batch(data_dir, meta, "train", [0, 0, 0, 0], 16, 32, "cpu", True)
    assert (x[:, 0] == meta["eot_id"]).all()
    x, _ = train.get_batch(data_dir, meta, "train", [0, 0, 0, 0], 16, 32, "cpu", False)
    assert not (x[:, 0] == meta["eot_id"]).all()


def test_sgd_is_an_optimizer_choice_and_a_resume_must_keep_it(bb_data, tmp_path, capsys):
    data_root, dataset = bb_data
    common = [f"--data_root={data_root}", f"--dataset={dataset}", f"--out_dir={tmp_path}", "--n_layer=1",
              "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=8", "--eval_interval=20",
              "--eval_iters=2", "--ckpt_interval=0", "--device=cpu", "--learning_rate=0.3", "--warmup_iters=0"]
    train.main([*common, "--optimizer=sgd", "--max_iters=20"])
    ckpt = rundir.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert "momentum_buffer" in str(ckpt["optimizer"]["state"][0].keys())
    with pytest.raises(cli.ConfigError, match="optimizer=sgd"):
        train.main([*common, "--max_iters=30", "--init_from=resume"])
