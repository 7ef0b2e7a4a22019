"""The lab's experiment: Guo et al.'s (2024) Bigram-Backcopy task ("Active-Dormant Attention Heads",
arXiv 2410.13835), where a start-token massive activation grows in a 3-layer model on a laptop.

    python prepare_data.py --dataset=bigram_backcopy         # writes data/bigram_backcopy

Each sequence opens with <bos> and follows a fixed bigram chain, except that right after a trigger
token the next token copies the token before the trigger:

    <bos>  t5 t12 t63* t12 t40 ...          t63 is a trigger, so the token after it copies t12

Only those copies need attention. Everywhere else a head has nothing to fetch, and its cheapest
no-op is to park its attention on <bos> and read a value of ~0 there (an attention sink). That sink
is the mechanism of start-token massive activations. prepare_data.py writes the sequences back to
back (each brings its own start token, so no separator goes between them), and every training
window opens on <bos>.
"""
import hashlib

import numpy as np

BOS_ID = 0  # ordinary token i has id i + 1


def bigram_table(args, plays=None):
    """(P, names): P[i] is the distribution of the token after ordinary token i.
    --bb_bigram=dirichlet draws random rows; shakespeare counts the character bigrams of `plays`."""
    if args.bb_bigram == "dirichlet":
        rng = np.random.default_rng([args.seed, 0])
        return rng.dirichlet(np.full(args.bb_vocab, args.bb_alpha), size=args.bb_vocab), \
            [f"t{i}" for i in range(args.bb_vocab)]
    # a chain with the statistics of real text, delimiters included
    chars = sorted(set(plays))
    ids = np.searchsorted(chars, list(plays))
    counts = np.ones((len(chars), len(chars)))  # add-one: every row is a distribution
    np.add.at(counts, (ids[:-1], ids[1:]), 1)
    return counts / counts.sum(1, keepdims=True), [repr(c) for c in chars]


def frequent_tokens(P, k):
    """The k most frequent tokens of the chain (its stationary distribution, by power iteration):
    frequent triggers make copies common enough to learn quickly."""
    pi = np.full(len(P), 1 / len(P))
    for _ in range(500):
        pi = pi @ P
    return np.sort(np.argsort(-pi, kind="stable")[:k])


def bigram_backcopy_sequences(P, triggers, n, seq_len, rng):
    """(n, 1 + seq_len) ids: <bos>, then the chain with its copy rule."""
    is_trigger = np.zeros(len(P), bool)
    is_trigger[triggers] = True
    cdf = P.cumsum(1)
    cdf[:, -1] = 1.0
    x = np.zeros((n, seq_len + 1), np.int64)  # ordinary-token indices; column 0 becomes <bos>
    x[:, 1] = rng.choice(np.flatnonzero(~is_trigger), n)  # a trigger needs a token before it
    for t in range(2, seq_len + 1):
        prev = x[:, t - 1]
        drawn = (rng.random(n)[:, None] > cdf[prev]).sum(1).clip(max=len(P) - 1)  # inverse CDF
        x[:, t] = np.where(is_trigger[prev], x[:, t - 2], drawn)
    x += 1
    x[:, BOS_ID] = BOS_ID
    return x


def process_loss(P, triggers, seqs):
    """Mean cross entropy of the generating process itself on seqs' targets (positions 1..): the
    floor a perfect model reaches. Copies cost 0 nats; the first token is uniform over non-triggers."""
    ordinary = seqs[:, 1:] - 1
    is_trigger = np.isin(ordinary[:, :-1], triggers)
    nll = -np.log(P[ordinary[:, :-1], ordinary[:, 1:]])
    first = np.log(len(P) - len(triggers))
    return float((first + np.where(is_trigger, 0.0, nll).sum(1)).mean() / ordinary.shape[1])


class TokenNames:
    """The task's vocabulary: ids decode to readable names ('<bos>', 't17', 't3*' for a trigger).
    Sequences are written as ids directly, so there is nothing to encode and no separator."""
    name = "names"

    def __init__(self, itos):
        self.itos = list(itos)
        self.vocab_size, self.eot_id = len(self.itos), None

    def decode(self, ids):
        return " ".join(self.itos[i] for i in ids)

    def spec(self):
        return {"tokenizer": self.name, "itos": self.itos}


def dataset(args, P, names, dtype, chunk=10_000):
    """What prepare_data.py writes for table P: (vocabulary, documents, meta entries). Each sequence
    is one document, yielded as ((split, sha256 of its ids), ids as `dtype`)."""
    triggers = frequent_tokens(P, args.bb_triggers)
    itos = ["<bos>"] + [n + "*" * (i in triggers) for i, n in enumerate(names)]

    # val is small and also scores the process; train is made in chunks, so memory stays flat
    val = bigram_backcopy_sequences(P, triggers, args.bb_val_seqs, args.bb_seq_len, np.random.default_rng([args.seed, 2]))

    def documents():
        rng = np.random.default_rng([args.seed, 1])
        train = (seq for start in range(0, args.bb_train_seqs, chunk) for seq in bigram_backcopy_sequences(
            P, triggers, min(chunk, args.bb_train_seqs - start), args.bb_seq_len, rng))
        for split, seqs in (("train", train), ("val", val)):
            for seq in seqs:
                ids = seq.astype(dtype)
                yield (split, hashlib.sha256(ids.tobytes()).digest()), ids

    meta = {"bos_id": BOS_ID, "seq_len": args.bb_seq_len + 1, "triggers": [int(t) + 1 for t in triggers],
            "bigram": args.bb_bigram, "process_val_loss": process_loss(P, triggers, val),
            "source": f"synthetic Bigram-Backcopy (Guo et al. 2024), {args.bb_bigram} bigram table, seed {args.seed}",
            "source_sha256": None}
    return TokenNames(itos), documents(), meta
