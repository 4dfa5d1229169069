"""`tokenize --chat` with Qwen3's chat template, whose turns do not only append: it drops the
reasoning of the assistant turns before the last user turn, and with enable_thinking=false its
generation prompt closes an empty `<think>` block. Each assistant turn is then an example of its own
(minitrain/chat.py): its ids are transformers' apply_chat_template of the conversation up to that
turn, and its targets the turn's text after the generation prompt, end-of-turn text included.

The template is Qwen/Qwen3-0.6B's as llama.cpp keeps it, tests/fixtures/qwen3_chat_template.jinja:
models/templates/Qwen-Qwen3-0.6B.jinja of llama.cpp (read from the fork ye-NX/llama.cpp, commit
b354d7c9ecb76c97c07098617cdebbdfffa2583e). The tokenizer is the real SmolLM2-135M-Instruct's with
Qwen3's `<think>` and `</think>` added as single tokens (it has `<|im_start|>` and `<|im_end|>`)."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_chat import CHATML, hf_tokenizer

from minitrain import chat
from minitrain.corpus import BadRecord
from minitrain.errors import InputError
from minitrain.formats.sources import Template

QWEN3_FILE = Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja"
QWEN3 = QWEN3_FILE.read_text()


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    return {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning is not None else {})}


SYSTEM = {"role": "system", "content": "You write Python."}
# Conversations without reasoning: every enable_thinking
PLAIN = [
    [user("Add two numbers."), assistant("def add(a, b):\n    return a + b")],
    [SYSTEM, user("Add two numbers."), assistant("def add(a, b):\n    return a + b"), user("Three?"),
     assistant("def add3(a, b, c):\n    return a + b + c"), user("And none?"), assistant("def zero():\n    return 0")],
]
# With reasoning, as `reasoning_content` and as a <think> block inside the content
THINKING = [
    [user("Is 7 prime?"), assistant("Yes.", "7 has no divisor but 1 and 7."), user("And 9?"),
     assistant("No: 9 = 3 * 3.", "9 is 3 squared.")],
    [SYSTEM, user("Reverse a string."),
     assistant("<think>\nSlicing does it.\n</think>\n\ndef rev(s):\n    return s[::-1]"), user("In place?"),
     assistant("<think>\nStrings are immutable.\n</think>\n\nNo: strings are immutable.")],
]


def expected_target(message, enable_thinking):
    """The text a turn is trained on, written out by hand from Qwen3's template: the generation
    prompt `<|im_start|>assistant\\n` (with enable_thinking=false, and an empty `<think>` block) is
    the prompt; the rest of the turn, `<|im_end|>\\n` included, is the target."""
    content, reasoning = message["content"], message.get("reasoning_content", "")
    if "</think>" in content:
        reasoning, content = content.split("</think>")[0].split("<think>")[-1].strip("\n"), content.split("</think>")[1]
    end = content.lstrip("\n") + "<|im_end|>\n"
    return end if enable_thinking is False else f"<think>\n{reasoning}\n</think>\n\n" + end


@pytest.fixture(scope="module")
def qwen3_tokenizer(smollm2):
    from tokenizers import AddedToken, Tokenizer

    from minitrain.formats.sources import load_tokenizer

    tokenizer = Tokenizer.from_str(load_tokenizer(smollm2).to_str())
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    assert all(tokenizer.token_to_id(t) is not None for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    return tokenizer


def ours(tokenizer, messages, variables, template=QWEN3):
    from minitrain.tokenize_chat import encode_conversation

    return encode_conversation(tokenizer, Template(template, "qwen3.jinja"),
                               {"bos_token": "", "eos_token": "<|im_end|>", **variables}, messages, "test")


def compare(tokenizer, messages, variables):
    """(found, expected): each example's ids and the decoded text of its targets, ours and
    transformers'/written out: one example per assistant turn, the conversation up to it."""
    hf = hf_tokenizer(tokenizer, QWEN3)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    found = [(ids.tolist(), tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False))
             for ids, mask in ours(tokenizer, messages, variables)]
    expected = [(hf.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=True, **variables)["input_ids"],
                 expected_target(messages[i], variables.get("enable_thinking"))) for i in turns]
    return found, expected


