import hashlib

import torch

from locotrain.data import CharTokenizer, load_corpus, make_shards, read_text, val_windows


def test_builtin_corpus_is_tiny_shakespeare():
    name, text = read_text("")
    assert name == "tinyshakespeare"
    assert len(text) == 1_115_394
    assert len(set(text)) == 65
    assert hashlib.md5(text.encode()).hexdigest() == "6fb458f1232090904fb40fe944165e91"


def test_standard_split_sizes():
    corpus = load_corpus("", 0.9)
    assert len(corpus.train) == 1_003_854
    assert len(corpus.val) == 111_540
    assert corpus.tokenizer.vocab_size == 65


def test_tokenizer_round_trip():
    _, text = read_text("")
    tok = CharTokenizer("".join(sorted(set(text))))
    sample = text[5000:7000]
    ids = tok.encode(sample)
    assert all(0 <= i < 65 for i in ids)
    assert tok.decode(ids) == sample


def test_val_windows_are_fixed_and_non_overlapping():
    val = torch.arange(1000)
    w = val_windows(val, 65)
    assert w.shape == (15, 65)
    assert torch.equal(w.flatten(), val[: 15 * 65])  # consecutive, no overlap, no gaps
    sub = val_windows(val, 65, limit=4)
    assert sub.shape == (4, 65)
    assert torch.equal(sub, val_windows(val, 65, limit=4))  # the same subset every time
    assert all(any(torch.equal(r, x) for x in w) for r in sub)


def test_shards_iid_partition_blocks_and_contiguous_are_disjoint_ranges():
    train = torch.arange(100_000)
    shards = make_shards(train, 4, "iid", window=65, seed=0)
    starts = torch.cat([s.block_starts for s in shards])
    assert len(set(starts.tolist())) == len(starts)  # every block belongs to one worker
    assert {len(s.block_starts) for s in shards} <= {len(starts) // 4, len(starts) // 4 + 1}
    g = torch.Generator().manual_seed(0)
    for s in shards:
        batch = s.batch(16, 65, g)
        assert batch.shape == (16, 65)
        # windows are consecutive characters inside one of this worker's blocks
        assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)
        owner = batch[:, 0] - batch[:, 0] % s.block_len
        assert set(owner.tolist()) <= set(s.block_starts.tolist())
    contiguous = make_shards(train, 4, "contiguous", window=65, seed=0)
    for m, s in enumerate(contiguous):
        batch = s.batch(64, 65, g)
        assert batch.min() >= m * 25_000 and batch.max() < (m + 1) * 25_000


def test_the_corpus_ids_are_the_tokenizers(tmp_path):
    """load_corpus encodes with tensor operations; it must agree with CharTokenizer.encode,
    characters outside the Basic Multilingual Plane included."""
    path = tmp_path / "mixed.txt"
    path.write_text("Zebra apple \u00e9t\u00e9 \U0001f600 zoo\n" * 50, encoding="utf-8")
    corpus = load_corpus(str(path), 0.5)
    text = read_text(str(path))[1]
    expected = torch.tensor(corpus.tokenizer.encode(text))
    assert torch.equal(torch.cat([corpus.train, corpus.val]), expected)
