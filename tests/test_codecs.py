"""Tests for locotrain.codecs: exact sizes, byte layouts, error bounds, determinism."""

import math
import sys

import pytest
import torch

from locotrain.codecs import CODECS, Codec, make_codec
from locotrain.errors import UserError

SIZES = [0, 1, 2, 127, 128, 129, 1000, 1001]
THRESHOLD = 2.0 ** -6.5  # fp4: r = |x| / absmax below this decodes to zero
little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="byte layout written for little-endian")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 and 0.0 (and NaNs) count as different."""
    return t.contiguous().view(torch.int32)


def wide_range(n: int, seed: int = 0) -> torch.Tensor:
    """Normal values times 2^u, u in [-12, 0]: many of them fall below the fp4 threshold."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp2(-12 * torch.rand(n, generator=g))


def block_view(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    return list(torch.split(x, block))


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("numel", [0, 1, 127, 128, 129, 1000])
def test_nbytes_closed_forms(numel):
    nb = math.ceil(numel / 128)
    assert make_codec("fp32").nbytes(numel) == 4 * numel
    assert make_codec("bf16").nbytes(numel) == 2 * numel
    assert make_codec("int8").nbytes(numel) == numel + 4 * nb
    assert make_codec("fp4").nbytes(numel) == 4 * nb + math.ceil(numel / 2)


def test_nbytes_hand_values():
    assert [make_codec("int8").nbytes(n) for n in (0, 1, 128, 129, 1000)] == [0, 5, 132, 137, 1032]
    assert [make_codec("fp4").nbytes(n) for n in (0, 1, 127, 128, 129, 1000)] == [0, 5, 68, 68, 73, 532]
    assert make_codec("fp4", block=7).nbytes(15) == 4 * 3 + 8


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("block", [128, 7])
@pytest.mark.parametrize("numel", SIZES)
def test_encode_length_and_types(name, block, numel):
    codec = make_codec(name, block=block)
    x = wide_range(numel)
    buf = codec.encode(x)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == codec.nbytes(numel)
    out = codec.decode(buf, numel)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    assert torch.isfinite(out).all()


def test_fp4_payload_ratio():
    n = 128 * 4096
    ratio = make_codec("fp4").nbytes(n) / make_codec("fp32").nbytes(n)
    assert ratio == (0.5 + 4 / 128) / 4


# --------------------------------------------------------------------------- generic behaviour


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("numel", SIZES)
def test_roundtrip_bit_identical_to_decode_encode(name, numel):
    codec = make_codec(name, block=128)
    x = wide_range(numel, seed=1)
    x[: numel // 3] = 0.0  # include a zero region (a whole zero block when numel is large)
    slow = codec.decode(codec.encode(x), numel)
    assert torch.equal(bits(codec.roundtrip(x)), bits(slow))


@pytest.mark.parametrize("name", CODECS)
def test_roundtrip_keeps_shape(name):
    codec = make_codec(name)
    x = wide_range(3 * 50, seed=2).view(3, 50)
    out = codec.roundtrip(x)
    assert out.shape == (3, 50)
    assert torch.equal(bits(out.reshape(-1)), bits(codec.decode(codec.encode(x.reshape(-1)), 150)))


@pytest.mark.parametrize("name", CODECS)
def test_deterministic(name):
    codec = make_codec(name)
    x = wide_range(1001, seed=3)
    assert torch.equal(codec.encode(x), codec.encode(x.clone()))


@pytest.mark.parametrize("name", CODECS)
def test_decode_from_misaligned_slice(name):
    # A receiver may decode a slice of a larger message that starts at an odd byte offset.
    codec = make_codec(name)
    x = wide_range(301, seed=4)
    buf = codec.encode(x)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])[1:]
    assert torch.equal(bits(codec.decode(shifted, 301)), bits(codec.decode(buf, 301)))


@pytest.mark.parametrize("name", CODECS)
def test_rejects_wrong_inputs(name):
    codec = make_codec(name)
    with pytest.raises(TypeError):
        codec.encode(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(codec.nbytes(4) + 1, dtype=torch.uint8), 4)


def test_lossless_flags():
    assert [make_codec(n).lossless for n in CODECS] == [True, False, False, False]


def test_codec_is_abstract():
    with pytest.raises(TypeError):
        Codec()


# --------------------------------------------------------------------------- fp32, bf16