@pytest.mark.parametrize("variables", [{}, {"enable_thinking": True}, {"enable_thinking": False}],
                         ids=["unset", "thinking", "not-thinking"])
def test_each_turn_is_an_example_as_transformers_renders_it(qwen3_tokenizer, variables):
    """Single and multi-turn, with and without a system turn, with reasoning as reasoning_content
    and inside the content: the examples' ids are transformers', the targets the turn's text
    (a run of tokens ending the example). With enable_thinking=false, reasoning is refused."""
    for messages in PLAIN + (THINKING if variables.get("enable_thinking") is not False else []):
        found, expected = compare(qwen3_tokenizer, messages, variables)
        assert found == expected
        for ids, mask in ours(qwen3_tokenizer, messages, variables):
            at = np.flatnonzero(mask)
            assert at[-1] == len(ids) - 1 and len(at) == at[-1] - at[0] + 1  # one run, to the end
    assert len(ours(qwen3_tokenizer, PLAIN[1], variables)) == 3
    if variables.get("enable_thinking") is False:
        for messages in THINKING:  # the first assistant turn has reasoning; the prompt closed <think>
            with pytest.raises(BadRecord, match=r"test: turn [23] \(assistant\): the template of qwen3.jinja "
                                                r"renders the conversation up to this turn so that it does not start "
                                                r"with the generation prompt"):
                ours(qwen3_tokenizer, messages, variables)


def test_a_mask_off_by_one_token_is_caught(qwen3_tokenizer, monkeypatch):
    """The comparison above fails when the targets start one token late (a planted bug)."""
    target_mask = chat.target_mask

    def late(offsets, spans):
        mask = target_mask(offsets, spans)
        mask[np.flatnonzero(mask)[:1]] = 0
        return mask

    monkeypatch.setattr(chat, "target_mask", late)
    for messages in (PLAIN[0], THINKING[0]):
        found, expected = compare(qwen3_tokenizer, messages, {"enable_thinking": False} if messages is PLAIN[0] else {})
        assert [ids for ids, _ in found] == [ids for ids, _ in expected]
        assert all(f != e for (_, f), (_, e) in zip(found, expected))


def test_templates_that_only_append_keep_one_example(qwen3_tokenizer):
    """A ChatML template's turns only append: the whole conversation is one example with every
    assistant turn's targets, as before; Qwen3's single turn is one example too."""
    (ids, mask), = ours(qwen3_tokenizer, PLAIN[1], {}, template=CHATML)
    text = qwen3_tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert text == "".join(m["content"] + "<|im_end|>\n" for m in PLAIN[1] if m["role"] == "assistant")
    assert len(ours(qwen3_tokenizer, PLAIN[0], {})) == 1


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
     "message 2 has `tool_calls`; tool calls and tool turns are not trained"),
    ({"role": "tool", "content": "42"}, "message 2 has role 'tool'; expected one of system, user, assistant"),
    ({"role": "user", "content": "x", "reasoning_content": "y"},
     "message 2 \\(user\\) has `reasoning_content`; only assistant turns have"),
    (assistant("x", 3), "message 2: expected a string `reasoning_content`, found int"),
])
def test_tool_calls_and_misplaced_reasoning_are_refused(message, error):
    with pytest.raises(BadRecord, match=f"^d.jsonl:line 4: {error}$"):
        chat.messages_of({"messages": [user("q"), message]}, "d.jsonl:line 4")


