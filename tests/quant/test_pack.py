"""Pack / unpack round trips for every bit width, and the v1 / v2 zero conventions."""

import pytest
import torch

from quant.format import FORMAT_V1, FORMAT_V2, FormatError, LayerShape, max_code, packed_rows
from quant.pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,n", [(64, 32), (576, 192), (96, 64)])
def test_qweight_round_trip_includes_extreme_codes(bits, k, n):
    if k % (32 if bits == 3 else 32 // bits):
        pytest.skip("not packable")
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, max_code(bits) + 1, (k, n), generator=g, dtype=torch.int32)
    codes[0, :] = 0
    codes[1, :] = max_code(bits)
    codes[:, 0] = max_code(bits)
    packed = pack_qweight(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(k, bits), n)
    assert torch.equal(unpack_qweight(packed, bits, k), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", [FORMAT_V1, FORMAT_V2])
def test_qzeros_round_trip_including_zero_point_zero(bits, fmt):
    n = 96 if bits == 3 else 64
    g = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, max_code(bits) + 1, (5, n), generator=g, dtype=torch.int32)
    zeros[0] = 0  # asymmetric zero of 0: v1 stores -1, which must not leak into neighbours
    zeros[1] = max_code(bits)
    packed = pack_qzeros(zeros, bits, fmt)
    assert packed.shape == (5, packed_rows(n, bits))
    assert torch.equal(unpack_qzeros(packed, bits, n, fmt), zeros)


@pytest.mark.parametrize("bits,v1_word,v2_word", [
    (4, 0x77777777, 0x88888888), (8, 0x7F7F7F7F, 0x80808080), (2, 0x55555555, 0xAAAAAAAA)])
def test_symmetric_zero_words(bits, v1_word, v2_word):
    zeros = torch.full((3, 64), 1 << (bits - 1), dtype=torch.int32)
    v1 = pack_qzeros(zeros, bits, FORMAT_V1)
    v2 = pack_qzeros(zeros, bits, FORMAT_V2)
    assert (v1.to(torch.int64) & 0xFFFFFFFF).eq(v1_word).all()
    assert (v2.to(torch.int64) & 0xFFFFFFFF).eq(v2_word).all()


def test_three_bit_bitstream_layout():
    """Value i occupies stream bits 3i..3i+2; values 10 and 21 straddle words."""
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10, 0] = 0b111
    words = pack_qweight(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[0, 0] == 0b11 << 30 and words[1, 0] == 1 and words[2, 0] == 0
    codes.zero_()
    codes[21, 0] = 0b101
    words = pack_qweight(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[0, 0] == 0 and words[1, 0] == 1 << 31 and words[2, 0] == 0b10
    codes.zero_()
    codes[31, 0] = 0b011
    words = pack_qweight(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[2, 0] == 0b011 << 29


def test_four_bit_nibble_order():
    codes = torch.arange(8, dtype=torch.int32).reshape(8, 1)
    word = int(pack_qweight(codes, 4)[0, 0]) & 0xFFFFFFFF
    assert word == 0x76543210


def test_shapes_refuse_unpackable_sizes():
    with pytest.raises(FormatError, match="multiple of 8"):
        LayerShape(100, 64, 4, 32)
    with pytest.raises(FormatError, match="bits=5"):
        LayerShape(64, 64, 5, 32)
    shape = LayerShape(576, 192, 4, 128)  # SmolLM2: last group partial
    assert shape.num_groups == 5 and shape.qweight == (72, 192) and shape.qzeros == (5, 24)
    assert LayerShape(576, 192, 3, -1).qweight == (54, 192)
