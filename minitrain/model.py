"""The decoder of the Llama, Qwen2 and Qwen3 families, written out explicitly.

All three are decoder-only and pre-norm. For token ids (B, T):

    x = embed[ids]                                                  (B, T, H)
    per layer:
        h = rmsnorm(x) ;  q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)   biases: Qwen2 only
        q, k = rmsnorm(q), rmsnorm(k)    over each head's hd         Qwen3 only (weights (hd,))
        q, k = rope(q), rope(k)                                     (B, T, nH|nKV, hd)
        x = x + attention(q, k, v) Wo^T                             causal, GQA (or over a KV cache)
        h = rmsnorm(x)
        x = x + (silu(h Wgate^T) * (h Wup^T)) Wdown^T               SwiGLU MLP
    logits = rmsnorm(x) Whead^T                                     Whead = embed when tied

RoPE's frequencies are Llama 3-scaled where the config has rope_scaling (ops/rope.py). Qwen3's
head_dim is its own (Qwen3-0.6B: 16 heads of 128 on a hidden size of 1024, so q is 2048 wide).

Parameters live in one dict keyed by Hugging Face tensor names; the expected names and shapes
come from `config.tensor_table`, and the constructor checks the dict against it. With LoRA
adapters attached (`model.adapters`, lora.py), the seven linears of each layer go through them.
On the kernel path (--device cuda) each layer's q, k, v weights (and biases), and its gate and
up weights, are packed side by side in one buffer (ops/packed.py): q, k, v are one GEMM whose
output is split, gate and up one GEMM whose output SwiGLU reads as it is. The same parameters,
names and values; on the CPU every linear stays its own GEMM (and its own bits).
With `model.recompute` (--recompute) set to attention, mlp or layer, that block of every layer
keeps only its input and output for the backward, which runs its forward again
(ops/recompute.py): less memory, the same bits.
With `model.tracer` set (`minitrain trace`, trace.py), each intermediate named in docs/auditing.md
is handed to it as it is made (`_tap`); every linear then runs on its own.
"""

import numpy

from minitrain import backend, ops
from minitrain.autograd import Tensor
from minitrain.config import parameter_count, tensor_table
from minitrain.errors import InputError

INIT_STD = 0.02


