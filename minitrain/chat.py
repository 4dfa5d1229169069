"""Chat templates: rendering them, and which characters of a rendered conversation are the
assistant's (the targets of fine-tuning on conversations).

The template is `--chat-template FILE.jinja` where the user gives one, else the model's own,
read where its format keeps it (formats/sources.py: an HF directory's `chat_template.jinja`, else
its `tokenizer_config.json`'s `chat_template`, a string or a list of {"name", "template"} of which
the one named "default", else the first; a GGUF's `tokenizer.chat_template`; an APR's metadata
`chat_template`).

Rendering: a template comes from a model file, so it is data, not code: Jinja2's
ImmutableSandboxedEnvironment renders it (no attribute of Python's internals, no mutation of what
it is given), with trim_blocks and lstrip_blocks, loop controls, `raise_exception(message)` and a
`tojson` that does not escape HTML, as transformers renders it; its variables are `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` and those the user gives (`--template-var
KEY=VALUE`, as transformers' apply_chat_template(**kwargs) passes them: Qwen3's
`enable_thinking`). `{% generation %}` markers (TRL's way of marking the assistant's tokens)
render their content; nothing here needs them.

The assistant's part of a conversation, without markers: for each assistant turn i,
    before = render(messages[:i], add_generation_prompt=True)    ends with the turn's role header
    after = render(messages[:i + 1])                               ends after its end-of-turn text
and `after` must extend `before` (else an error naming the turn: its tokens cannot be told apart
from the prompt). The turn's targets are the characters after - before: its content and whatever
the template emits after it, up to the next turn (the end-of-turn token, a newline) -- and, where
the generation prompt leaves it to the model, its reasoning (Qwen3's `<think>` block).

What is trained on a conversation (its examples), decided conversation by conversation:
- where the whole conversation's render extends every turn's `after` (the template's turns only
  append), one example: the whole render, every assistant turn's targets in it. Each turn's
  targets then follow exactly the text they follow in their own `after`.
- else (Qwen3's template drops the reasoning of the assistant turns before the last user turn, so
  an earlier turn renders one way as the last message and another inside the whole), one example
  per assistant turn: its `after`, the conversation up to and including the turn as the template
  renders it when the turn is the last message, with that turn's targets only.
Either way every assistant turn is trained once, on the text the template renders before it when
it is the turn to be generated; an example is what transformers' apply_chat_template renders for
the messages it holds.
"""

import json
from datetime import datetime
from functools import lru_cache

from minitrain.corpus import BadRecord
from minitrain.errors import InputError
from minitrain.formats.sources import model_template, special_tokens, template_file

ROLES = ("system", "user", "assistant")
SET_HERE = ("messages", "add_generation_prompt", "bos_token", "eos_token")  # no --template-var of these


@lru_cache(maxsize=8)
def _compiled(text):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %} ... {% endgeneration %}: the body, as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(text)


def render(template, messages, add_generation_prompt=False, bos_token="", eos_token="", **variables):
    """The template's text for `messages` (a list of {"role", "content"}), with the template's
    other `variables` (template_variables'); InputError with Jinja's message and the template's
    origin if it fails."""
    import jinja2

    try:
        return _compiled(template.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=bos_token, eos_token=eos_token, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"the chat template of {template.origin} failed to render: {e}") from None


def assistant_spans(template, messages, where, **variables):
    """The examples of one conversation, [(text, spans)]: each rendered text and the [start, end)
    character spans of its targets (see the module's docstring). `where` names the conversation in
    errors ("data.jsonl line 7"); `variables`: bos_token, eos_token and template_variables'."""

    def rendered(part, add_generation_prompt=False):
        try:
            return render(template, part, add_generation_prompt, **variables)
        except InputError as e:  # a conversation the template refuses
            raise BadRecord(f"{where}: {e}") from None

    text, turns = rendered(messages), []  # turns: (before, after) of each assistant turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = rendered(messages[:i], add_generation_prompt=True), rendered(messages[:i + 1])
        if not after.startswith(before):
            raise BadRecord(f"{where}: turn {i + 1} (assistant): the template of {template.origin} renders the "
                             f"conversation up to this turn so that it does not start with the generation prompt "
                             f"before it, so the turn's tokens cannot be told apart from the prompt")
        if message.get("reasoning_content", "").strip() not in after[len(before):]:
            raise BadRecord(f"{where}: turn {i + 1} (assistant): expected its `reasoning_content` among the turn's "
                             f"targets, found the template of {template.origin} does not render it there")
        turns.append((before, after))
    spans = [[(len(before), len(after))] if len(after) > len(before) else [] for before, after in turns]
    if all(text.startswith(after) for _, after in turns):  # the turns only append: one example
        return [(text, [span for turn in spans for span in turn])]
    return [(after, turn) for (_, after), turn in zip(turns, spans)]


