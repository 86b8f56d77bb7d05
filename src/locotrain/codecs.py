"""Payload codecs for the flat float32 vectors that algorithms exchange (outer gradients).

A codec turns a 1-D float32 tensor into a 1-D uint8 buffer and back. `nbytes(numel)` is the
exact length of that buffer, so the network model charges the real message size, and the
receiver gets the real quantised values, not the sender's originals.

Formats (`block` = values per scaling block, default 128; the last block may be shorter):

  fp32  4 bytes per value, the raw bytes; lossless.
  bf16  2 bytes per value, round-to-nearest-even to bfloat16.
  int8  per block: scale = absmax / 127 (float32), codes q = round(x / scale) in [-127, 127].
        An all-zero block has scale 0 and decodes to exact zeros.
        Bytes: all scales (float32), then all codes (int8).
        nbytes = numel + 4 * ceil(numel / block).
        Block-wise absmax int8 for pseudo-gradients follows PRIME / INTELLECT-1
        (arXiv 2412.01152).
  fp4   E3M0, the 4-bit format that Streaming DiLoCo (arXiv 2501.18512) uses for outer
        gradients; the concrete layout below is our own. A code is 1 sign bit (bit 3) and a
        3-bit exponent field (bits 0-2), no mantissa. Field 0 is zero; field f in 1..7 is
        2^(f-7) (2^-6 .. 2^0) times the block scale s = absmax(block), stored as float32, so
        the largest value of a block is reproduced exactly. With r = |x| / s the exponent is
        k = round(log2 r) (nearest in the log domain), clamped to [-6, 0]; r < 2^-6.5 is zero.
        Two codes per byte: element 2i in the low nibble, 2i+1 in the high nibble; an odd
        numel pads a zero nibble. Bytes: all scales (float32), then the packed codes.
        nbytes = 4 * ceil(numel / block) + ceil(numel / 2).

Everything is deterministic and vectorised; multi-byte values use the host's byte order.
Non-finite inputs are not supported by the scaled codecs.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

from .errors import UserError

CODECS = ("fp32", "bf16", "int8", "fp4")
_ALIASES = {"e3m0": "fp4"}


# --------------------------------------------------------------------------- helpers


def _check_numel(numel: int) -> None:
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")


def _nblocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as (nblocks, block), the tail padded with zeros (zeros never change an absmax)."""
    nb = _nblocks(x.numel(), block)
    pad = nb * block - x.numel()
    if pad:
        x = F.pad(x, (0, pad))
    return x.view(nb, block)


