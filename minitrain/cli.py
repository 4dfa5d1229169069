"""The `minitrain` command line (contract: ../shared/docs/interface.md).

Exit codes: 0 success, 1 anything unexpected (or a failed check), 2 bad usage or bad input,
3 training aborted. Errors are one line on stderr, never a traceback.
"""

import sys

import click

from minitrain import __version__


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


def main():
    """Console entry point: one-line errors with the contract's exit codes."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
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