def messages_of(record, where):
    """The conversation of one record: its `messages` (system/user/assistant turns, each with
    string content; an assistant turn may also have a string `reasoning_content`, which templates
    that read it render -- Qwen3's; tool calls and tool turns are refused), or `prompt` and
    `completion` as a user and an assistant turn. `record` is a JSON object (a JSON Lines line or a Parquet row)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord(f"{where}: `messages` must be a non-empty list of {{\"role\", \"content\"}} objects")
        for n, m in enumerate(messages, 1):
            if isinstance(m, dict) and m.get("tool_calls"):
                raise BadRecord(f"{where}: message {n} has `tool_calls`; tool calls and tool turns are not trained")
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRecord(f"{where}: message {n} must be an object with a string `content`")
            if m.get("role") not in ROLES:
                raise BadRecord(f"{where}: message {n} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
            reasoning = m.get("reasoning_content")
            if reasoning is not None and m["role"] != "assistant":
                raise BadRecord(f"{where}: message {n} ({m['role']}) has `reasoning_content`; only assistant turns "
                                 f"have")
            if reasoning is not None and not isinstance(reasoning, str):
                raise BadRecord(f"{where}: message {n}: expected a string `reasoning_content`, found "
                                 f"{type(reasoning).__name__}")
        return [{"role": m["role"], "content": m["content"],
                 **({"reasoning_content": m["reasoning_content"]} if m.get("reasoning_content") is not None else {})}
                for m in messages]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise BadRecord(f"{where}: no `messages` and no string `prompt` and `completion` (found keys: "
                     f"{', '.join(record) or 'none'})")


def template_variables(pairs):
    """{KEY: value} of --template-var KEY=VALUE options: the value as JSON where it parses as JSON
    (true, false, 3, "quoted", [1, 2]), else the string itself; InputError naming a malformed one."""
    variables = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not (equals and key.isidentifier()):
            raise InputError(f"--template-var {pair}: expected KEY=VALUE with KEY a name (enable_thinking=false), "
                             f"found {f'KEY {key!r}' if equals else 'no ='}")
        if key in SET_HERE or key in variables:
            raise InputError(f"--template-var {pair}: expected a variable of the template's own, found {key}, "
                             f"{'which minitrain sets' if key in SET_HERE else 'given twice'}")
        try:
            variables[key] = json.loads(value)
        except json.JSONDecodeError:
            variables[key] = value
    return variables


def chat_setup(model, tokenizer, override=None):
    """(Template, special tokens) to render conversations for `model`: template_for's, an error
    without one; the special tokens as special_tokens gives them."""
    template = template_for(model, override)
    if template is None:
        raise InputError(f"{model}: the model has no chat template; give one with --chat-template FILE.jinja")
    return template, special_tokens(model, tokenizer)


def template_for(model, override=None):
    """The template given (`--chat-template FILE.jinja`), else the one `model` keeps (None: no
    model, or it keeps none)."""
    if override:
        return template_file(override)
    return None if model is None else model_template(model)


def target_mask(offsets, spans):
    """One 0/1 per token from the tokens' (start, end) character offsets: 1 where a token overlaps
    a target span (a token that holds a span's first or last character counts, as transformers'
    assistant masks count it)."""
    import numpy

    mask = numpy.zeros(len(offsets), dtype=numpy.uint8)
    if not spans or not len(offsets):
        return mask
    o = numpy.asarray(offsets, dtype=numpy.int64).reshape(-1, 2)
    for start, end in spans:
        mask[(o[:, 0] < end) & (o[:, 1] > start)] = 1
    return mask
