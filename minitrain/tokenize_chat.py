"""Conversations -> token shards with loss masks (`minitrain tokenize --chat`).

Each JSONL line holds one conversation: `messages` (system, user and assistant turns) or a
`prompt` and a `completion`. It is rendered with the model's chat template (minitrain/chat.py)
and tokenized as transformers' apply_chat_template(tokenize=True) tokenizes it (the rendered
text, no tokens added: the template writes its own). Beside each token shard `shard-NNNNN.bin` a
mask shard `shard-NNNNN.mask` holds one byte per token, 1 where the token is a training target:
the assistant turns' content and the end-of-turn text the template writes after it
(chat.assistant_spans). Conversations follow one another with the EOS id between them (mask 0),
as documents do in tokenize.py. manifest.json says so ("masks": true) and records the template's
sha256 and origin and the counts.
"""

import hashlib
import json
import time

import numpy

from minitrain import chat
from minitrain.errors import InputError
from minitrain.tokenize import ShardWriter, find_eos, input_files, jsonl_records, load_tokenizer, output_dir

MASK = (".mask", "u1")


def conversations(files):
    """Yield (label, messages) for every conversation of the JSONL files."""
    for path in files:
        if path.suffix != ".jsonl":
            raise InputError(f"{path}: --chat reads JSONL files (one conversation per line), not {path.suffix or 'this'}")
        for where, record in jsonl_records(path):
            yield where, chat.messages_of(record, where)


def encode_conversation(tokenizer, template, tokens, messages, where):
    """(ids, mask) of one conversation: u32 token ids and u8 targets."""
    text, spans = chat.assistant_spans(template, messages, where, **tokens)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return numpy.array(encoding.ids, dtype="<u4"), chat.target_mask(encoding.offsets, spans)


def tokenize_chat_to_shards(tokenizer_path, out_dir, inputs, chat_template=None, shard_tokens=10_000_000):
    """Tokenize the conversations of `inputs` into `out_dir` as u32 token shards, u8 mask shards and
    manifest.json; return the manifest. On any error the shards written so far are removed."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    template, tokens = chat.chat_setup(tokenizer_path, tokenizer, chat_template)
    eos, vocab_size = find_eos(tokenizer, tokenizer_path), tokenizer.get_vocab_size(with_added_tokens=True)
    files, out = input_files(inputs), output_dir(out_dir)
    writer, count, targets = ShardWriter(out, shard_tokens, (MASK,)), 0, 0
    try:
        for where, messages in conversations(files):
            ids, mask = encode_conversation(tokenizer, template, tokens, messages, where)
            if len(ids) and int(ids.max()) >= vocab_size:
                raise InputError(f"{tokenizer_path}: produced token id {int(ids.max())} >= its vocab_size "
                                 f"{vocab_size} on {where}")
            if count:
                writer.add(numpy.array([eos], dtype="<u4"), numpy.zeros(1, dtype=numpy.uint8))
            writer.add(ids, mask)
            count, targets = count + 1, targets + int(mask.sum())
        writer.flush()
        if count == 0:
            raise InputError(f"no conversations in {', '.join(map(str, inputs)) or 'the inputs'} (files read: {len(files)})")
    except BaseException:
        for p in writer.paths:
            p.unlink(missing_ok=True)
        raise
    manifest = {"schema": "pretokenize-bin-v1", "tokenizer": str(tokenizer_path), "vocab_size": vocab_size,
                "eos_policy": "between", "eos_token_id": eos, "eos_token_count": count - 1,
                "shard_count": writer.shards(), "total_tokens": writer.total, "masks": True,
                "chat": {"template_sha256": hashlib.sha256(template.text.encode()).hexdigest(),
                         "template_origin": template.origin, "conversations": count, "target_tokens": targets,
                         "truncated": 0},
                "input_files": [str(f) for f in files], "elapsed_seconds": round(time.perf_counter() - start, 3)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
