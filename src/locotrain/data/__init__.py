"""Corpus loading, the character tokenizer, the train/validation split and worker shards.

Tiny Shakespeare (public domain, karpathy/char-rnn's input.txt, 1,115,394 characters) ships
inside the package, gzip-compressed, so a fresh install trains with no network.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import UserError

BUILTIN = "tinyshakespeare"


class CharTokenizer:
    """One id per distinct character of the corpus, in code-point order."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        missing = sorted({c for c in text if c not in self.index})
        if missing:
            raise UserError(f"text contains characters outside the model's vocabulary: "
                            f"{''.join(missing)!r}; use only characters of the training corpus")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass
class Corpus:
    name: str
    tokenizer: CharTokenizer
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor
    sha256: str = ""  # of the corpus file's bytes (UTF-8)
    chars: int = 0


def check_content(corpus: Corpus, sha256: str, chars: int) -> None:
    """A config that names the corpus's content (data.sha256, data.chars, as a run's
    config.toml does) must get that content: a rebuilt or edited file would silently change
    what the run trains on, and a resumed run would mix two texts."""
    if sha256 and sha256.lower() != corpus.sha256:
        raise UserError(f"corpus '{corpus.name}' has sha256 {corpus.sha256[:16]}..., but "
                        f"data.sha256 = {sha256[:16]}...: the file is not the text this config "
                        "was made with; restore that file, or set data.sha256 = \"\" to accept it")
    if chars and chars != corpus.chars:
        raise UserError(f"corpus '{corpus.name}' has {corpus.chars:,} characters, but data.chars "
                        f"= {chars:,}; restore the file this config was made with, or set "
                        "data.chars = 0 to accept it")


def read_text(path: str) -> tuple[str, str]:
    """(name, text) of the corpus; "" is the built-in Tiny Shakespeare."""
    if not path:
        blob = resources.files("locotrain.data").joinpath("tinyshakespeare.txt.gz").read_bytes()
        return BUILTIN, gzip.decompress(blob).decode("utf-8")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"data.path '{path}' is a folder; set it to one UTF-8 text file (join "
                        "the folder's texts into one) or leave it empty for Tiny Shakespeare")
    if not p.is_file():
        raise UserError(f"corpus file '{path}' does not exist; set data.path to a UTF-8 text file "
                        "or leave it empty for the built-in Tiny Shakespeare")
    raw = p.read_bytes()
    if not raw.strip():
        raise UserError(f"corpus file '{path}' is empty; give a text file with some content")
    if b"\x00" in raw:
        raise UserError(f"corpus file '{path}' looks binary (it contains NUL bytes); "
                        "data.path must be a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file '{path}' is not UTF-8 text (bad byte at offset {e.start}); "
                        "convert it to UTF-8 first") from None
    return p.name, text


def load_corpus(path: str, train_fraction: float, min_val_len: int = 2) -> Corpus:
    name, text = read_text(path)
    # strict UTF-8 decoding is lossless, so this is the file's own SHA-256 (`sha256sum FILE`)
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    tokenizer = CharTokenizer("".join(sorted(set(text))))
    ids = _encode_all(text, tokenizer.chars)
    n_train = int(train_fraction * len(ids))
    train, val = ids[:n_train], ids[n_train:]
    if len(val) < min_val_len or len(train) < min_val_len:
        raise UserError(f"corpus '{name}' is too short ({len(ids)} characters) for one training "
                        f"and one validation window of {min_val_len} characters; "
                        "use a longer text or a shorter model.seq_len")
    return Corpus(name, tokenizer, train, val, sha256, len(text))


def _encode_all(text: str, chars: str) -> torch.Tensor:
    """CharTokenizer.encode for a text whose vocabulary is `chars` (sorted, complete), in
    tensor operations: the code points, looked up in the sorted vocabulary. A Python list of
    29M ids took 3.3 s to build; this takes a fraction of that."""
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    vocab = torch.tensor([ord(c) for c in chars], dtype=torch.int32)
    return torch.searchsorted(vocab, codes).long()


def val_windows(val: torch.Tensor, length: int, limit: int = 0) -> torch.Tensor:
    """Fixed, non-overlapping windows from the start of the validation text: (W, length).

    `limit` keeps an evenly spaced subset of W' windows (the same subset every run)."""
    n = len(val) // length
    windows = val[: n * length].view(n, length)
    if 0 < limit < n:
        windows = windows[torch.linspace(0, n - 1, limit).round().long()]
    return windows


class Shard:
    """The part of the training text one worker samples windows from.

    The training text is cut into equal blocks. `contiguous` gives worker m the m-th run of
    consecutive blocks (non-i.i.d.: each worker sees one part of the play); `iid` deals
    blocks shuffled with the seed round-robin. Windows never straddle two blocks.
    """

    def __init__(self, tokens: torch.Tensor, block_starts: torch.Tensor, block_len: int):
        self.tokens = tokens
        self.block_starts = block_starts
        self.block_len = block_len

    def starts(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """Where the next (batch_size) windows of `length` start: uniform over this shard."""
        blocks = torch.randint(len(self.block_starts), (batch_size,), generator=generator)
        offsets = torch.randint(self.block_len - length + 1, (batch_size,), generator=generator)
        return self.block_starts[blocks] + offsets

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, length) windows drawn uniformly from this shard."""
        return windows_at(self.tokens, self.starts(batch_size, length, generator), length)


def windows_at(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """The windows of `length` tokens at `starts` (any shape), gathered on tokens' device."""
    starts = starts.to(tokens.device, non_blocking=True)
    return tokens[starts[..., None] + torch.arange(length, device=tokens.device)]


def make_shards(train: torch.Tensor, workers: int, mode: str, window: int, seed: int) -> list[Shard]:
    if mode == "contiguous":
        block_len = len(train) // workers
        if block_len < window:
            raise UserError(f"training text ({len(train)} characters) is too short to give "
                            f"{workers} workers a contiguous shard of at least one window")
        return [Shard(train, torch.tensor([m * block_len]), block_len) for m in range(workers)]
    block_len = max(1024, 4 * window)
    n_blocks = len(train) // block_len
    if n_blocks < workers:
        block_len = len(train) // workers
        n_blocks = workers
        if block_len < window:
            raise UserError(f"training text ({len(train)} characters) is too short for "
                            f"{workers} workers with windows of {window} characters")
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    starts = order * block_len
    return [Shard(train, starts[m::workers].sort().values, block_len) for m in range(workers)]
