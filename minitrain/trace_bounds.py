"""How far two honest traces of one step may differ, tensor by tensor: the bounds `minitrain diff`
judges against when no --rtol/--atol is given (docs/auditing.md explains them with figures).

The error model is tests/hf_oracle.py's (Higham 2.2, 3.1): each operation is exact up to a factor
1 + d, |d| <= u; a sum of n terms is exact up to n u times the sum of the terms' magnitudes;
errors made along a chain of dependent steps add. A trace adds the rounding of what is stored:
in bf16 (mixed precision) every activation and activation gradient is rounded to 8 bits of
mantissa (u = 2^-8) while sums accumulate in fp32 (u = 2^-24). So a tensor t, reached along a
chain of sums of n_t terms in all and k_t stored roundings, is within

    rho_t = sum over the two sides of (n_t u_acc + k_t u_store)

of the exact value, relative to the magnitude of the terms it comes from: for an activation, its
largest magnitude; for a parameter's gradient, S_W, the largest sum of term magnitudes behind one
element (|dY|^T |X| for a linear weight; sum |dY| over rows for a bias, where a near-cancelling
sum such as a key bias's is judged against its terms; sum |dY * xhat| for a norm weight; the
summed |dX| of an embedding row, plus the head's for a tied one), computed from A's own tensors.
A gradient's chain is the whole forward, its retrace backward and the sum over the B*T rows.
The optimizer's first step carries the gradient's bound dg through its formula: SGD's update
lr dg; AdamW's m (1-b1) dg, v (1-b2) 2|g| dg, and its update lr g/(|g| + eps) at step 1, which
moves by at most lr min(2, dg / (|g| + eps)) element by element (a gradient within rounding of
zero may flip its sign: that element's update may differ by 2 lr, honestly).
This is the worst case of the model, without the network's own amplification (the softmax of
large scores); rounding errors of random sign grow like sqrt(n), not n, which leaves it room.
"""

import numpy

UNIT = {"fp64": (2.0 ** -53, 2.0 ** -53), "fp32": (2.0 ** -24, 2.0 ** -24), "bf16": (2.0 ** -24, 2.0 ** -8)}
PARAM_UNIT = {"fp64": 2.0 ** -53, "fp32": 2.0 ** -24, "bf16": 2.0 ** -24}  # master weights: fp32 under bf16

# Each forward tensor of a layer in order: (name, the tensor it is computed from (None: the layer's
# input), the lengths of the sums that make it (config sizes or numbers), its stored roundings).
_LAYER = (("attn_norm", None, ("H",), 1), ("q", "attn_norm", ("H",), 1), ("k", "attn_norm", ("H",), 1),
          ("v", "attn_norm", ("H",), 1), ("q_rope", "q", (2,), 1), ("k_rope", "k", (2,), 1),
          ("attn", "q_rope", ("hd", "2T"), 2), ("o_proj", "attn", ("nH*hd",), 1), ("attn_residual", "o_proj", (1,), 1),
          ("mlp_norm", "attn_residual", ("H",), 1), ("gate", "mlp_norm", ("H",), 1), ("up", "mlp_norm", ("H",), 1),
          ("act", "gate", (2,), 1), ("down", "act", ("I",), 1), ("mlp_residual", "down", (1,), 1))
# Qwen3's layer: q and k normalized per head (a sum over hd) between the projections and RoPE
_QK_NORM = {"q_norm": ("q", ("hd",), 1), "k_norm": ("k", ("hd",), 1), "q_rope": ("q_norm", (2,), 1),
            "k_rope": ("k_norm", (2,), 1)}


def _layer(m):
    if not m.qk_norm:
        return _LAYER
    rows = [(n, *_QK_NORM[n]) if n in _QK_NORM else (n, src, sums, k) for n, src, sums, k in _LAYER]
    at = next(i for i, row in enumerate(rows) if row[0] == "q_rope")
    return tuple(rows[:at] + [("q_norm", *_QK_NORM["q_norm"]), ("k_norm", *_QK_NORM["k_norm"])] + rows[at:])


def chains(m, batch, seq):
    """({forward trace name: (n, k)}, the gradients' (n, k)) for a ModelConfig and a batch. Every
    layer adds the same to the chain, so a name's is found without walking the layers."""
    size = {"H": m.hidden_size, "I": m.intermediate_size, "hd": m.head_dim, "2T": 2 * seq,
            "nH*hd": m.num_attention_heads * m.head_dim}
    within = {}  # a layer's tensors, from its input
    for name, source, sums, stores in _layer(m):
        n, k = (0, 0) if source is None else within[source]
        within[name] = (n + sum(size.get(s, s) for s in sums), k + stores)
    step, L = within["mlp_residual"], m.num_hidden_layers
    out = (L * step[0], 1 + L * step[1])  # the last layer's output: the embedding's rounding, then L layers
    H, V = m.hidden_size, m.vocab_size
    top = {"embed": (0, 1), "norm": (out[0] + H, out[1] + 1), "logits": (out[0] + 2 * H, out[1] + 2),
           "loss": (out[0] + 2 * H + V + batch * seq, out[1] + 2)}

    def depth(name):
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in within:
            i, (n, k) = int(parts[1]), within[parts[2]]
            return i * step[0] + n, 1 + i * step[1] + k
        return top.get(name)

    n, k = top["loss"]
    return depth, (2 * n + batch * seq, 2 * k)


def relative(n_k, precisions):
    n, k = n_k
    return sum(n * UNIT[p][0] + k * UNIT[p][1] for p in precisions)


