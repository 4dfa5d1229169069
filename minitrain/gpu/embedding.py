"""Launching kernels/embedding.cu: the embedding's backward, one block per used token row."""

from minitrain.gpu import BLOCK, warps


def backward(launch, dy, order, starts, sums):
    """sums (U, H) float32: row u = the sum of dy's rows order[starts[u]:starts[u + 1]], in that
    order. dy (N, H) float32; order (N,) and starts (U + 1,) int64 (from the host's stable sort)."""
    U, H = sums.shape
    if dy.dtype.name != "float32" or dy.shape[-1] != H or order.dtype.name != "int64" or starts.shape != (U + 1,):
        raise ValueError(f"embedding backward kernel: dy float32 (N, {H}), order int64 (N,), starts ({U + 1},); "
                         f"found dy {dy.dtype.name} {tuple(dy.shape)}, order {order.dtype.name}, "
                         f"starts {tuple(starts.shape)}")
    if U:
        launch("embedding", "embedding_backward_f32", (U,), (warps(H, BLOCK),),
               (dy, order, starts, sums, H))