def test_fp32_exact():
    x = torch.cat([wide_range(999), torch.tensor([0.0, -0.0, 1e-45, -3.4e38, float("inf")])])
    codec = make_codec("fp32")
    buf = codec.encode(x)
    assert torch.equal(buf, x.view(torch.uint8))
    assert torch.equal(bits(codec.decode(buf, x.numel())), bits(x))
    assert torch.equal(bits(codec.roundtrip(x)), bits(x))


def test_fp32_encode_is_a_copy():
    x = torch.ones(8)
    buf = make_codec("fp32").encode(x)
    x.fill_(2.0)
    assert torch.equal(make_codec("fp32").decode(buf, 8), torch.ones(8))


def test_bf16_relative_error():
    x = wide_range(10_000, seed=5)
    out = make_codec("bf16").roundtrip(x)
    rel = ((out - x).abs() / x.abs()).max().item()
    assert 0 < rel <= 2.0 ** -8


def test_bf16_round_to_nearest_even():
    # 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
    # 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: the even one is 1 + 2^-6.
    x = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -16])
    out = make_codec("bf16").roundtrip(x)
    assert out.tolist() == [1.0, 1 + 2.0 ** -6, 1 + 2.0 ** -7]


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("block", [128, 7])
def test_int8_error_within_half_scale(block):
    x = wide_range(1001, seed=6)
    codec = make_codec("int8", block=block)
    out = codec.roundtrip(x)
    for xb, ob in zip(block_view(x, block), block_view(out, block)):
        absmax = xb.abs().max().item()
        scale = absmax / 127
        assert (ob - xb).abs().max().item() <= scale / 2 + 1e-6 * absmax
        assert ob.abs().max().item() == pytest.approx(absmax, rel=1e-6)


@little_endian
def test_int8_layout_by_hand():
    x = torch.tensor([2.54, -1.0, 0.0])
    buf = make_codec("int8").encode(x)
    assert buf.numel() == 4 + 3
    scale = torch.tensor(2.54) / 127
    assert torch.equal(buf[:4].view(torch.float32), scale.view(1))
    assert buf[4:].view(torch.int8).tolist() == [127, -50, 0]


def test_int8_zero_block_exact_zeros():
    x = wide_range(384, seed=7)
    x[128:256] = 0.0
    codec = make_codec("int8")
    buf = codec.encode(x)
    assert buf[4:8].view(torch.float32).item() == 0.0  # the zero block's scale
    out = codec.decode(buf, 384)
    assert torch.isfinite(out).all()
    assert torch.equal(bits(out[128:256]), bits(torch.zeros(128)))
    assert torch.equal(bits(codec.roundtrip(torch.zeros(5))), bits(torch.zeros(5)))


# --------------------------------------------------------------------------- fp4


def test_fp4_hand_example():
    # Block scale 1 (absmax is 1.0). r = |x|: 1 -> 2^0; 0.5 -> 2^-1; log2 0.26 = -1.94 -> 2^-2;
    # 0.75: log2 = -0.415 -> 2^0; 0.7: log2 = -0.515 -> 2^-1; 0.012: log2 = -6.38 -> 2^-6;
    # 0.01 < 2^-6.5 = 0.01105 -> 0; 0.0 -> 0.
    x = torch.tensor([1.0, -0.5, 0.26, 0.75, -0.7, 0.012, 0.01, 0.0])
    want = [1.0, -0.5, 0.25, 1.0, -0.5, 2.0 ** -6, 0.0, 0.0]
    codec = make_codec("fp4")
    assert codec.decode(codec.encode(x), 8).tolist() == want
    assert codec.roundtrip(x).tolist() == want


@little_endian
def test_fp4_layout_by_hand():
    # Codes (sign bit 3, field = k + 7): 1.0 -> 7, -0.5 -> 8|6 = 14, 0.26 -> 5, 0.01 -> 0,
    # 0.0 -> 0, then a zero pad nibble. Pairs (low, high): (7, 14) = 231, (5, 0) = 5, (0, 0) = 0.
    x = torch.tensor([1.0, -0.5, 0.26, 0.01, 0.0])
    buf = make_codec("fp4").encode(x)
    assert buf.tolist() == [0, 0, 128, 63, 231, 5, 0]  # float32 1.0 = 0x3F800000, then codes
    assert make_codec("fp4").decode(buf, 5).tolist() == [1.0, -0.5, 0.25, 0.0, 0.0]


