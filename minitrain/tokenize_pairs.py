"""Preference pairs -> pair shards with completion masks (`minitrain tokenize --preference`), for
`pretrain --objective dpo`.

Each record (a JSON Lines line or a Parquet row, compressed or not: corpus.py) holds `prompt`,
`chosen` and `rejected` in one of TRL's two forms:
  plain           three strings;
  conversational  `prompt` a list of messages (system/user/assistant turns, checked as
                  `tokenize --chat` checks them), `chosen` and `rejected` lists of one assistant
                  message each.
They are tokenized as TRL's DPOTrainer tokenizes them (trl 1.16, trainer/dpo_trainer.py,
`tokenize_fn` and the `add_eos` before it):
  conversational  P = the chat template's render of `prompt` with the generation prompt, PC = its
                  render of prompt + chosen, PR of prompt + rejected (chat.py; bos_token,
                  eos_token and the --template-var variables), each text tokenized as
                  transformers' apply_chat_template(tokenize=True) tokenizes it: no tokens added,
                  the template writes its own;
  plain           the tokenizer's EOS text appended to chosen and rejected unless they end with
                  it; P = prompt, PC = prompt + chosen, PR = prompt + rejected, each tokenized as
                  transformers' tokenizer(text) does (with the special tokens it adds, if any);
and the completion starts where the tokenized prompt stops being a prefix of both: n = min(common
prefix of P and PC, common prefix of P and PR). The chosen sequence is PC with mask 1 on its
tokens from n on, the rejected one PR likewise (TRL's prompt_ids[:n] + chosen_ids is PC).

Layout (data.py reads it): windows of T + 1 tokens (T = --seq-len), in record order; pair k is
windows 2k (PC) and 2k + 1 (PR), each sequence from its window's first token, the rest EOS ids
with mask 0. shard-NNNNN.bin (u32) and shard-NNNNN.mask (u8) hold whole pairs. A sequence longer
than a window is cut to it (its start kept) and the pair counted as truncated -- or, with
truncate=False, the record is refused; so is a pair whose prompt leaves no completion token in its
window. manifest.json's "pairs" holds seq_len and the counts.
"""

import hashlib
import json

import numpy

from minitrain import chat
from minitrain.corpus import BadRecord, Corpus, Dedup, Progress
from minitrain.errors import InputError
from minitrain.formats.sources import load_tokenizer, model_of_tokenizer, special_tokens
from minitrain.formats.vocab import find_eos
from minitrain.tokenize import ShardWriter, output_dir
from minitrain.tokenize_chat import MASK


def pair_of(record, where):
    """(form, prompt, chosen, rejected) of one record: form "plain" (three strings) or
    "conversational" (three lists of messages, chosen and rejected one assistant message each);
    BadRecord naming what is wrong."""
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        raise BadRecord(f"{where}: no `{missing[0]}` (a preference pair is `prompt`, `chosen` and `rejected`; "
                        f"found keys: {', '.join(record) or 'none'})")
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        form = "plain"
    elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        form = "conversational"
        prompt = chat.messages_of({"messages": prompt}, f"{where}: prompt")
        chosen, rejected = (chat.messages_of({"messages": turn}, f"{where}: {name}")
                            for name, turn in (("chosen", chosen), ("rejected", rejected)))
        for name, turn in (("chosen", chosen), ("rejected", rejected)):
            if [m["role"] for m in turn] != ["assistant"]:
                raise BadRecord(f"{where}: `{name}` must be a list of one assistant message, found roles "
                                f"{', '.join(m['role'] for m in turn)}")
    else:
        kinds = ", ".join(f"{k} {type(v).__name__}" for k, v in (("prompt", prompt), ("chosen", chosen),
                                                                 ("rejected", rejected)))
        raise BadRecord(f"{where}: expected three strings (plain) or three lists of messages (conversational), "
                        f"found {kinds}")
    if chosen == rejected:
        raise BadRecord(f"{where}: `chosen` and `rejected` are the same; a pair must prefer one of two")
    return form, prompt, chosen, rejected


def pairs(corpus):
    """Yield (label, pair_of's) for every record of the corpus (a record that holds no pair:
    corpus.reject)."""
    for where, record in corpus.records():
        try:
            yield where, pair_of(record, where)
        except BadRecord as e:
            corpus.reject(e)


