"""Conversations -> token shards with loss masks (`minitrain tokenize --chat`).

Each record (a JSON Lines line or a Parquet row, compressed or not: corpus.py) holds one
conversation: `messages` (system, user and assistant turns) or a `prompt` and a `completion`.
It is rendered with the model's chat template (minitrain/chat.py; with the --template-var
variables) as one example -- or, where the template's turns do not only append (Qwen3's), as one
example per assistant turn (chat.assistant_spans) -- and each example tokenized as transformers'
apply_chat_template(tokenize=True) tokenizes it (the rendered text, no tokens added: the template
writes its own). Beside each token shard `shard-NNNNN.bin` a mask shard `shard-NNNNN.mask` holds
one byte per token, 1 where the token is a training target: the assistant turns' content and the
end-of-turn text the template writes after it. Examples follow one another with the EOS id
between them (mask 0), as documents do in tokenize.py. manifest.json says so ("masks": true) and
records the template's sha256, origin and variables and the counts.

Packing (`--pack --seq-len T`): whole examples (conversations, or the turns of one) go into windows
of T + 1 tokens, the windows training reads, by best-fit decreasing (longest first, each into the
fullest window it fits, a new window when none has room); the rest of a window is padding (EOS
ids, mask 0). A positions shard `shard-NNNNN.pos` (u32) gives each token's position inside its
example (padding: a run of its own), from which training builds RoPE's positions and a
block-diagonal causal mask (model.hidden): no example sees another. An example longer than a
window is cut to one window and counted ("truncated"), or refused (truncate=False). The examples
are held in memory while packing (5 bytes a token).
"""

import bisect
import hashlib
import json

import numpy

from minitrain import chat
from minitrain.corpus import BadRecord, Corpus, Dedup, Progress
from minitrain.errors import InputError
from minitrain.formats.sources import load_tokenizer, model_of_tokenizer
from minitrain.formats.vocab import find_eos
from minitrain.tokenize import ShardWriter, output_dir

MASK = (".mask", "u1")
POS = (".pos", "<u4")


def conversations(corpus):
    """Yield (label, messages) for every conversation of the corpus's records (a record that holds
    none: corpus.reject)."""
    for where, record in corpus.records():
        try:
            yield where, chat.messages_of(record, where)
        except BadRecord as e:
            corpus.reject(e)


def encode_conversation(tokenizer, template, variables, messages, where):
    """[(ids, mask)] of one conversation's examples: u32 token ids and u8 targets. `variables`:
    the template's (bos_token, eos_token and the --template-var ones)."""
    encoded = []
    for text, spans in chat.assistant_spans(template, messages, where, **variables):
        encoding = tokenizer.encode(text, add_special_tokens=False)
        encoded.append((numpy.array(encoding.ids, dtype="<u4"), chat.target_mask(encoding.offsets, spans)))
    return encoded


def pack(encoded, window, truncate=True):
    """Best-fit decreasing: `encoded` [(label, ids, mask)] -> (windows [[(ids, mask), ...]],
    truncated count). Each example is cut to `window` tokens (or, with truncate=False, an
    error naming it)."""
    items, truncated = [], 0
    for label, ids, mask in encoded:
        if len(ids) > window:
            if not truncate:
                raise InputError(f"{label}: {len(ids)} tokens do not fit a window of {window} (--seq-len + 1); "
                                 f"drop --no-truncate to cut it to one window")
            ids, mask, truncated = ids[:window], mask[:window], truncated + 1
        items.append((ids, mask))
    order = sorted(range(len(items)), key=lambda k: -len(items[k][0]))  # longest first (stable)
    windows, free = [], []  # free: sorted (room left, window index)
    for k in order:
        n = len(items[k][0])
        at = bisect.bisect_left(free, (n, -1))  # the fullest window with room for n
        if at == len(free):
            windows.append([])
            room, w = window, len(windows) - 1
        else:
            room, w = free.pop(at)
        windows[w].append(items[k])
        if room - n:
            bisect.insort(free, (room - n, w))
    return windows, truncated


