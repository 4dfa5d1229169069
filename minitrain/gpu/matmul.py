"""Launching kernels/matmul_backward.cu: the linear layer's backward (minitrain/ops/linear.py).

For y = x W^T + b with G = dy flattened to (N, out), X (N, in), W (out, in):
  grad_input:  dX  = G W        (N, in), written in the inputs' dtype
  grad_weight: dW += G^T X      (out, in), fp32, accumulated
  grad_bias:   db += sum_n G[n] (out,), fp32, accumulated
g and x may have leading dims (N is their product). Inputs float32 or bf16 bits (uint16).
"""

from minitrain.gpu import suffix

TILE = 64  # rows and columns of the output per block: kernels/matmul_backward.cu's TILE
THREADS = 64  # its THREADS (8 x 8 threads, an 8 x 8 micro-tile each)
BIAS_COLS, BIAS_ROWS = 32, 4  # its bias block: 32 columns x 4 row groups


def _tiles(n, size):
    return max(1, -(-n // size))


def _accumulator(name, a):
    if a.dtype.name != "float32":
        raise TypeError(f"{name} must be a float32 accumulator, found {a.dtype.name}")


def grad_input(launch, g, w, dx):
    out, in_ = w.shape
    n = g.size // out
    grid = (_tiles(n, TILE), _tiles(in_, TILE))  # x: row tiles of dX (no 65535 limit), y: column tiles
    launch("matmul_backward", f"matmul_dx_{suffix(g)}", grid, (THREADS,), (g, w, dx, n, in_, out))


def grad_weight(launch, g, x, dw):
    _accumulator("dW", dw)
    out, in_ = dw.shape
    n = g.size // out
    grid = (_tiles(out, TILE), _tiles(in_, TILE))
    launch("matmul_backward", f"matmul_dw_{suffix(g)}", grid, (THREADS,), (g, x, dw, n, in_, out))


def grad_bias(launch, g, db):
    _accumulator("db", db)
    out = db.size
    launch("matmul_backward", f"bias_grad_{suffix(g)}", (_tiles(out, BIAS_COLS),), (BIAS_COLS, BIAS_ROWS),
           (g, db, g.size // out, out))