def test_fp4_alias_and_scale_invariance():
    x = torch.tensor([1.0, -0.5, 0.26, 0.01, 0.0])
    codec = make_codec("e3m0")
    assert codec.name == "fp4"
    # Scaling a block by a power of two scales the scale only: the codes stay the same.
    assert torch.equal(codec.encode(x)[4:], codec.encode(x * 2.0 ** 5)[4:])
    assert codec.roundtrip(x * 3.0).tolist() == [3.0, -1.5, 0.75, 0.0, 0.0]


@pytest.mark.parametrize("block", [128, 7])
def test_fp4_error_bounds(block):
    x = wide_range(4001, seed=8)
    codec = make_codec("fp4", block=block)
    out = codec.roundtrip(x)
    above_seen = below_seen = 0
    for xb, ob in zip(block_view(x, block), block_view(out, block)):
        s = xb.abs().max()
        r = xb.abs() / s
        above = r >= THRESHOLD * (1 + 1e-6)
        below = r < THRESHOLD * (1 - 1e-6)
        rel = (ob[above] - xb[above]).abs() / xb[above].abs()
        assert rel.max().item() <= math.sqrt(2) - 1 + 1e-6
        assert (ob[below] == 0).all()
        # the block absmax is reproduced bit for bit
        i = xb.abs().argmax()
        assert ob[i].item() == xb[i].item()
        # every decoded magnitude is 0 or s * 2^k with k in -6..0
        nz = ob != 0
        k = torch.log2(ob[nz].abs() / s)
        assert torch.equal(k, k.round()) and k.min() >= -6 and k.max() <= 0
        # the sign survives for every nonzero value
        assert torch.equal(torch.sign(ob[nz]), torch.sign(xb[nz]))
        above_seen += int(above.sum())
        below_seen += int(below.sum())
    assert above_seen > 1000 and below_seen > 100  # both regimes really were exercised


def test_fp4_nearest_in_log_domain():
    # Just above / below the midpoint 2^-0.5 between 2^-1 and 2^0.
    mid = 2.0 ** -0.5
    x = torch.tensor([1.0, mid * 1.001, mid * 0.999, 2.0 ** -6.5 * 1.001, 2.0 ** -6.5 * 0.999])
    assert make_codec("fp4").roundtrip(x).tolist() == [1.0, 1.0, 0.5, 2.0 ** -6, 0.0]


def test_fp4_zero_block_and_zero_codes():
    x = wide_range(384, seed=9)
    x[128:256] = 0.0
    x[5] = -0.0
    codec = make_codec("fp4")
    buf = codec.encode(x)
    assert buf[4:8].view(torch.float32).item() == 0.0  # the zero block's scale
    out = codec.decode(buf, 384)
    assert torch.isfinite(out).all()
    assert torch.equal(bits(out[128:256]), bits(torch.zeros(128)))
    # zero codes never carry the sign bit, so -0.0 and tiny negatives encode as 0
    codes = buf[12:]
    nibbles = torch.stack([codes & 15, codes >> 4], 1).reshape(-1)
    assert not ((nibbles & 7) == 0).logical_and(nibbles != 0).any()
    assert torch.equal(codec.encode(torch.zeros(3)), torch.zeros(4 + 2, dtype=torch.uint8))


def test_fp4_deterministic_and_blockwise():
    x = wide_range(1000, seed=10)
    codec = make_codec("fp4", block=100)
    a, b = codec.encode(x), codec.encode(x)
    assert torch.equal(a, b)
    # blocks are independent: changing one block leaves the other blocks' output unchanged
    y = x.clone()
    y[300:400] *= 1000
    ox, oy = codec.roundtrip(x), codec.roundtrip(y)
    assert torch.equal(ox[:300], oy[:300]) and torch.equal(ox[400:], oy[400:])


# --------------------------------------------------------------------------- factory


def test_make_codec_names():
    assert CODECS == ("fp32", "bf16", "int8", "fp4")
    assert [make_codec(n).name for n in CODECS] == list(CODECS)
    assert make_codec("int8", block=64).block == 64


def test_make_codec_unknown_name():
    with pytest.raises(UserError) as err:
        make_codec("nope")
    msg = str(err.value)
    assert "\n" not in msg and "nope" in msg
    assert all(n in msg for n in CODECS)


@pytest.mark.parametrize("block", [0, -1, 1.5, True])
def test_make_codec_bad_block(block):
    with pytest.raises(UserError):
        make_codec("fp4", block=block)