def test_reasoning_content_passes_through():
    assert chat.messages_of({"messages": [user("q"), {**assistant("a", "r"), "x": 1}]}, "w") == [user("q"),
                                                                                              assistant("a", "r")]
    assert chat.messages_of({"messages": [user("q"), {**assistant("a"), "reasoning_content": None}]}, "w") == [
        user("q"), assistant("a")]


def test_reasoning_a_template_drops_is_refused(qwen3_tokenizer):
    with pytest.raises(BadRecord, match=r"test: turn 2 \(assistant\): expected its `reasoning_content` among the "
                                        r"turn's targets, found the template of qwen3.jinja does not render it"):
        ours(qwen3_tokenizer, THINKING[0][:2], {}, template=CHATML)


def test_template_variables_are_json_or_strings():
    assert chat.template_variables(["enable_thinking=false", "n=3", "name=Qwen", "x=[1, 2]", "e="]) == {
        "enable_thinking": False, "n": 3, "name": "Qwen", "x": [1, 2], "e": ""}
    for pair, error in (("enable_thinking", "found no ="), ("a-b=1", "found KEY 'a-b'"),
                        ("messages=[]", "found messages, which minitrain sets")):
        with pytest.raises(InputError, match=f"^--template-var {re.escape(pair)}: expected .*, {error}$"):
            chat.template_variables([pair])
    with pytest.raises(InputError, match="found n, given twice"):
        chat.template_variables(["n=1", "n=2"])


def run(*args):
    return subprocess.run([sys.executable, "-m", "minitrain", "tokenize", *map(str, args)], capture_output=True,
                          text=True)


def test_tokenize_chat_with_qwen3_and_enable_thinking_false(tmp_path, qwen3_tokenizer):
    """End to end: each assistant turn an example, EOS (mask 0) between examples, the targets the
    turns' content and <|im_end|>\\n; the variables recorded in manifest.json."""
    (tmp_path / "tok").mkdir()
    qwen3_tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in PLAIN))
    out = run("--chat", "--tokenizer", tmp_path / "tok" / "tokenizer.json", "--chat-template", QWEN3_FILE,
              "--template-var", "enable_thinking=false", "--out", tmp_path / "out", "--json", data)
    assert out.returncode == 0, out.stderr
    assert "2 conversations as 4 examples ->" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1])["examples"] == 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["chat"]["template_vars"] == {"enable_thinking": False}
    assert manifest["chat"]["template_sha256"] == hashlib.sha256(QWEN3.encode()).hexdigest()
    assert (manifest["chat"]["conversations"], manifest["chat"]["examples"], manifest["eos_token_count"]) == (2, 4, 3)
    ids = np.fromfile(tmp_path / "out" / "shard-00000.bin", "<u4")
    mask = np.fromfile(tmp_path / "out" / "shard-00000.mask", "u1")
    examples = [e for m in PLAIN for e in compare(qwen3_tokenizer, m, {"enable_thinking": False})[1]]
    start = 0
    for k, (example, target) in enumerate(examples):
        if k:  # the EOS between examples, not a target
            assert (ids[start], mask[start]) == (manifest["eos_token_id"], 0)
            start += 1
        part = slice(start, start + len(example))
        assert ids[part].tolist() == example
        assert qwen3_tokenizer.decode(ids[part][mask[part] == 1].tolist(), skip_special_tokens=False) == target
        start += len(example)
    assert start == len(ids) == manifest["total_tokens"]
    assert manifest["chat"]["target_tokens"] == int(mask.sum())


@pytest.mark.parametrize("args, error", [
    (["--chat", "--template-var", "enable_thinking"], "--template-var enable_thinking: expected KEY=VALUE"),
    (["--template-var", "enable_thinking=false"], "--template-var is for conversations: give --chat (or --preference) too"),
])
def test_template_var_needs_key_equals_value_and_chat(tmp_path, args, error):
    out = run("--tokenizer", "tok.json", "--out", tmp_path / "out", *args, tmp_path / "d.jsonl")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and error in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()
