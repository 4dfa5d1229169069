"""Chat templates (minitrain/chat.py) and `tokenize --chat` (minitrain/tokenize_chat.py): found where
models keep them, rendered and tokenized as transformers renders and tokenizes them, and the
assistant's tokens marked as transformers' assistant masks mark them where a template has
`{% generation %}` markers (ours needs none). The tokenizer is the real SmolLM2-135M-Instruct's."""

import json
import subprocess
import sys

import numpy as np
import pytest

from minitrain import chat
from minitrain.errors import InputError
from minitrain.formats.sources import Template

# A ChatML template in the manner of Qwen2.5's (a default system turn; turns end <|im_end|>\n)
CHATML = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama-3's shape: bos, header tokens, content trimmed, <|eot_id|> without a newline
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# The same three (SmolLM2's own too) with transformers' generation markers around each assistant
# turn's content and end-of-turn text: what transformers' return_assistant_tokens_mask needs
MARKED = {
    "chatml": CHATML.replace("{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
                             "{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == 'assistant' %}"
                             "{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
                             "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"),
    "llama3": LLAMA3.replace("{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
                             "message['content'] | trim + '<|eot_id|>' }}",
                             "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
                             "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + "
                             "'<|eot_id|>' }}{% endgeneration %}{%- else %}{{- message['content'] | trim + "
                             "'<|eot_id|>' }}{%- endif %}"),
}
SMOLLM2_MARKED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                  "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n'}}"
                  "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}"
                  "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}, {"role": "user", "content": "Three?"},
     {"role": "assistant", "content": " def add3(a, b, c):\n    return a + b + c\n"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi! <|im_end|> is not special here"}],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from minitrain.formats.sources import load_tokenizer

    return load_tokenizer(smollm2)


def hf_tokenizer(tokenizer, template):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    hf.chat_template = template
    return hf


def ours(tokenizer, template, messages, bos=""):
    from minitrain.tokenize_chat import encode_conversation

    (example,) = encode_conversation(tokenizer, Template(template, "test"), {"bos_token": bos, "eos_token": "<|im_end|>"},
                                     messages, "test")  # these templates' turns only append: one example
    return example


@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3"])
def test_ids_and_masks_are_transformers(tokenizer, smollm2, name):
    """Token ids equal transformers' apply_chat_template(tokenize=True) on the unmarked template,
    and the masks its return_assistant_tokens_mask on the marked one, whose render is the same."""
    plain = {"smollm2": chat.model_template(smollm2).text, "chatml": CHATML, "llama3": LLAMA3}[name]
    marked = {"smollm2": SMOLLM2_MARKED, **MARKED}[name]
    for messages in CONVERSATIONS:
        out = hf_tokenizer(tokenizer, marked).apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, bos_token="<|bos|>")
        want_ids = hf_tokenizer(tokenizer, plain).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                                      bos_token="<|bos|>")["input_ids"]
        for template in (plain, marked):
            ids, mask = ours(tokenizer, template, messages, bos="<|bos|>")
            assert ids.tolist() == want_ids == out["input_ids"]
            assert mask.tolist() == out["assistant_masks"], name
        text = tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
        assert all(m["content"].strip() in text for m in messages if m["role"] == "assistant")
        assert not any(m["content"] in text for m in messages if m["role"] != "assistant")