class Model:
    def __init__(self, config, params):
        """`params`: name -> Tensor, exactly the names and shapes of tensor_table(config), in any
        order. They are kept in the table's order, whatever the source's (a safetensors file lists
        its tensors sorted by name): `parameters()` is then the same sequence for a model built
        from scratch, loaded from a checkpoint or from a file, so everything summed over it in
        floating point (the global gradient norm) has the same bits in a resumed run."""
        check_tensors(config, {name: tuple(t.shape) for name, t in params.items()}, "model parameters")
        self.config = config
        self.params = {name: params[name] for name in tensor_table(config)}
        self.adapters = None  # lora.Adapters, or None: every linear is plain
        self.recompute = "none"  # or attention, mlp, layer: the blocks whose activations the backward recomputes
        self.tracer = None  # trace.Tracer: sees each named intermediate (minitrain trace)
        self.packed = _pack(config, self.params) if backend.launch is not None else {}

    @classmethod
    def from_arrays(cls, config, arrays):
        """Copy arrays (name -> array, any float dtype; read-only memory maps too; or an iterable of
        (name, array) pairs, each copied as it comes) into trainable parameters in the backend's
        policy dtype (backend.dtype)."""
        pairs = arrays.items() if isinstance(arrays, dict) else arrays
        return cls(config, {name: Tensor(backend.xp.array(a, dtype=backend.dtype), requires_grad=True, name=name)
                            for name, a in pairs})

    @classmethod
    def from_scratch(cls, config, seed=0):
        """N(0, 0.02) for the embedding and every linear weight, zero biases, RMSNorm weights 1.
        Drawn tensor by tensor in table order from one seeded generator: same seed, same model.
        Each draw becomes its parameter before the next is made: the model's memory, not twice it."""
        rng = numpy.random.default_rng(seed)

        def drawn():
            for name, shape in tensor_table(config).items():
                if name.endswith("norm.weight"):
                    yield name, numpy.ones(shape, dtype=numpy.float32)
                elif name.endswith(".bias"):
                    yield name, numpy.zeros(shape, dtype=numpy.float32)
                else:
                    yield name, rng.standard_normal(shape, dtype=numpy.float32) * numpy.float32(INIT_STD)
        return cls.from_arrays(config, drawn())

    def parameters(self):
        """Every trainable tensor once (a tied head is the embedding), in tensor_table order."""
        return list(self.params.values())

    def num_parameters(self):
        return parameter_count(self.config)

    @property
    def head(self):
        return self.params["model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"]

    def forward(self, ids, cache=None, positions=None):
        """ids (B, T) integer -> logits (B, T, V), in fp32 also under mixed precision. With a
        KVCache (kv_cache.py), ids are the next T tokens after those the cache holds; `positions`:
        a packed window's (see hidden)."""
        logits = ops.linear(self.hidden(ids, cache, positions), self.head)  # (B, T, V)
        return ops.cast(logits, "fp32") if backend.bf16 else logits

    def loss(self, ids, targets, positions=None):
        """Mean cross-entropy over the target tokens (a target -100 marks a position without one:
        its row never reaches the lm_head); the lm_head and the loss fused and chunked, so the
        (B*T, V) logits are never held whole. `positions`: see hidden."""
        return ops.linear_cross_entropy(self.hidden(ids, positions=positions), self.head, targets)

    def sequence_logprobs(self, ids, targets, positions=None):
        """Each sequence's summed log-probability of its target tokens, (B,) (ops/sequence_logprob.py:
        the lm_head fused, the logits never whole): what DPO compares. `positions`: see hidden."""
        return ops.linear_sequence_logprob(self.hidden(ids, positions=positions), self.head, targets)

    def hidden(self, ids, cache=None, positions=None):
        """ids (B, T) integer -> the final normalized hidden states (B, T, H), the lm_head's input.
        Without a cache the T tokens are positions 0..T-1, or `positions` (B, T) host integers: a
        packed window, each token's position inside its own conversation (0 where one starts);
        RoPE turns by them and attention never crosses conversations. With a cache the tokens
        follow what it holds, their k, v join it, and attention reads all of it (inference only:
        no graph)."""
        c, P = self.config, self.params
        T = ids.shape[1]  # ids stay host data: the embedding checks them there and uploads them once
        starts = None  # (B, T) each query's first visible key, in a packed window
        if cache is not None:
            positions = cache.positions(T)  # (B, T) each row's own
        elif positions is not None:
            starts = backend.xp.asarray(first_keys(positions))  # uploaded once for every layer
        x = ops.embedding(P["model.embed_tokens.weight"], ids)  # (B, T, H)
        if backend.bf16:  # mixed precision: activations in bf16 from here on, parameters stay fp32
            x = ops.cast(x, "bf16")
        x = self._tap("embed", x)
        where = (positions, starts, cache)
        for i in range(c.num_hidden_layers):
            x = self._recomputed("layer", self._layer, x, i, where)  # (B, T, H)
        if cache is not None:
            cache.advance(T)
        return self._tap("norm", ops.rmsnorm(x, P["model.norm.weight"], c.rms_norm_eps))  # (B, T, H)

    def _layer(self, x, i, where):
        """Layer i: x (B, T, H) -> x + attention, then + MLP (pre-norm residual blocks)."""
        x = x + self._recomputed("attention", self._attention, x, i, where)  # (B, T, H)
        x = self._tap(f"layers.{i}.attn_residual", x)
        return self._tap(f"layers.{i}.mlp_residual", x + self._recomputed("mlp", self._mlp, x, i, where))

    def _attention(self, x, i, where):
        """Layer i's attention block, x (B, T, H) -> its output before the residual sum (B, T, H).
        `where`: (positions, starts, cache), see hidden."""
        c, P, p, n = self.config, self.params, f"model.layers.{i}.", f"layers.{i}."  # parameter, trace names
        (B, T, _), (positions, starts, cache) = x.shape, where
        nH, nKV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        h = self._tap(n + "attn_norm", ops.rmsnorm(x, P[p + "input_layernorm.weight"], c.rms_norm_eps))  # (B, T, H)
        if self._fused():  # one GEMM over [Wq; Wk; Wv], its output split
            bias = self.packed.get(p + "qkv.bias")
            q, k, v = ops.linear_split(h, self.packed[p + "qkv"].tensor(), bias and bias.tensor(),
                                       (nH * hd, nKV * hd, nKV * hd))
        else:
            q = self._tap(n + "q", self._linear(h, p + "self_attn.q_proj"))  # (B, T, nH*hd)
            k = self._tap(n + "k", self._linear(h, p + "self_attn.k_proj"))  # (B, T, nKV*hd)
            v = self._tap(n + "v", self._linear(h, p + "self_attn.v_proj"))  # (B, T, nKV*hd)
        q, k = q.reshape(B, T, nH, hd), k.reshape(B, T, nKV, hd)
        if c.qk_norm:  # Qwen3: each head of q and of k RMS-normalized over hd, one weight (hd,) per layer
            q = self._tap(n + "q_norm", ops.rmsnorm(q, P[p + "self_attn.q_norm.weight"], c.rms_norm_eps))
            k = self._tap(n + "k_norm", ops.rmsnorm(k, P[p + "self_attn.k_norm.weight"], c.rms_norm_eps))
        q = self._tap(n + "q_rope", ops.rope(q, c.rope_theta, positions, c.rope_scaling))  # (B, T, nH, hd)
        k = self._tap(n + "k_rope", ops.rope(k, c.rope_theta, positions, c.rope_scaling))  # (B, T, nKV, hd)
        v = v.reshape(B, T, nKV, hd)
        a = ops.attention(q, k, v, starts) if cache is None else cache.attend(i, q, k, v)  # (B, T, nH, hd)
        a = self._tap(n + "attn", a)
        return self._tap(n + "o_proj", self._linear(a.reshape(B, T, nH * hd), p + "self_attn.o_proj"))  # (B, T, H)

    def _mlp(self, x, i, where):
        """Layer i's MLP block, x (B, T, H) -> its output before the residual sum (B, T, H)."""
        c, p, n = self.config, f"model.layers.{i}.", f"layers.{i}."  # parameter, trace names
        h = self._tap(n + "mlp_norm", ops.rmsnorm(x, self.params[p + "post_attention_layernorm.weight"],
                                                  c.rms_norm_eps))  # (B, T, H)
        if self._fused():  # one GEMM over [Wgate; Wup]: (B, T, 2I), SwiGLU reads its two halves
            m = ops.swiglu_packed(ops.linear(h, self.packed[p + "gate_up"].tensor()))  # (B, T, I)
        else:
            gate = self._tap(n + "gate", self._linear(h, p + "mlp.gate_proj"))  # (B, T, I)
            up = self._tap(n + "up", self._linear(h, p + "mlp.up_proj"))  # (B, T, I)
            m = self._tap(n + "act", ops.swiglu(gate, up))  # (B, T, I)
        return self._tap(n + "down", self._linear(m, p + "mlp.down_proj"))  # (B, T, H)

    def _recomputed(self, part, block, x, i, where):
        """block(x, i, where); when `part` is what --recompute names, its activations are not kept
        but recomputed in the backward (ops/recompute.py)."""
        if self.recompute != part:
            return block(x, i, where)
        return ops.recompute(lambda x: block(x, i, where), x, self._layer_tensors(i),
                             self.adapters and self.adapters.rng)

    def _layer_tensors(self, i):
        """Layer i's parameters and LoRA adapters: what a recomputed block of it may train."""
        prefix = f"model.layers.{i}."
        tensors = {**self.params, **(self.adapters.params if self.adapters else {})}
        return [t for name, t in tensors.items() if name.startswith(prefix)]

    def _fused(self):
        """Whether the projections run packed: on the kernel path, without LoRA adapters (whose
        linears are per module) and without a tracer (which names each linear's output)."""
        return bool(self.packed) and self.adapters is None and self.tracer is None

    def _tap(self, name, x):
        """x, named `name` and shown to the tracer when there is one (docs/auditing.md's names)."""
        return x if self.tracer is None else self.tracer.forward(name, x)

    def _linear(self, x, module):
        """x Wᵀ (+ b) for the linear `module` (its tensors' name prefix), through its LoRA
        adapter when one is attached."""
        W, b = self.params[module + ".weight"], self.params.get(module + ".bias")
        return ops.linear(x, W, b) if self.adapters is None else self.adapters.linear(x, module, W, b)


