"""Sampling text with a KV cache (kv_cache.py): the prompts run through the model once (prefill,
in chunks of PREFILL_CHUNK tokens), then each new token is one single-token step over the cache.

A batch of prompts of different lengths is left-padded to the longest; every row then takes one
token per step until it ends -- at the end-of-text id, at a stop string, or after max_new_tokens
-- and an ended row leaves the batch. Picking a token from a row's logits z (V,):

    temperature 0:  argmax z                                                     (greedy)
    else:           sample softmax(z / T), restricted to the top_k largest (0 = all), then to the
                    smallest set of most likely tokens whose probability reaches top_p (1 = all)
"""

import time
from dataclasses import dataclass

import numpy

from minitrain import backend, ops
from minitrain.autograd import Tensor, no_grad
from minitrain.errors import InputError
from minitrain.kv_cache import KVCache

PREFILL_CHUNK = 256  # prompt tokens per prefill forward: scores are (B, nH, 256, context) at most


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Completion:
    ids: list  # the new token ids, up to and including the one that ended it
    text: str  # their text, cut before the first stop string ("" without a decoder)
    finish: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens, or the context is full)


@dataclass
class Timing:
    prefill_tokens: int  # prompt tokens (padding not counted)
    prefill_s: float
    decode_tokens: int  # tokens fed through single-token steps
    decode_s: float

    def rates(self):
        """{prefill_tokens_per_sec, decode_tokens_per_sec}."""
        per_sec = lambda n, s: n / s if s > 0 else 0.0  # noqa: E731
        return {"prefill_tokens_per_sec": per_sec(self.prefill_tokens, self.prefill_s),
                "decode_tokens_per_sec": per_sec(self.decode_tokens, self.decode_s)}


def next_token(logits, sampling, rng):
    """Pick one id from logits (V,) as the module docstring says."""
    z = numpy.asarray(logits, dtype=numpy.float64)
    if sampling.temperature == 0:
        return int(z.argmax())
    z = z / sampling.temperature
    if 0 < sampling.top_k < z.size:
        kth = numpy.partition(z, -sampling.top_k)[-sampling.top_k]
        z = numpy.where(z >= kth, z, -numpy.inf)
    p = numpy.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = numpy.argsort(-p, kind="stable")
        before = numpy.cumsum(p[order]) - p[order]  # mass of the more likely tokens
        cut = numpy.zeros_like(p)
        cut[order[before < sampling.top_p]] = 1.0  # keeps the most likely token always
        p *= cut
        p /= p.sum()
    return int(rng.choice(z.size, p=p))


def prefill(model, cache, ids, chunk=PREFILL_CHUNK):
    """Run ids (B, P) through the model into the cache, chunk tokens at a time.
    -> logits (B, V) of the last position, float64 on the host."""
    for s in range(0, ids.shape[1], chunk):
        h = model.hidden(ids[:, s:s + chunk], cache)  # (B, t, H)
    return last_logits(model, h)


def last_logits(model, h):
    """The lm_head on the last position only of h (B, t, H) -> (B, V) float64 on the host."""
    logits = ops.linear(Tensor(h.data[:, -1:]), model.head)  # (B, 1, V)
    return backend.to_numpy(logits.data[:, 0]).astype(numpy.float64)


def generate(model, prompts, max_new_tokens, sampling=Sampling(), stop_ids=(), stop_strings=(), decode=None):
    """Continue each prompt (a list of token ids). -> ([Completion per prompt], Timing).
    A row ends at any of `stop_ids` (end of text; a chat template's end of turn) or stop string.
    `decode` (ids -> str) is needed for stop strings and fills Completion.text."""
    if stop_strings and decode is None:
        raise ValueError("stop strings need a decoder")
    if not prompts or not all(prompts):
        raise InputError("every prompt needs at least one token")
    window = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= window:
        raise InputError(f"a prompt of {longest} tokens leaves no room in the model's context of {window} "
                         "(max_position_embeddings)")
    max_new_tokens = min(max_new_tokens, window - longest)
    rng = numpy.random.default_rng(sampling.seed)
    pad = [longest - len(p) for p in prompts]
    ids = numpy.array([[0] * n + list(p) for n, p in zip(pad, prompts)], dtype=numpy.int64)  # (B, P) left-padded
    out = [[] for _ in prompts]
    done = [None] * len(prompts)  # Completion once a row has ended
    active = list(range(len(prompts)))  # rows still in the batch, in the cache's row order
    with no_grad():
        cache = KVCache(model.config, pad, longest + max_new_tokens)
        start = time.perf_counter()
        logits = prefill(model, cache, ids)  # (B, V)
        timing = Timing(sum(map(len, prompts)), time.perf_counter() - start, 0, 0.0)
        start = time.perf_counter()
        while True:
            picked = [next_token(z, sampling, rng) for z in logits]
            for row, token in zip(active, picked):
                out[row].append(token)
                done[row] = _ended(out[row], stop_ids, stop_strings, decode, max_new_tokens)
            still = [k for k, row in enumerate(active) if done[row] is None]
            if not still:
                break
            if len(still) < len(active):
                cache.keep(still)
                picked, active = [picked[k] for k in still], [active[k] for k in still]
            step = numpy.array(picked, dtype=numpy.int64)[:, None]  # (B', 1)
            logits = last_logits(model, model.hidden(step, cache))
            timing.decode_tokens += len(active)
        timing.decode_s = time.perf_counter() - start
    return done, timing


def _ended(new, stop_ids, stop_strings, decode, max_new_tokens):
    """The Completion of a row whose new ids are `new`, if they end it; else None."""
    text = decode(new) if decode else ""
    cuts = [text.find(s) for s in stop_strings if s in text]
    if cuts:
        return Completion(list(new), text[:min(cuts)], "stop")
    if new[-1] in stop_ids:
        return Completion(list(new), decode(new[:-1]) if decode else "", "eos")
    if len(new) == max_new_tokens:
        return Completion(list(new), text, "length")
    return None
