"""The `minitrain` command line (contract: ../shared/docs/interface.md).

Exit codes: 0 success, 1 anything unexpected (or a failed check), 2 bad usage or bad input,
3 training aborted. Errors are one line on stderr, never a traceback.
"""

import json
import math
import sys

import click

from minitrain import __version__
from minitrain.errors import InputError


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
@click.option("--init", "init_path", required=True, metavar="PATH", help="Hugging Face checkpoint directory.")
@click.option("--data", "data_path", required=True, metavar="PATH", help="A .bin file or a directory of .bin shards.")
@click.option("--seq-len", type=click.IntRange(min=1), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), required=True)
@click.option("--batches", type=click.IntRange(min=1), default=None, help="Default: every full batch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
def evaluate(init_path, data_path, seq_len, batch_size, batches, as_json):
    """Mean cross-entropy over all targets of the first BATCHES * BATCH_SIZE windows."""
    from minitrain.autograd import no_grad
    from minitrain.data import TokenWindows
    from minitrain.sources import load_model

    model = load_model(init_path)
    data = TokenWindows(data_path, seq_len, model.config.vocab_size)
    n = batches or len(data) // batch_size
    if n == 0 or n * batch_size > len(data):
        raise InputError(f"{data_path}: {len(data)} windows of {seq_len + 1} tokens; {batches or 1} batches of "
                         f"{batch_size} need {(batches or 1) * batch_size}")
    total = 0.0
    with no_grad():
        for i in range(n):
            inputs, targets = data.batch(range(i * batch_size, (i + 1) * batch_size))
            total += float(model.loss(inputs, targets).data) * inputs.size  # batch mean x its tokens
            click.echo(f"\reval batch {i + 1}/{n}", err=True, nl=False)
    click.echo("", err=True)
    tokens = n * batch_size * seq_len
    loss = total / tokens
    result = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
    click.echo(json.dumps(result) if as_json else f"loss {loss:.6f}  ppl {result['ppl']:.3f}  tokens {tokens}")


def main():
    """Console entry point: one-line errors with the contract's exit codes."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except InputError as e:
        click.echo(f"minitrain: error: {e}", err=True)
        code = 2
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