def tokenize_chat_to_shards(tokenizer_path, out_dir, inputs, chat_template=None, template_vars=None,
                            shard_tokens=10_000_000, pack_seq_len=None, truncate=True, skip_invalid=False,
                            dedup=False, log=None):
    """Tokenize the conversations of `inputs` into `out_dir` as u32 token shards, u8 mask shards and
    manifest.json (packed into windows of pack_seq_len + 1 tokens with u32 positions shards, when
    given); return the manifest. `template_vars`: the template's variables (chat.template_variables).
    Progress lines go to `log` (default stderr). On any error the shards written so far are
    removed."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    template, tokens = chat.chat_setup(model_of_tokenizer(tokenizer_path), tokenizer, chat_template)
    template_vars = template_vars or {}
    eos, vocab_size = find_eos(tokenizer, tokenizer_path), tokenizer.get_vocab_size(with_added_tokens=True)
    corpus, out = Corpus(inputs, skip_invalid), output_dir(out_dir)
    progress, unique = Progress(corpus, log), Dedup() if dedup else None
    window = None if pack_seq_len is None else pack_seq_len + 1
    if window is not None:
        shard_tokens = max(1, shard_tokens // window) * window  # shards of whole windows
    writer = ShardWriter(out, shard_tokens, (MASK,) if window is None else (MASK, POS))
    count, examples, held, targets, encoded, extra = 0, 0, 0, 0, [], {}
    try:
        every = conversations(corpus)
        every = unique.filter(every, lambda m: json.dumps(m, ensure_ascii=False, sort_keys=True)) if unique else every
        for where, messages in every:
            try:
                parts = encode_conversation(tokenizer, template, {**tokens, **template_vars}, messages, where)
            except BadRecord as e:
                corpus.reject(e)
                continue
            for ids, mask in parts:
                if len(ids) and int(ids.max()) >= vocab_size:
                    raise InputError(f"{tokenizer_path}: produced token id {int(ids.max())} >= its vocab_size "
                                     f"{vocab_size} on {where}")
                if window is not None:
                    encoded.append((where, ids, mask))
                    held += len(ids)
                else:
                    if examples:
                        writer.add(numpy.array([eos], dtype="<u4"), numpy.zeros(1, dtype=numpy.uint8))
                    writer.add(ids, mask)
                    targets += int(mask.sum())
                examples += 1
            count += 1
            progress.update(writer.total + held)
        if count == 0:
            raise InputError(f"no conversations in {', '.join(map(str, inputs)) or 'the inputs'} (files read: "
                             f"{len(corpus.files)}{corpus.skipped_note()})")
        if window is not None:
            windows, extra["truncated"] = pack(encoded, window, truncate)
            padding = 0
            for parts in windows:
                pad = window - sum(len(ids) for ids, _ in parts)
                writer.add(numpy.concatenate([ids for ids, _ in parts] + [numpy.full(pad, eos, dtype="<u4")]),
                           numpy.concatenate([mask for _, mask in parts] + [numpy.zeros(pad, dtype=numpy.uint8)]),
                           numpy.concatenate([numpy.arange(len(ids)) for ids, _ in parts] + [numpy.arange(pad)]))
                targets += sum(int(mask.sum()) for _, mask in parts)
                padding += pad
            extra["packing"] = {"seq_len": pack_seq_len, "windows": len(windows), "padding_tokens": padding,
                                "method": "best-fit decreasing"}
        writer.flush()
        progress.update(writer.total, final=True)
    except BaseException:
        writer.remove()
        raise
    manifest = {"schema": "pretokenize-bin-v1", "tokenizer": str(tokenizer_path), "vocab_size": vocab_size,
                "eos_policy": "between" if window is None else "padding", "eos_token_id": eos,
                "eos_token_count": examples - 1 if window is None else extra["packing"]["padding_tokens"],
                "shard_count": writer.shards(), "total_tokens": writer.total, "masks": True,
                "positions": window is not None,
                "chat": {"template_sha256": hashlib.sha256(template.text.encode()).hexdigest(),
                         "template_origin": template.origin, "template_vars": template_vars,
                         "conversations": count, "examples": examples, "target_tokens": targets,
                         "truncated": extra.get("truncated", 0)},
                **({"packing": extra["packing"]} if window is not None else {}),
                **corpus.manifest(), **(unique.manifest() if unique else {}),
                "elapsed_seconds": round(progress.seconds(), 3)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
