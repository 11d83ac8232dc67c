"""Pack / unpack b-bit codes into GPTQ int32 words (layout defined in `quant.format`).

Codes are packed little-endian along one axis: value i of a run sits at stream bits b*i .. b*i+b-1,
stream bit s being bit (s mod 32) of word (s div 32). For 2/4/8 bits a run is one word; for 3 bits
a run of 32 values fills 3 words and values 10 and 21 straddle words. Every field is masked, so a
stored -1 (an asymmetric v1 zero of 0) cannot corrupt its neighbours.
"""

from __future__ import annotations

import torch

from quant.format import check_bits, max_code, pack_unit, packed_rows, zero_offset

_U32 = 1 << 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 values -> int32 with the same bits."""
    words = words & (_U32 - 1)
    return torch.where(words >= (1 << 31), words - _U32, words).to(torch.int32)


def _pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [L, X] (any int dtype, values 0..2^b-1) -> int32 [packed_rows(L), X]."""
    values, words = pack_unit(bits)
    length, width = codes.shape
    rows = packed_rows(length, bits)
    c = (codes.to(torch.int64) & max_code(bits)).reshape(length // values, values, width)
    out = torch.zeros(length // values, words, width, dtype=torch.int64, device=codes.device)
    for i in range(values):
        bit = bits * i
        w, off = divmod(bit, 32)
        out[:, w] |= (c[:, i] << off) & (_U32 - 1)
        spill = off + bits - 32
        if spill > 0:  # 3-bit values 10 and 21 continue in the next word
            out[:, w + 1] |= c[:, i] >> (bits - spill)
    return _to_int32(out.reshape(rows, width))


def _unpack_dim0(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 [packed_rows(length), X] -> int32 codes [length, X]."""
    values, words = pack_unit(bits)
    rows = packed_rows(length, bits)
    if packed.shape[0] != rows:
        raise ValueError(f"expected {rows} packed rows for {length} values at {bits} bits, "
                         f"got {packed.shape[0]}")
    width = packed.shape[1]
    p = (packed.to(torch.int64) & (_U32 - 1)).reshape(length // values, words, width)
    mask = max_code(bits)
    out = torch.empty(length // values, values, width, dtype=torch.int64, device=packed.device)
    for i in range(values):
        w, off = divmod(bits * i, 32)
        v = p[:, w] >> off
        spill = off + bits - 32
        if spill > 0:
            v = v | (p[:, w + 1] << (bits - spill))
        out[:, i] = v & mask
    return out.reshape(length, width).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [K, N] (GPTQ orientation, input channels along dim 0) -> qweight int32 [K*b/32, N]."""
    check_bits(bits)
    return _pack_dim0(codes, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [K*b/32, N] -> codes int32 [K, N] in 0..2^b-1."""
    check_bits(bits)
    return _unpack_dim0(qweight, bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """TRUE integer zeros int [G, N] -> qzeros int32 [G, N*b/32] in the given format's convention."""
    check_bits(bits)
    stored = (zeros.to(torch.int64) - zero_offset(checkpoint_format)) & max_code(bits)
    return _pack_dim0(stored.t().contiguous(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int,
                  checkpoint_format: str) -> torch.Tensor:
    """qzeros int32 [G, N*b/32] -> TRUE integer zeros int32 [G, N].

    v1 adds the offset back with a mask, exactly as every v1 reader does: (stored + 1) & (2^b - 1).
    """
    check_bits(bits)
    stored = _unpack_dim0(qzeros.t().contiguous(), bits, out_features).t()
    return ((stored + zero_offset(checkpoint_format)) & max_code(bits)).to(torch.int32).contiguous()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, checkpoint_format: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantisation: returns W [K, N] (GPTQ orientation) in `dtype`.

    w[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]).
    """
    in_features = g_idx.shape[0]
    out_features = scales.shape[1]
    q = unpack_qweight(qweight, bits, in_features)
    z = unpack_qzeros(qzeros, bits, out_features, checkpoint_format)
    g = g_idx.long()
    s = scales.to(torch.float32)
    w = (q.to(torch.float32) - z[g].to(torch.float32)) * s[g]
    return w.to(dtype)