def _per_value(scales: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """Each block's scale repeated for every value of that block."""
    return scales.repeat_interleave(block)[:numel]


def _reinterpret(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View uint8 bytes as `dtype`. A slice of a larger buffer may start at an offset that is
    not a multiple of the item size, which view() refuses; a copy (offset 0) fixes that."""
    size = torch.empty((), dtype=dtype).element_size()
    if not buf.is_contiguous() or buf.storage_offset() % size:
        buf = buf.clone()
    return buf.view(dtype)


# --------------------------------------------------------------------------- base


class Codec(abc.ABC):
    """Encodes a flat float32 tensor into exactly `nbytes(numel)` bytes and back."""

    name: str
    lossless: bool = False

    @abc.abstractmethod
    def nbytes(self, numel: int) -> int:
        """Exact length of encode()'s output for a tensor of `numel` values."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """1-D float32 -> 1-D uint8 of nbytes(x.numel()) elements, on x.device."""

    @abc.abstractmethod
    def decode(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        """Bytes from encode() -> 1-D float32 of `numel` values, on buf.device."""

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What the receiver gets for x, in x's shape: bit-identical to decode(encode(x))."""
        flat = x.reshape(-1)
        self._check_input(flat)
        return self._roundtrip_flat(flat).reshape(x.shape)

    def _roundtrip_flat(self, x: torch.Tensor) -> torch.Tensor:
        # Subclasses may skip the byte packing, as long as the values stay bit-identical.
        return self.decode(self.encode(x), x.numel())

    def _check_input(self, x: torch.Tensor) -> None:
        # Catch callers that pass bf16 or unflattened tensors, instead of sizing them wrongly.
        if x.dtype != torch.float32:
            raise TypeError(f"{self.name} codec expects float32, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{self.name} codec expects a 1-D tensor, got shape {tuple(x.shape)}")

    def _check_buf(self, buf: torch.Tensor, numel: int) -> None:
        want = self.nbytes(numel)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
            raise ValueError(
                f"{self.name} codec: expected {want} uint8 bytes for {numel} values, "
                f"got {buf.dtype} of shape {tuple(buf.shape)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------- unscaled


class Fp32Codec(Codec):
    name = "fp32"
    lossless = True

    def nbytes(self, numel: int) -> int:
        _check_numel(numel)
        return 4 * numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x.contiguous().view(torch.uint8).clone()  # a copy: later edits of x must not leak

    def decode(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        self._check_buf(buf, numel)
        return _reinterpret(buf, torch.float32).clone()

    def _roundtrip_flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class Bf16Codec(Codec):
    name = "bf16"

    def nbytes(self, numel: int) -> int:
        _check_numel(numel)
        return 2 * numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x.to(torch.bfloat16).view(torch.uint8)  # .to rounds to nearest, ties to even

    def decode(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        self._check_buf(buf, numel)
        return _reinterpret(buf, torch.bfloat16).float()

    def _roundtrip_flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).float()


# --------------------------------------------------------------------------- block-scaled


class _BlockScaled(Codec):
    """Shared layout of int8 and fp4: one float32 scale per block, then the packed codes."""

    def __init__(self, block: int = 128):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        self.block = block

    def nbytes(self, numel: int) -> int:
        _check_numel(numel)
        return 4 * _nblocks(numel, self.block) + self._code_bytes(numel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        scales, codes = self._quantise(x)
        return torch.cat([scales.view(torch.uint8), self._pack(codes)])

    def decode(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        self._check_buf(buf, numel)
        cut = 4 * _nblocks(numel, self.block)
        scales = _reinterpret(buf[:cut], torch.float32)
        return self._dequantise(scales, self._unpack(buf[cut:], numel), numel)

    def _roundtrip_flat(self, x: torch.Tensor) -> torch.Tensor:
        # Same quantise/dequantise as encode/decode, without the (lossless) byte packing.
        scales, codes = self._quantise(x)
        return self._dequantise(scales, codes, x.numel())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block={self.block})"

    @abc.abstractmethod
    def _code_bytes(self, numel: int) -> int:
        """Bytes taken by the codes of `numel` values."""

    @abc.abstractmethod
    def _quantise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (float32 scale per block, one code per value)."""

    @abc.abstractmethod
    def _dequantise(self, scales: torch.Tensor, codes: torch.Tensor, numel: int) -> torch.Tensor:
        """Inverse of _quantise, up to the quantisation error."""

    @abc.abstractmethod
    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """One code per value -> uint8 bytes."""

    @abc.abstractmethod
    def _unpack(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        """uint8 bytes -> one code per value."""


class Int8Codec(_BlockScaled):
    name = "int8"

    def _code_bytes(self, numel: int) -> int:
        return numel

    def _quantise(self, x):
        blocks = _as_blocks(x, self.block)
        scales = blocks.abs().amax(dim=1) / 127
        # An all-zero block has scale 0: divide by 1 instead, so its codes are 0, not NaN.
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return scales, q.reshape(-1)[: x.numel()]

    def _dequantise(self, scales, codes, numel):
        return codes.float() * _per_value(scales, self.block, numel)

    def _pack(self, codes):
        return codes.view(torch.uint8)

    def _unpack(self, data, numel):
        return data.view(torch.int8)


# fp4 code -> multiple of the block scale. Bit 3 is the sign, bits 0-2 the exponent field.
_E3M0_VALUES = tuple(
    (-1.0 if code & 8 else 1.0) * (2.0 ** ((code & 7) - 7) if code & 7 else 0.0)
    for code in range(16)
)
# sqrt(1/2) rounded to float32 and kept as a Python float that float32 represents exactly, so
# the rounding boundary is the same whatever precision a device compares in.
_SQRT_HALF = float(torch.tensor(math.sqrt(0.5), dtype=torch.float32))


class Fp4Codec(_BlockScaled):
    name = "fp4"

    def _code_bytes(self, numel: int) -> int:
        return (numel + 1) // 2

    def _quantise(self, x):
        blocks = _as_blocks(x, self.block)
        scales = blocks.abs().amax(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        r = blocks.abs() / safe[:, None]  # in [0, 1]; exactly 1 at the absmax
        # round(log2 r) without log2, whose last bit can differ between CPU and GPU:
        # r = m * 2^e with m in [0.5, 1), so the nearest power of two is 2^e when
        # m >= sqrt(1/2) and 2^(e-1) otherwise. Exact, hence the same on every device.
        m, e = torch.frexp(r)
        k = (e - (m < _SQRT_HALF).to(e.dtype)).clamp_(max=0)
        # k < -6 is exactly r < 2^-6 * sqrt(1/2); frexp(0) = (0, 0) needs its own test.
        zero = (k < -6) | (r == 0)
        field = torch.where(zero, torch.zeros_like(k), k + 7)
        negative = (blocks < 0) & ~zero  # zero codes never carry a sign
        codes = (field | (negative.to(field.dtype) << 3)).to(torch.uint8)
        return scales, codes.reshape(-1)[: x.numel()]

    def _dequantise(self, scales, codes, numel):
        table = torch.tensor(_E3M0_VALUES, dtype=torch.float32, device=codes.device)
        # Powers of two times the scale: exact, so the absmax comes back bit for bit.
        return table[codes.long()] * _per_value(scales, self.block, numel)

    def _pack(self, codes):
        if codes.numel() % 2:
            codes = F.pad(codes, (0, 1))
        pairs = codes.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def _unpack(self, data, numel):
        codes = torch.stack([data & 0x0F, data >> 4], dim=1).reshape(-1)
        return codes[:numel]


# --------------------------------------------------------------------------- packing


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors -> one flat float32 vector (what a codec encodes), in the given order."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of flatten: views of `flat` shaped (and typed) like `like`."""
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


# --------------------------------------------------------------------------- factory


def make_codec(name: str, block: int = 128) -> Codec:
    """A codec by name: fp32, bf16, int8 or fp4 (alias e3m0); `block` is for int8 and fp4."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in CODECS:
        raise UserError(f"unknown codec {name!r}; valid names: {', '.join(CODECS)} (alias e3m0 = fp4)")
    if key == "fp32":
        return Fp32Codec()
    if key == "bf16":
        return Bf16Codec()
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UserError(f"codec block must be a positive integer, got {block!r}")
    return Int8Codec(block) if key == "int8" else Fp4Codec(block)
