"""Preference pairs -> pair shards with completion masks (`minitrain tokenize --preference`), for
`pretrain --objective dpo`.

Each record (a JSON Lines line or a Parquet row, compressed or not: corpus.py) holds `prompt`,
`chosen` and `rejected` in one of TRL's two forms:
  plain           three strings;
  conversational  `prompt` a list of messages (system/user/assistant turns, checked as
                  `tokenize --chat` checks them), `chosen` and `rejected` lists holding one
                  assistant message each.
They are tokenized as TRL's DPOTrainer tokenizes them (trl 1.16, trainer/dpo_trainer.py,
`tokenize_fn` and the `add_eos` before it):
  conversational  P = the chat template's render of `prompt` with the generation prompt, PC =
                  its render of prompt + chosen, PR of prompt + rejected (chat.py; the text
                  tokenized as transformers' apply_chat_template(tokenize=True) does: no tokens
                  added, the template writes its own);
  plain           the tokenizer's EOS text appended to chosen and rejected unless they end with
                  it; P = prompt, PC = prompt + chosen, PR = prompt + rejected, each tokenized
                  as transformers' tokenizer(text) does (its special tokens added, if any);
and the completion starts where the tokenized prompt stops being a prefix of both: n = min(common
prefix of P and PC, common prefix of P and PR). The chosen sequence is PC with mask 1 on its
tokens from n on, the rejected one PR likewise.

Layout (data.py reads it): windows of T + 1 tokens (T = --seq-len); pair k is windows 2k (PC)
and 2k + 1 (PR), each sequence at its window's start, the rest EOS ids with mask 0. shard-NNNNN.bin
(u32) and shard-NNNNN.mask (u8) hold whole pairs. A sequence longer than a window is cut to it
(keeping its start) and the pair counted as truncated -- unless truncate=False, which makes it a
bad record, as is a pair left with no completion token in either window. manifest.json says
"pairs": {seq_len, counts}.
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


def form_of(record, where):
    """"plain" or "conversational" for a record, (prompt, chosen, rejected) as given; BadRecord
    naming what is wrong."""
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
        for name, turn in (("chosen", chosen), ("rejected", rejected)):
            if len(turn) != 1 or not isinstance(turn[0], dict) or turn[0].get("role") != "assistant" \
                    or not isinstance(turn[0].get("content"), str):
                raise BadRecord(f"{where}: `{name}` must be a list of one assistant message {{\"role\": \"assistant\", "
                                f"\"content\": \"...\"}}")
        chosen, rejected = ([{"role": "assistant", "content": turn[0]["content"]}] for turn in (chosen, rejected))
    else:
        kinds = ", ".join(f"{k} {type(v).__name__}" for k, v in (("prompt", prompt), ("chosen", chosen),
                                                                 ("rejected", rejected)))
        raise BadRecord(f"{where}: expected three strings (plain) or three lists of messages (conversational), "
                        f"found {kinds}")
    if chosen == rejected:
        raise BadRecord(f"{where}: `chosen` and `rejected` are the same; a pair must prefer one of two")
    return form, prompt, chosen, rejected


def common_prefix(a, b):
    """The number of leading ids a and b share."""
    n = min(len(a), len(b))
    differ = numpy.flatnonzero(numpy.asarray(a[:n]) != numpy.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PairEncoder:
    """Token ids and masks of a pair, TRL's way (the module's docstring). `template` and
    `variables` (bos_token, eos_token and --template-var's) render conversational pairs; the
    template is looked for only when one comes (None: none given or found yet)."""

    def __init__(self, tokenizer, tokenizer_path, chat_template, template_vars):
        self.tokenizer, self.path, self.override, self.template_vars = tokenizer, tokenizer_path, chat_template, template_vars
        self.tokens = special_tokens(model_of_tokenizer(tokenizer_path), tokenizer)
        eos = find_eos(tokenizer, tokenizer_path)
        self.eos_text = self.tokens.get("eos_token") or tokenizer.id_to_token(eos)
        self.template = None

    def encode(self, form, prompt, chosen, rejected, where):
        """-> [(ids, mask)] of the chosen and the rejected sequence: u32 ids, u8 targets."""
        if form == "plain":
            texts = [prompt] + [prompt + c + ("" if c.endswith(self.eos_text) else self.eos_text) for c in (chosen, rejected)]
            ids = [self.tokenizer.encode(t).ids for t in texts]  # add_special_tokens=True, as tokenizer(text)
        else:
            ids = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in self._rendered(prompt, chosen, rejected, where)]
        start = min(common_prefix(ids[0], ids[1]), common_prefix(ids[0], ids[2]))
        return [(numpy.array(seq, dtype="<u4"), (numpy.arange(len(seq)) >= start).astype(numpy.uint8)) for seq in ids[1:]]

    def _rendered(self, prompt, chosen, rejected, where):
        if self.template is None:
            self.template = chat.chat_setup(model_of_tokenizer(self.path), self.tokenizer, self.override)[0]
        variables = {**self.tokens, **self.template_vars}
        try:
            return [chat.render(self.template, prompt, add_generation_prompt=True, **variables),
                    *(chat.render(self.template, prompt + turn, **variables) for turn in (chosen, rejected))]
        except InputError as e:  # a conversation the template refuses
            raise BadRecord(f"{where}: {e}") from None


def fit(pair, window, truncate, where):
    """The pair cut to `window` tokens a sequence -> (pair, whether it was cut); BadRecord where it
    may not be cut or a side keeps no target."""
    if all(len(ids) <= window for ids, _ in pair):
        return pair, False
    longest = max(len(ids) for ids, _ in pair)
    if not truncate:
        raise BadRecord(f"{where}: a sequence of {longest} tokens does not fit a window of {window} (--seq-len + 1); "
                        f"drop --no-truncate to cut it (and count it)")
    cut = [(ids[:window], mask[:window]) for ids, mask in pair]
    if not all(mask.any() for _, mask in cut):
        prompt = int(numpy.argmax(pair[0][1])) if pair[0][1].any() else len(pair[0][1])
        raise BadRecord(f"{where}: its prompt of {prompt} tokens leaves no completion token in a window of {window} "
                        f"(--seq-len + 1)")
    return cut, True


def tokenize_pairs_to_shards(tokenizer_path, out_dir, inputs, seq_len, chat_template=None, template_vars=None,
                             shard_tokens=10_000_000, truncate=True, skip_invalid=False, dedup=False, log=None):
    """Tokenize the preference pairs of `inputs` into `out_dir`: u32 token shards, u8 mask shards
    (windows of seq_len + 1 tokens, two a pair) and manifest.json; return the manifest.
    `template_vars`: the template's variables (chat.template_variables). Progress lines go to `log`
    (default stderr). On any error the shards written so far are removed."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    encoder = PairEncoder(tokenizer, tokenizer_path, chat_template, template_vars or {})
    eos, vocab_size = find_eos(tokenizer, tokenizer_path), tokenizer.get_vocab_size(with_added_tokens=True)
    corpus, out = Corpus(inputs, skip_invalid), output_dir(out_dir)
    progress, unique = Progress(corpus, log), Dedup() if dedup else None
    window = seq_len + 1
    writer = ShardWriter(out, max(1, shard_tokens // (2 * window)) * 2 * window, (MASK,))  # shards of whole pairs
    counts = {"pairs": 0, "plain": 0, "conversational": 0, "truncated": 0, "chosen_tokens": 0, "rejected_tokens": 0}
    try:
        records = corpus.records()
        if unique:
            records = unique.filter(records, lambda r: json.dumps(r, ensure_ascii=False, sort_keys=True))
        for where, record in records:
            try:
                form, *parts = form_of(record, where)
                pair, cut = fit(encoder.encode(form, *parts, where), window, truncate, where)
            except BadRecord as e:
                corpus.reject(e)
                continue
            for side, (ids, mask) in zip(("chosen", "rejected"), pair):
                if len(ids) and int(ids.max()) >= vocab_size:
                    raise InputError(f"{tokenizer_path}: produced token id {int(ids.max())} >= its vocab_size "
                                     f"{vocab_size} on {where}")
                pad = window - len(ids)
                writer.add(numpy.concatenate([ids, numpy.full(pad, eos, dtype="<u4")]),
                           numpy.concatenate([mask, numpy.zeros(pad, dtype=numpy.uint8)]))
                counts[f"{side}_tokens"] += int(mask.sum())
            counts["pairs"] += 1
            counts[form] += 1
            counts["truncated"] += cut
            progress.update(writer.total)
        if counts["pairs"] == 0:
            raise InputError(f"no preference pairs in {', '.join(map(str, inputs)) or 'the inputs'} (files read: "
                             f"{len(corpus.files)}{corpus.skipped_note()})")
        writer.flush()
        progress.update(writer.total, final=True)
    except BaseException:
        writer.remove()
        raise
    template = encoder.template
    rendering = {} if template is None else {
        "template_sha256": hashlib.sha256(template.text.encode()).hexdigest(), "template_origin": template.origin,
        "template_vars": template_vars or {}}
    manifest = {"schema": "pretokenize-bin-v1", "tokenizer": str(tokenizer_path), "vocab_size": vocab_size,
                "eos_policy": "padding", "eos_token_id": eos, "shard_count": writer.shards(),
                "total_tokens": writer.total, "masks": True, "positions": False,
                "pairs": {"seq_len": seq_len, **counts, **rendering},
                **corpus.manifest(), **(unique.manifest() if unique else {}),
                "elapsed_seconds": round(progress.seconds(), 3)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