def first_keys(positions):
    """A packed batch's positions (B, T) (host integers: 0 where a conversation starts, then +1 per
    token) -> each query's first visible key, i - positions[i] (non-decreasing along a row, as the
    attention kernels need); ValueError for positions that are not such runs."""
    p = numpy.asarray(positions, dtype=numpy.int64)
    if p.ndim != 2 or p.size and ((p[:, 0] != 0).any() or ((p[:, 1:] != 0) & (p[:, 1:] != p[:, :-1] + 1)).any()):
        raise ValueError("positions must be (B, T) runs 0, 1, 2, ... (a new run where a conversation starts), "
                         "each row starting at 0")
    return numpy.arange(p.shape[1])[None, :] - p


def _pack(config, params):
    """Each layer's packed projections (ops.Packed): 'model.layers.{i}.qkv' (q, k, v weights),
    '....qkv.bias' (their biases, Qwen2) and '....gate_up' (gate, up weights)."""
    packed = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for key, names in (("qkv", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
                           ("qkv.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]),
                           ("gate_up", ["mlp.gate_proj.weight", "mlp.up_proj.weight"])):
            if p + names[0] in params:
                packed[p + key] = ops.Packed([params[p + n] for n in names])
    return packed


def check_tensors(config, found, source):
    """Compare name -> shape against the architecture's tensor table (check_table). A layer count
    the tensors cannot hold (each layer has 9 or more) is refused before the table is built: a
    corrupt count of 2^32 layers would take hours to list."""
    context = f"for a {config.family} model with {config.num_hidden_layers:,} layers, hidden {config.hidden_size:,}"
    if config.num_hidden_layers > len(found):
        raise InputError(f"{source}: {len(found):,} tensors cannot hold {config.num_hidden_layers:,} layers ({context})")
    check_table(tensor_table(config), found, source, context)


def check_table(expected, found, source, context):
    """Compare name -> shape against an expected table; raise InputError naming every missing,
    unexpected and mis-shaped tensor (the first few of each, with counts), then `context`."""
    problems = []
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} expected {list(expected[n])} found {list(found[n])}"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    for label, items in (("missing tensor", missing), ("unexpected tensor", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}{'s' if len(items) > 1 else ''} {', '.join(items[:3])}{more}")
    if problems:
        raise InputError(f"{source}: {'; '.join(problems)} ({context})")
