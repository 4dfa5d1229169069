"""APR tensor encodings: the dtype codes, the byte size each one needs, and decoding to float32.

Codes from ../shared/docs/apr-format.md §4.1 (GH-438 aligned codes 0-31 with GGML's ggml_type):

    0 F32, 1 F16, 30 BF16       plain little-endian floats (BF16 = the upper 16 bits of an f32)
    129 APR Q8 (legacy 9)       one f32 scale for the whole tensor, then one int8 per value:
                                x = q * scale
    128 APR Q4 (legacy 8)       per 32 values: an f16 scale, then 16 bytes of nibbles, the low
                                nibble holding the even value: x = (nibble - 8) * scale; the last
                                block is zero-padded, so the size is 18 * ceil(N / 32)
    12 Q4_K, 14 Q6_K            GGML's 256-value super-blocks (144 and 210 bytes), decoded exactly
                                as GGML's reference dequantize_row_q4_K / dequantize_row_q6_K
                                (ggerganov/ggml src/ggml-quants.c), in float32, in their order

The K-quants come in two layouts: flat, ceil(N / 256) blocks over the flattened tensor (`apr
convert --quantize q4k`), and row-aligned, each row padded to whole blocks (`apr import`,
GH-370). The stored size tells them apart; where both layouts have the same size the tensor is
read as flat (they coincide whenever the row length is a multiple of 256).

Codes 3-7 (F64, I32, I64, I8, U8) are valid APR but are not LLM weights (and realizar reads
3, 6 and 7 as other GGML types), so minitrain refuses them.
"""

import math

import numpy

F32, F16, Q4_K, Q6_K, BF16, APR_Q4, APR_Q8 = 0, 1, 12, 14, 30, 128, 129
LEGACY = {8: APR_Q4, 9: APR_Q8}  # written before GH-438; same layouts
NAMES = {F32: "F32", F16: "F16", Q4_K: "Q4_K", Q6_K: "Q6_K", BF16: "BF16", APR_Q4: "Q4", APR_Q8: "Q8",
         8: "Q4", 9: "Q8"}
NOT_WEIGHTS = {3: "F64", 4: "I32", 5: "I64", 6: "I8", 7: "U8"}

# Block layouts as NumPy structured dtypes: one record per block, fields in storage order, packed.
APR_Q4_BLOCK = numpy.dtype([("d", "<f2"), ("qs", "u1", 16)])  # 18 bytes per 32 values
Q4_K_BLOCK = numpy.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])  # 144 / 256
Q6_K_BLOCK = numpy.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])  # 210 / 256

_CHUNK_BLOCKS = 4096  # blocks decoded at a time: bounds the temporaries to a few MB