class Bounds:
    """The bound on |a - b| of each tensor of trace A against another trace, from A's manifest
    and tensors; `precisions`: the two sides' (fp64, fp32 or bf16)."""

    def __init__(self, a, precisions):
        m = a.manifest
        self.a, self.precisions = a, precisions
        self.model, self.optimizer = a.config, m.get("optimizer")
        self.depth, self.grad_chain = chains(self.model, m["batch_size"], m["seq_len"])
        self.cache, self.scales = {}, {}  # A's tensors read, S by gradient

    def get(self, name):
        """A's tensor `name` (float64), or None where A lacks it."""
        if name not in self.cache:
            self.cache[name] = self.a.array(name) if name in self.a.header else None
        return self.cache[name]

    def bound(self, name, a):
        """The bound for tensor `name`, whose value in A is `a`: a number or an array like a."""
        if name.startswith("grad."):
            return relative(self.grad_chain, self.precisions) * self.terms(name[5:], a)
        if name.startswith("step."):
            return self.step(name, a)
        chain = self.depth(name)
        if chain is None:  # a tensor this model does not name: judged as a gradient is
            chain = self.grad_chain
        return relative(chain, self.precisions) * _largest(a)

    def terms(self, target, g):
        """S for the gradient of `target` (a parameter, or an activation: its largest magnitude),
        `g` that gradient in A; computed once per target (a parameter's step tensors ask again)."""
        if target not in self.scales:
            self.scales[target] = self._terms(target, g)
        return self.scales[target]

    def _terms(self, target, g):
        spec = _terms_spec(target, self.model)
        if spec is None:
            return _largest(g)
        kind, parts = spec
        arrays = [self.get(p) for p in parts]
        if any(x is None for x in arrays):
            return _largest(g)
        if kind == "linear":
            dy, x = (abs(v).reshape(-1, v.shape[-1] if v.ndim < 4 else v.shape[-1] * v.shape[-2]) for v in arrays)
            return float((dy.T @ x).max())
        if kind == "bias":
            return float(abs(arrays[0]).reshape(-1, arrays[0].shape[-1]).sum(0).max())
        if kind == "norm":
            dy, x = arrays[0], arrays[1].reshape(arrays[0].shape)  # a per-head norm's input: (B, T, n*hd)
            xhat = x / numpy.sqrt((x * x).mean(-1, keepdims=True) + self.model.rms_norm_eps)
            return float(abs(dy * xhat).reshape(-1, x.shape[-1]).sum(0).max())
        ids, dx, *head = arrays  # an embedding: its rows' gathered |dX|, and a tied or untied head's |dZ|^T |h|
        rows = numpy.zeros(g.shape)  # (V, H), as the trace holds it
        numpy.add.at(rows, ids.reshape(-1), abs(dx).reshape(-1, dx.shape[-1]))
        if head:
            dz, h = (abs(v).reshape(-1, v.shape[-1]) for v in head)
            rows = rows + dz.T @ h
        return float(rows.max())

    def step(self, name, a):
        """The optimizer's tensors: the gradient's bound carried through the first step."""
        _, kind, param = name.split(".", 2)
        g = self.get("grad." + param)
        opt = self.optimizer or {}
        u = sum(PARAM_UNIT[p] for p in self.precisions)
        after = a if kind == "param" else self.get("step.param." + param)
        if g is None or "lr" not in opt or after is None:
            return numpy.inf  # nothing to carry the bound through: not judged
        dg = relative(self.grad_chain, self.precisions) * self.terms(param, g)
        lr = opt["lr"]
        if kind == "m":
            return (1 - opt["beta1"]) * dg + u * abs(a)
        if kind == "v":
            return (1 - opt["beta2"]) * (2 * abs(g) * dg + dg * dg) + 2 * u * abs(a)
        # the update is after - before: the parameter's own rounding (decay, subtraction) is in it
        moved = lr * dg if opt.get("name") == "sgd" else lr * numpy.minimum(2.0, dg / (abs(g) + opt["eps"]))
        return moved + 3 * u * abs(after)


def _largest(a):
    return float(numpy.max(abs(a), initial=0.0))


def _terms_spec(target, model):
    """(kind, A's tensors behind the gradient of parameter `target`) or None (an activation)."""
    parts = target.split(".")
    if target == "model.embed_tokens.weight":
        tied = model.tie_word_embeddings
        return "embedding", ["input_ids", "grad.embed"] + (["grad.logits", "norm"] if tied else [])
    if target == "lm_head.weight":
        return "linear", ["grad.logits", "norm"]
    if target == "model.norm.weight":
        return "norm", ["grad.norm", f"layers.{model.num_hidden_layers - 1}.mlp_residual"]
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    i, module, leaf = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
    t = f"layers.{i}."
    before = "embed" if i == 0 else f"layers.{i - 1}.mlp_residual"
    table = {"input_layernorm": ("attn_norm", before), "post_attention_layernorm": ("mlp_norm", t + "attn_residual"),
             "self_attn.q_proj": ("q", "attn_norm"), "self_attn.k_proj": ("k", "attn_norm"),
             "self_attn.v_proj": ("v", "attn_norm"), "self_attn.o_proj": ("o_proj", "attn"),
             "self_attn.q_norm": ("q_norm", "q"), "self_attn.k_norm": ("k_norm", "k"),
             "mlp.gate_proj": ("gate", "mlp_norm"), "mlp.up_proj": ("up", "mlp_norm"), "mlp.down_proj": ("down", "act")}
    if module not in table:
        return None
    out, x = table[module]
    x = x if x.startswith(("embed", "layers.")) else t + x
    if module.endswith("norm"):
        return "norm", [f"grad.{t}{out}", x]
    return ("bias", [f"grad.{t}{out}"]) if leaf == "bias" else ("linear", [f"grad.{t}{out}", x])