def test_a_mask_off_by_one_token_is_caught(tokenizer, smollm2, monkeypatch):
    """The comparison above fails when the targets start one token late (a planted bug)."""
    target_mask = chat.target_mask

    def late(offsets, spans):
        mask = target_mask(offsets, spans)
        first = np.flatnonzero(mask)[:1]
        mask[first] = 0
        return mask

    monkeypatch.setattr(chat, "target_mask", late)
    out = hf_tokenizer(tokenizer, SMOLLM2_MARKED).apply_chat_template(
        CONVERSATIONS[1], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours(tokenizer, SMOLLM2_MARKED, CONVERSATIONS[1])[1].tolist() != out["assistant_masks"]


def test_templates_are_found_where_models_keep_them(tmp_path, smollm2):
    from minitrain.formats.apr import apr_tensors
    from minitrain.formats.apr import write_apr
    from minitrain.formats.apr_meta import model_metadata
    from minitrain.config import preset
    from minitrain.model import Model

    assert chat.model_template(smollm2).text.startswith("{% for message in messages %}")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert chat.model_template(hf).text == CHATML
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": LLAMA3}, {"name": "default", "template": CHATML}]}))
    assert chat.model_template(hf).text == CHATML
    (hf / "chat_template.jinja").write_text(LLAMA3)  # what transformers writes today wins
    assert chat.model_template(hf).text == LLAMA3
    config = preset("tiny-llama")
    model = Model.from_scratch(config)
    meta = model_metadata(config, model.num_parameters())
    write_apr(tmp_path / "m.apr", apr_tensors(config, {n: t.data for n, t in model.params.items()}),
              {**meta, "chat_template": CHATML})
    assert chat.model_template(tmp_path / "m.apr").text == CHATML
    write_apr(tmp_path / "none.apr", apr_tensors(config, {n: t.data for n, t in model.params.items()}), meta)
    assert chat.model_template(tmp_path / "none.apr") is None


def test_templates_render_in_a_sandbox_and_fail_in_one_line():
    with pytest.raises(InputError, match=r"the chat template of evil failed to render: .*unsafe|access"):
        chat.render(Template("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil"), [])
    with pytest.raises(InputError, match="of t.jinja failed to render: no system turns"):
        chat.render(Template("{{ raise_exception('no system turns') }}", "t.jinja"), [])
    shifting = Template("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}", "s.jinja")
    with pytest.raises(InputError, match="conv 3: turn 2 \\(assistant\\): the template of s.jinja renders"):
        chat.assistant_spans(shifting, CONVERSATIONS[1], "conv 3")


@pytest.mark.parametrize("line, message", [
    ({"text": "x"}, "no `messages` and no string `prompt` and `completion` (found keys: text)"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "message 1 has role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 1 must be an object with a string `content`"),
    ({"messages": []}, "`messages` must be a non-empty list"),
])
def test_bad_conversations_name_the_line(tmp_path, smollm2, line, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(line) + "\n")
    out = subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--chat", "--tokenizer", smollm2, "--out",
                          str(tmp_path / "out"), str(data)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"{data}:line 2: {message}" in out.stderr
    assert not list((tmp_path / "out").glob("shard-*"))  # nothing half-written is left


def test_tokenize_chat_writes_masks_beside_the_shards(tmp_path, smollm2):
    """`tokenize --chat` end to end: shards cut at the same tokens as their masks, EOS (mask 0)
    between conversations, the manifest's counts and template digest; a model without a template
    and no --chat-template is refused, and --chat-template overrides."""
    import hashlib

    from minitrain.formats.sources import load_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS) + "\n")
    run = [sys.executable, "-m", "minitrain", "tokenize", "--chat", "--tokenizer", smollm2, "--shard-tokens", "50"]
    out = subprocess.run([*run, "--out", str(tmp_path / "a"), str(data)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    ids = np.concatenate([np.fromfile(p, "<u4") for p in sorted((tmp_path / "a").glob("shard-*.bin"))])
    mask = np.concatenate([np.fromfile(p, "u1") for p in sorted((tmp_path / "a").glob("shard-*.mask"))])
    sizes = [p.stat().st_size for p in sorted((tmp_path / "a").glob("shard-*"))]
    assert sizes[0::2] == [4 * s for s in sizes[1::2]]  # .bin is 4 bytes a token, .mask 1
    tokenizer = load_tokenizer(smollm2)
    first, second = (ours(tokenizer, chat.model_template(smollm2).text, m) for m in CONVERSATIONS)
    assert ids.tolist() == first[0].tolist() + [manifest["eos_token_id"]] + second[0].tolist()
    assert mask.tolist() == first[1].tolist() + [0] + second[1].tolist()
    assert manifest["masks"] and manifest["shard_count"] == len(sizes) // 2
    assert manifest["chat"]["conversations"] == 2 and manifest["chat"]["target_tokens"] == int(mask.sum())
    assert manifest["chat"]["template_sha256"] == hashlib.sha256(chat.model_template(smollm2).text.encode()).hexdigest()
    (tmp_path / "t.jinja").write_text(CHATML)
    out = subprocess.run([*run, "--chat-template", str(tmp_path / "t.jinja"), "--out", str(tmp_path / "b"), str(data)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and json.loads((tmp_path / "b" / "manifest.json").read_text())["chat"][
        "template_origin"] == str(tmp_path / "t.jinja")
    tok_json = tmp_path / "hf" / "tokenizer.json"
    tok_json.parent.mkdir()
    tokenizer.save(str(tok_json))
    out = subprocess.run([*run[:-4], "--tokenizer", str(tok_json), "--out", str(tmp_path / "c"), str(data)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "has no chat template; give one with --chat-template" in out.stderr


def test_fine_tuning_on_conversations_counts_only_the_assistants_tokens(tmp_path, smollm2):
    """tokenize --chat, then pretrain and eval on what it wrote (the real SmolLM2): each step's
    target_tokens in metrics.jsonl are the masked tokens of its windows, and eval's mean runs over
    the same targets."""
    from minitrain.data import TokenWindows, target_count

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONVERSATIONS[k % 2]}) for k in range(6)) + "\n")
    out = subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--chat", "--tokenizer", smollm2, "--out",
                          str(tmp_path / "tok"), str(data)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    run = subprocess.run([sys.executable, "-m", "minitrain", "pretrain", "--init", smollm2, "--data", str(tmp_path / "tok"),
                          "--out", str(tmp_path / "run"), "--seq-len", "32", "--batch-size", "2", "--steps", "2",
                          "--val-windows", "2", "--eval-every", "0", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    windows = TokenWindows(tmp_path / "tok", 32, 49152)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "step"]
    assert [r["target_tokens"] for r in steps] == [target_count(windows.batch(range(2 * s, 2 * s + 2))[1])
                                                   for s in range(2)]
    ev = subprocess.run([sys.executable, "-m", "minitrain", "eval", "--init", smollm2, "--data", str(tmp_path / "tok"),
                         "--seq-len", "32", "--batch-size", "2", "--batches", "1", "--json"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["tokens"] == target_count(windows.batch([0, 1])[1])
    assert chat.model_template(tmp_path / "run" / "final.apr").text == chat.model_template(smollm2).text


def test_packing_is_best_fit_decreasing_and_counts_what_it_cuts():
    from minitrain.tokenize_chat import pack

    def conv(n):
        return (f"c{n}", np.arange(n, dtype="<u4"), np.ones(n, np.uint8))

    windows, truncated = pack([conv(n) for n in (3, 9, 5, 4, 12, 2)], window=10)
    assert [[len(ids) for ids, _ in w] for w in windows] == [[10], [9], [5, 4], [3, 2]] and truncated == 1
    with pytest.raises(InputError, match="c12: 12 tokens do not fit a window of 10"):
        pack([conv(12)], window=10, truncate=False)


def test_a_packed_window_computes_each_conversation_as_if_alone():
    """Three conversations in one window, positions restarting at each: every logit equals the
    conversation's own, run alone (float64, to 1e-12): RoPE turns by the positions and attention
    never crosses a conversation. Without the block-diagonal mask it does not hold."""
    from minitrain import backend
    from minitrain.config import ModelConfig
    from minitrain.model import Model

    cfg = ModelConfig(family="qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=24, vocab_size=50, max_position_embeddings=64, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    convs = [rng.integers(0, 50, n) for n in (5, 3, 6)]
    ids = np.concatenate(convs)[None]
    positions = np.concatenate([np.arange(len(c)) for c in convs])[None]
    with backend.precision("fp64"):
        model = Model.from_scratch(cfg, seed=1)
        alone = np.concatenate([model.forward(c[None]).data[0] for c in convs])
        packed = model.forward(ids, positions=positions).data[0]
        crossing = model.forward(ids).data[0]  # positions 0..13, every token sees all before it
    assert np.abs(packed - alone).max() <= 1e-12 * np.abs(alone).max()
    assert np.abs(crossing[5:] - alone[5:]).max() > 1e-3


def test_packed_data_trains_and_must_match_the_seq_len(tmp_path, smollm2):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONVERSATIONS[k % 2]}) for k in range(8)) + "\n")
    out = subprocess.run([sys.executable, "-m", "minitrain", "tokenize", "--chat", "--pack", "--seq-len", "127",
                          "--tokenizer", smollm2, "--out", str(tmp_path / "tok"), str(data)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["positions"] and manifest["packing"]["seq_len"] == 127 and manifest["chat"]["truncated"] == 0
    assert (tmp_path / "tok" / "shard-00000.pos").stat().st_size == 4 * manifest["total_tokens"]
    common = [sys.executable, "-m", "minitrain", "pretrain", "--init", smollm2, "--data", str(tmp_path / "tok"),
              "--batch-size", "1", "--steps", "1", "--val-windows", "1", "--eval-every", "0"]
    run = subprocess.run([*common, "--seq-len", "127", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    wrong = subprocess.run([*common, "--seq-len", "31", "--out", str(tmp_path / "wrong")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "was packed for another --seq-len than 31" in wrong.stderr, wrong.stderr


def test_generate_chat_prompts_and_greedy_replies_are_transformers(tmp_path, smollm2, tokenizer):
    """`generate --chat`: the prompt is transformers' apply_chat_template(add_generation_prompt=True)
    token for token, and the greedy reply transformers' greedy reply on the real SmolLM2 (float64
    truth, hf_oracle); the reply ends at the template's end of turn."""
    torch = pytest.importorskip("torch")
    from hf_oracle import float64_model

    from minitrain.formats.sources import load_model
    from minitrain.generate import Sampling, generate

    template = chat.model_template(smollm2)
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write a function that reverses a string."}]
    want = hf_tokenizer(tokenizer, template.text).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                                      add_generation_prompt=True)["input_ids"]
    template_, tokens = chat.chat_setup(smollm2, tokenizer)
    text = chat.render(template_, messages, add_generation_prompt=True, **tokens)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == want
    ours = generate(load_model(smollm2), [ids], 10, Sampling(temperature=0), stop_ids=(0, 2))[0][0].ids
    with torch.no_grad():
        theirs = float64_model(smollm2.parent, gguf_file=smollm2.name).generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, top_k=None, top_p=None)[0].tolist()[len(ids):]
    assert ours == theirs[:len(ours)]
    out = subprocess.run([sys.executable, "-m", "minitrain", "generate", "--init", smollm2, "--chat", "--system",
                          "You write Python.", "--prompt", "Write a function that reverses a string.",
                          "--max-new-tokens", "10", "--temperature", "0", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ids"] == ours and result["reply"] == tokenizer.decode(ours)


def test_the_chat_template_travels_through_every_format(tmp_path, smollm2, tokenizer):
    """GGUF -> APR -> GGUF -> HF directory -> APR keeps the template byte for byte; transformers
    renders it from the HF directory as we do; --chat-template at convert replaces it; inspect
    shows it; pretrain's final.apr carries --init's."""
    transformers = pytest.importorskip("transformers")

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "minitrain", *map(str, args)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    original = chat.model_template(smollm2).text
    run("convert", smollm2, tmp_path / "a.apr")
    run("convert", tmp_path / "a.apr", tmp_path / "b.gguf")
    run("convert", tmp_path / "b.gguf", tmp_path / "c")
    run("convert", tmp_path / "c", tmp_path / "d.apr")
    for path in ("a.apr", "b.gguf", "c", "d.apr"):
        assert chat.model_template(tmp_path / path).text == original, path
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "c")
    assert hf.eos_token == "<|im_end|>"
    assert hf.apply_chat_template(CONVERSATIONS[0], tokenize=False) == chat.render(chat.model_template(tmp_path / "c"),
                                                                                   CONVERSATIONS[0])
    (tmp_path / "t.jinja").write_text(CHATML)
    run("convert", smollm2, tmp_path / "e.gguf", "--chat-template", tmp_path / "t.jinja")
    assert chat.model_template(tmp_path / "e.gguf").text == CHATML
    info = json.loads(run("inspect", tmp_path / "d.apr", "--json").strip().splitlines()[-1])
    assert info["chat_template"]["present"] and info["chat_template"]["chars"] == len(original)
    assert f"chat template {len(CHATML):,} characters" in run("inspect", tmp_path / "e.gguf")