def expected_sizes(code, shape):
    """The byte sizes a tensor of this dtype and shape may have: the flat layout first, then (for
    K-quants of two or more dimensions, when it differs) the row-aligned one."""
    code, n = LEGACY.get(code, code), math.prod(shape)
    if code not in _BLOCKED:
        return [{F32: 4 * n, F16: 2 * n, BF16: 2 * n, APR_Q8: 4 + n}[code]]
    block, per, _ = _BLOCKED[code]
    sizes = [-(-n // per) * block.itemsize]  # whole blocks, in integers (dims of 2^64 overflow a float)
    if code != APR_Q4 and len(shape) >= 2:
        aligned = math.prod(shape[:-1]) * -(-shape[-1] // per) * block.itemsize
        sizes += [aligned] if aligned != sizes[0] else []
    return sizes


def decode(code, raw, shape):
    """float32 array of `shape` from `raw`, the tensor's uint8 bytes (already size-checked).

    F32 comes back as a view of `raw` (no copy); every other dtype as one new float32 array."""
    code, n = LEGACY.get(code, code), math.prod(shape)
    if code == F32:
        return raw.view("<f4").reshape(shape)
    if code == F16:
        return raw.view("<f2").astype(numpy.float32).reshape(shape)
    if code == BF16:  # widen: the 16 stored bits become the high half of an f32
        return (raw.view("<u2").astype(numpy.uint32) << 16).view(numpy.float32).reshape(shape)
    if code == APR_Q8:
        out = raw[4:].view(numpy.int8).astype(numpy.float32)
        out *= raw[:4].view("<f4")[0]
        return out.reshape(shape)
    block, per, decode_blocks = _BLOCKED[code]
    if len(raw) == expected_sizes(code, shape)[0]:  # flat: the last block's extra values dropped
        return _by_chunks(raw.view(block), per, decode_blocks).reshape(-1)[:n].reshape(shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]  # row-aligned: each row padded to whole blocks
    out = _by_chunks(raw.view(block), per, decode_blocks).reshape(rows, -1)[:, :cols]
    return numpy.ascontiguousarray(out).reshape(shape)


def _by_chunks(blocks, per, decode_blocks):
    out = numpy.empty((len(blocks), per), numpy.float32)
    for i in range(0, len(blocks), _CHUNK_BLOCKS):
        out[i:i + _CHUNK_BLOCKS] = decode_blocks(blocks[i:i + _CHUNK_BLOCKS])
    return out


def _apr_q4(b):
    """APR Q4 blocks (nb,) -> (nb, 32): byte j holds value 2j in its low nibble, 2j+1 in its high."""
    qs = b["qs"]  # (nb, 16)
    nibbles = numpy.stack([qs & 0xF, qs >> 4], axis=-1).reshape(len(b), 32)
    return (nibbles.astype(numpy.float32) - 8) * b["d"].astype(numpy.float32)[:, None]


def _q4_k(b):
    """GGML Q4_K blocks (nb,) -> (nb, 256): eight sub-blocks of 32 values, x = d*sc*q - dmin*m.

    The 12 `scales` bytes pack eight 6-bit scales sc[0..7] and eight 6-bit mins m[0..7]
    (GGML's get_scale_min_k4):
        bytes 0-3:  sc[0..3] in the low 6 bits, the top 2 bits of sc[4..7] in the high 2
        bytes 4-7:  m[0..3] in the low 6 bits,  the top 2 bits of m[4..7] in the high 2
        bytes 8-11: the low 4 bits of sc[4..7] in the low nibble, of m[4..7] in the high nibble
    The 128 `qs` bytes are four runs of 32: run j holds sub-block 2j in its low nibbles and
    sub-block 2j+1 in its high nibbles."""
    s = b["scales"]  # (nb, 12)
    sc = numpy.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)  # (nb, 8)
    m = numpy.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    d1 = b["d"].astype(numpy.float32)[:, None] * sc.astype(numpy.float32)  # (nb, 8), as GGML: d * sc
    m1 = b["dmin"].astype(numpy.float32)[:, None] * m.astype(numpy.float32)
    qs = b["qs"].reshape(len(b), 4, 1, 32)
    q = numpy.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(len(b), 8, 32).astype(numpy.float32)
    return (d1[:, :, None] * q - m1[:, :, None]).reshape(len(b), 256)


def _q6_k(b):
    """GGML Q6_K blocks (nb,) -> (nb, 256): sixteen sub-blocks of 16 values, x = d*scale*(q - 32).

    Each 6-bit q is a low nibble from `ql` plus 2 high bits from `qh`. Per half of 128 values
    (ql bytes 64h.., qh bytes 32h..), for l in 0..31:
        value l      = ql[l]    low nibble  | qh[l] bits 0-1 << 4
        value l + 32 = ql[l+32] low nibble  | qh[l] bits 2-3 << 4
        value l + 64 = ql[l]    high nibble | qh[l] bits 4-5 << 4
        value l + 96 = ql[l+32] high nibble | qh[l] bits 6-7 << 4
    Value e of the block uses the signed scale scales[e // 16]."""
    nb = len(b)
    ql, qh = b["ql"].reshape(nb, 2, 1, 64), b["qh"].reshape(nb, 2, 1, 32)
    low = numpy.concatenate([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=2)
    high = numpy.concatenate([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], axis=2)  # (nb, 2, 4, 32)
    q = ((low | (high << 4)).astype(numpy.float32) - 32).reshape(nb, 16, 16)
    dl = b["d"].astype(numpy.float32)[:, None] * b["scales"].astype(numpy.float32)  # (nb, 16), as GGML: d * sc
    return (dl[:, :, None] * q).reshape(nb, 256)


_BLOCKED = {APR_Q4: (APR_Q4_BLOCK, 32, _apr_q4), Q4_K: (Q4_K_BLOCK, 256, _q4_k), Q6_K: (Q6_K_BLOCK, 256, _q6_k)}
