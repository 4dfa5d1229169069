"""The two row orders of q_proj and k_proj that RoPE can be written for, and the permutation
between them.

RoPE rotates pairs of query/key features. Which features pair up is a property of the weights'
row order, not of the math:

    hf           (Hugging Face, rotate_half; APR rope_type 2): in each head of d rows, row i
                 pairs with row i + d/2, for i < d/2. minitrain's model uses this order.
    interleaved  (llama.cpp's llama GGUF tensors, adjacent pairs; APR rope_type 0 after a raw
                 GGUF import): row 2i pairs with row 2i + 1.

llama.cpp's converter reorders each head of a llama's q_proj and k_proj from the first to the
second (qwen2 is stored in the hf order): interleaved row 2i + j = hf row i + j*d/2, j in {0, 1}.
Viewing a head's d rows as a (2, d/2) grid [j, i], that is reading the grid transposed, (d/2, 2)
[i, j]; the inverse transposes back. A bias vector follows its rows. Both are pure row
permutations: values are moved, never changed, so a round trip is bit-exact.
"""


def hf_to_interleaved(w, heads):
    """w (heads*d, ...) in the hf order -> the same rows in the interleaved order."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (heads, d/2, 2, ...)


def interleaved_to_hf(w, heads):
    """w (heads*d, ...) in the interleaved order -> the same rows in the hf order."""
    return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (heads, 2, d/2, ...)


def permute_qk(arrays, config, permute):
    """A copy of `arrays` (HF names) with every layer's q_proj and k_proj rows (weight and bias)
    passed through `permute(w, heads)`: the query heads for q, the key/value heads for k."""
    out = dict(arrays)
    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name in out:
                    out[name] = permute(out[name], heads)
    return out
