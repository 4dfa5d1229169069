"""Launching kernels/attention.cu: causal grouped-query attention, forward and backward.

q, o, do, dq (B, T, nH, hd); k, v, dk, dv (B, T, nKV, hd); lse, D (B, nH, T) float32; hd 64 or
128. Every attention kernel takes 128-thread blocks; the tile sizes below are the kernels' own
(kernels/attention.cu, where the tiling is explained) and set the grids.
"""

from minitrain.gpu import address, suffix

THREADS = 128
FORWARD_ROWS = {64: 64, 128: 32}  # query rows per forward block
MMA_ROWS = 64  # query (and key) rows per block of kernels/attention_mma.cu (bf16 on the tensor cores)
MMA_BACKWARD_HD = (64, 128)  # head dims of its backward
BACKWARD_ROWS = {64: 32, 128: 16}  # query rows per dq block, key rows per dkdv block
DELTA_ROWS, DELTA_BLOCKS = 32, 4096  # rows per delta block and step; a grid-stride loop covers the rest


def _shape(q, k):
    B, T, nH, hd = q.shape
    nKV = k.shape[2]
    if hd not in FORWARD_ROWS or nH % nKV or k.shape != (B, T, nKV, hd):
        raise ValueError(f"attention kernels: q {q.shape}, k {k.shape}: need (B, T, nH, hd) and (B, T, nKV, hd) "
                         f"with hd in {sorted(FORWARD_ROWS)} and nH a multiple of nKV")
    return B, T, nH, nKV, hd


def _tiles(T, rows):
    return -(-T // rows)


def _tensor_cores(*arrays):
    """Whether kernels/attention_mma.cu takes these: bf16, each starting 16-byte aligned (it copies
    rows 16 bytes at a time; CuPy's allocations are 256-byte aligned)."""
    return suffix(arrays[0]) == "bf16" and all(address(a) % 16 == 0 for a in arrays)


def _starts(starts, B, T):
    """The kernels' last argument: a packed window's (B, T) int64 first visible key of each query,
    or 0 (a null pointer: every query sees from key 0)."""
    if starts is None:
        return 0
    if starts.shape != (B, T) or starts.dtype.name != "int64" or not starts.flags.c_contiguous:
        raise ValueError(f"attention kernels: starts must be C-contiguous int64 {(B, T)}; found "
                         f"{starts.dtype.name} {tuple(starts.shape)}")
    return starts


def forward(launch, q, k, v, o, lse, starts=None):
    """o = softmax(q k^T / sqrt(hd), causal) v per head; lse = the rows' log-sum-exp. bf16 runs on
    the tensor cores (kernels/attention_mma.cu), fp32 on kernels/attention.cu. `starts` (B, T):
    each query's first visible key, in a packed window (non-decreasing along each row)."""
    B, T, nH, nKV, hd = _shape(q, k)
    starts = _starts(starts, B, T)
    if _tensor_cores(q, k, v):
        launch("attention_mma", f"attention_forward_mma_hd{hd}_bf16", (_tiles(T, MMA_ROWS), nH, B), (THREADS,),
               (q, k, v, o, lse, B, T, nH, nKV, starts))
        return
    launch("attention", f"attention_forward_hd{hd}_{suffix(q)}", (_tiles(T, FORWARD_ROWS[hd]), nH, B), (THREADS,),
           (q, k, v, o, lse, B, T, nH, nKV, starts))


def backward(launch, q, k, v, o, do, lse, dq, dk, dv, D, starts=None):
    """dq, dk, dv from do; D (B, nH, T) float32 is scratch (it receives rowsum(do * o))."""
    B, T, nH, nKV, hd = _shape(q, k)
    starts = _starts(starts, B, T)
    launch("attention", f"attention_backward_delta_{suffix(o)}", (min(DELTA_BLOCKS, _tiles(B * T * nH, DELTA_ROWS)),),
           (THREADS,), (o, do, D, B, T, nH, hd))
    if hd in MMA_BACKWARD_HD and _tensor_cores(q, k, v, do):
        source, name, rows = "attention_mma", f"mma_hd{hd}_bf16", MMA_ROWS
    else:
        source, name, rows = "attention", f"hd{hd}_{suffix(q)}", BACKWARD_ROWS[hd]
    launch(source, f"attention_backward_dq_{name}", (_tiles(T, rows), nH, B), (THREADS,),
           (q, k, v, do, lse, D, dq, B, T, nH, nKV, starts))
    launch(source, f"attention_backward_dkdv_{name}", (_tiles(T, rows), nKV, B), (THREADS,),
           (q, k, v, do, lse, D, dk, dv, B, T, nH, nKV, starts))