def common_prefix(a, b):
    """The number of leading ids a and b share."""
    n = min(len(a), len(b))
    differ = numpy.flatnonzero(numpy.asarray(a[:n]) != numpy.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PairEncoder:
    """Token ids of pairs, TRL's way (the module's docstring). The chat template (`chat_template`,
    else the model's) renders conversational pairs with bos_token, eos_token and `template_vars`;
    a model without one is refused when the first conversational pair comes."""

    def __init__(self, tokenizer, tokenizer_path, chat_template, template_vars):
        self.tokenizer, self.model = tokenizer, model_of_tokenizer(tokenizer_path)
        self.template = chat.template_for(self.model, chat_template)  # None: the model keeps none
        self.variables = {**special_tokens(self.model, tokenizer), **template_vars}
        self.eos_text = self.variables.get("eos_token") or tokenizer.id_to_token(find_eos(tokenizer, tokenizer_path))
        # TRL's tokenizer.eos_token: the model's own, else the id the stream ends documents with

    def encode(self, form, prompt, chosen, rejected, where):
        """-> ([PC, PR] token id lists, n: where the completions start)."""
        if form == "plain":
            texts = [prompt] + [prompt + c + ("" if c.endswith(self.eos_text) else self.eos_text)
                                for c in (chosen, rejected)]
            ids = [self.tokenizer.encode(text).ids for text in texts]  # add_special_tokens=True, as tokenizer(text)
        else:
            ids = [self.tokenizer.encode(text, add_special_tokens=False).ids
                   for text in self._rendered(prompt, chosen, rejected, where)]
        return ids[1:], min(common_prefix(ids[0], ids[1]), common_prefix(ids[0], ids[2]))

    def _rendered(self, prompt, chosen, rejected, where):
        """[P, PC, PR] as the template renders them."""
        if self.template is None:
            raise InputError(f"{self.model}: the model has no chat template, which the conversational pair of {where} "
                             f"needs; give one with --chat-template FILE.jinja")
        try:
            return [chat.render(self.template, prompt, add_generation_prompt=True, **self.variables),
                    *(chat.render(self.template, prompt + turn, **self.variables) for turn in (chosen, rejected))]
        except InputError as e:  # a conversation the template refuses
            raise BadRecord(f"{where}: {e}") from None


def pair_windows(sequences, start, window, eos, truncate, where):
    """The two windows of a pair: ids (2, window) u32 -- each sequence from the window's first
    token, cut to the window, then EOS ids -- and mask (2, window) u8, 1 on the completion's tokens
    (from `start` on); and whether a sequence was cut. BadRecord where one is too long and
    truncate=False, or the prompt leaves no completion token in the window."""
    longest = max(len(ids) for ids in sequences)
    if start >= window:
        raise BadRecord(f"{where}: its prompt of {start} tokens leaves no completion token in a window of {window} "
                        f"(--seq-len {window - 1})")
    if longest > window and not truncate:
        raise BadRecord(f"{where}: a sequence of {longest} tokens does not fit a window of {window} (--seq-len "
                        f"{window - 1}); drop --no-truncate to cut it (and count it)")
    ids, mask = numpy.full((2, window), eos, dtype="<u4"), numpy.zeros((2, window), dtype=numpy.uint8)
    for row, sequence in enumerate(sequences):
        n = min(len(sequence), window)
        ids[row, :n], mask[row, start:n] = sequence[:n], 1
    return ids, mask, longest > window


def tokenize_pairs_to_shards(tokenizer_path, out_dir, inputs, seq_len, chat_template=None, template_vars=None,
                             shard_tokens=10_000_000, truncate=True, skip_invalid=False, dedup=False, log=None):
    """Tokenize the preference pairs of `inputs` into `out_dir`: u32 token shards and u8 mask
    shards (windows of seq_len + 1 tokens, two a pair) and manifest.json; return the manifest.
    `template_vars`: the template's variables (chat.template_variables). Progress lines go to `log`
    (default stderr). On any error the shards written so far are removed."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    template_vars = template_vars or {}
    encoder = PairEncoder(tokenizer, tokenizer_path, chat_template, template_vars)
    eos, vocab_size = find_eos(tokenizer, tokenizer_path), tokenizer.get_vocab_size(with_added_tokens=True)
    corpus, out = Corpus(inputs, skip_invalid), output_dir(out_dir)
    progress, unique = Progress(corpus, log), Dedup() if dedup else None
    window = seq_len + 1
    writer = ShardWriter(out, max(1, shard_tokens // (2 * window)) * 2 * window, (MASK,))  # shards of whole pairs
    counts = {"pairs": 0, "plain": 0, "conversational": 0, "truncated": 0, "chosen_tokens": 0, "rejected_tokens": 0}
    try:
        every = pairs(corpus)
        every = unique.filter(every, lambda p: json.dumps(p, ensure_ascii=False, sort_keys=True)) if unique else every
        for where, (form, *pair) in every:
            try:
                ids, mask, cut = pair_windows(*encoder.encode(form, *pair, where), window, eos, truncate, where)
            except BadRecord as e:
                corpus.reject(e)
                continue
            if int(ids.max()) >= vocab_size:
                raise InputError(f"{tokenizer_path}: produced token id {int(ids.max())} >= its vocab_size "
                                 f"{vocab_size} on {where}")
            writer.add(ids.reshape(-1), mask.reshape(-1))
            for key, n in (("pairs", 1), (form, 1), ("truncated", cut), ("chosen_tokens", mask[0].sum()),
                           ("rejected_tokens", mask[1].sum())):
                counts[key] += int(n)
            progress.update(writer.total)
        if counts["pairs"] == 0:
            raise InputError(f"no preference pairs in {', '.join(map(str, inputs)) or 'the inputs'} (files read: "
                             f"{len(corpus.files)}{corpus.skipped_note()})")
        writer.flush()
        progress.update(writer.total, final=True)
    except BaseException:
        writer.remove()
        raise
    rendering = {"template_sha256": hashlib.sha256(encoder.template.text.encode()).hexdigest(),
                 "template_origin": encoder.template.origin,
                 "template_vars": template_vars} if counts["conversational"] else {}
    manifest = {"schema": "pretokenize-bin-v1", "tokenizer": str(tokenizer_path), "vocab_size": vocab_size,
                "eos_policy": "padding", "eos_token_id": eos, "shard_count": writer.shards(),
                "total_tokens": writer.total, "masks": True, "positions": False,
                "pairs": {"seq_len": seq_len, **counts, **rendering},
                **corpus.manifest(), **(unique.manifest() if unique else {}),
                "elapsed_seconds": round(progress.seconds(), 3)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
