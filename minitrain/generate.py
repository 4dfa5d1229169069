"""Sampling text from a model: greedy (temperature 0) or temperature + top-k, seeded.

No KV cache: each new token runs the model over the whole context (up to
max_position_embeddings tokens). Simple and exact; fast enough for the small models minitrain
trains on a CPU.
"""

import numpy

from minitrain import backend
from minitrain.autograd import no_grad


def next_token(logits, temperature, top_k, rng):
    """Pick one id from logits (V,): argmax at temperature 0, else sample softmax(logits / T)
    restricted to the top_k largest (all when top_k is 0)."""
    logits = numpy.asarray(logits, dtype=numpy.float64)
    if temperature == 0:
        return int(logits.argmax())
    z = logits / temperature
    if 0 < top_k < z.size:
        kth = numpy.partition(z, -top_k)[-top_k]
        z = numpy.where(z >= kth, z, -numpy.inf)
    p = numpy.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def generate(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=40, seed=0, stop_id=None):
    """prompt_ids + up to max_new_tokens sampled ids (stopping early at stop_id)."""
    rng = numpy.random.default_rng(seed)
    ids = list(prompt_ids)
    window = model.config.max_position_embeddings
    with no_grad():
        for _ in range(max_new_tokens):
            context = numpy.asarray([ids[-window:]], dtype=numpy.int64)  # (1, T)
            logits = backend.to_numpy(model.forward(context).data[0, -1])  # (V,)
            ids.append(next_token(logits, temperature, top_k, rng))
            if ids[-1] == stop_id:
                break
    return ids
