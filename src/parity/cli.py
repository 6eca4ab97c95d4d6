"""The ``parity`` command group and its entry point: parse, dispatch, exit code.

The commands live in :mod:`parity.commands` (one module per theme).

Exit codes: 0 everything within tolerance, 1 a divergence was found, 2 the command could not
run (bad arguments or inputs: one line on stderr, never a traceback; set PARITY_DEBUG=1 to see
one). ``parity --help`` imports neither torch nor numpy.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import click

from parity import __version__
from parity.commands import CONTEXT
from parity.errors import ParityError
from parity.untrusted import shown


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="parity")
def cli() -> None:
    """Find where and why two runs of the same model on different backends disagree.

    \b
    parity diff                      run the built-in tiny model fp32/eager vs bf16/sdpa
    parity compare BASE TARGET       compare two dump directories
    parity inspect DUMP              list what a dump holds
    parity convert SRC DST           write a parity dump from an SGLang or msProbe dump
    parity matrix --target S ...     several targets against one baseline, one table
    parity scores                    encoder embeddings and similarity scores on two backends
    parity report REPORT.json        render a saved report as HTML, JUnit or Markdown
    parity watch                     keep comparing; serve Prometheus metrics
    parity explain BASE TARGET       find the root cause of a divergence (replay, drill-down)
    parity inject --tap kv --scale S how noise at one tap propagates to logits and tokens
    parity calibrate                 measure the noise floor, write a tolerance profile

    Exit codes: 0 within tolerance, 1 divergence found, 2 could not run.
    """


def _register_commands() -> None:
    from parity.commands.compare_cmds import compare_cmd, diff_cmd, inspect_cmd
    from parity.commands.convert_cmd import convert_cmd
    from parity.commands.engine_cmds import matrix_cmd, scores_cmd
    from parity.commands.report_cmd import report_cmd
    from parity.commands.root_cause_cmds import explain_cmd, inject_cmd
    from parity.commands.tolerance_cmds import calibrate_cmd
    from parity.commands.watch_cmd import watch_cmd

    for command in (diff_cmd, compare_cmd, inspect_cmd, explain_cmd, inject_cmd, calibrate_cmd, matrix_cmd,
                    scores_cmd, report_cmd, watch_cmd, convert_cmd):
        cli.add_command(command)


_register_commands()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the CLI, turn every error into one stderr line and exit code 2."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="parity",
                        standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("parity: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "parity"
        message = " ".join(exc.format_message().split())
        click.echo(shown(f"{command}: error: {message} (see '{command} --help')"), err=True)
        sys.exit(2)
    except ParityError as exc:
        click.echo(shown(f"parity: error: {exc.one_line()}"), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("parity: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: no traceback for users
        if os.environ.get("PARITY_DEBUG"):
            raise
        click.echo(shown(f"parity: internal error: {type(exc).__name__}: {exc} (set PARITY_DEBUG=1 for a traceback)"),
                   err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
