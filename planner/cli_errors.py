"""The one CLI error handler: every user mistake becomes one line and exit code 2, never a traceback.

`OneLineErrors.main` wraps a click Group or Command (QfitGroup is the `qfit` group; QfitCommand a command
run on its own, `python -m planner.cli_compare`): a planner.errors.QfitError or a click usage error prints
`error: <message>` on stderr, or `{"error": "<message>"}` on stdout when the command line has --json. Standard library and
click only.
"""

from __future__ import annotations

import json
import sys

import click

from planner.errors import QfitError

EXIT_USAGE = 2

# modules of the `train` extra: a command that needs them says how to install them instead of a traceback
TRAIN_EXTRA_MODULES = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "pandas", "numpy",
                       "pynvml", "tokenizers", "safetensors", "pyarrow"}


def fail(message: str, as_json: bool = False, hint: str | None = None):
    """Print one error line (JSON with --json) and exit 2."""
    message = " ".join(str(message).split())
    if as_json:
        from planner.documents import error_document

        click.echo(json.dumps(error_document(message)))
    else:
        click.echo(f"error: {message}" + (f" ({hint})" if hint else ""), err=True)
    sys.exit(EXIT_USAGE)


class OneLineErrors:
    """Mixin for click.Group / click.Command: the handler. `usage_hint(path)` words the pointer to --help
    after a usage error; a command may override it."""

    default_prog_name = "qfit"

    @staticmethod
    def usage_hint(command_path: str) -> str:
        return f"see `{command_path} --help`"

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in args
        try:
            rv = super().main(args=args, prog_name=prog_name or self.default_prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("aborted.", err=True)
            sys.exit(1)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx else self.default_prog_name
            command = exc.ctx.command if exc.ctx else self
            hint = command.usage_hint(path) if isinstance(command, OneLineErrors) else OneLineErrors.usage_hint(path)
            fail(exc.format_message(), as_json, hint=hint)
        except QfitError as exc:
            fail(str(exc), as_json)
        except ValueError as exc:  # planner/train errors (RunError, TraceError) until they subclass QfitError
            fail(str(exc), as_json)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
                raise
            fail(f"this command needs the train extra (missing module '{exc.name}'): pip install -e '.[train]'", as_json)
        except click.ClickException as exc:
            fail(exc.format_message(), as_json)
        sys.exit(rv if isinstance(rv, int) else 0)


class QfitGroup(OneLineErrors, click.Group):
    """The `qfit` group. Commands in their own modules load only when invoked (click's "Further Deferring
    Imports"): `qfit plan` does not compile `qfit run`'s or `qfit compare`'s code."""

    LAZY = {"run": ("planner.cli_run", "run_cmd"), "compare": ("planner.cli_compare", "compare_cmd")}

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx, name):
        if name in self.LAZY:
            import importlib

            module, attr = self.LAZY[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


class QfitCommand(OneLineErrors, click.Command):
    """A command with the same handler when it runs on its own (outside the `qfit` group)."""


def check_output_path(path: str | None, flag: str) -> None:
    """Before any work: the folder of a file a flag will write must exist (a missing one is one line naming the
    flag and the folder, exit 2, instead of a traceback after the work is done)."""
    if not path:
        return
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_dir():
        raise QfitError(f"{flag} {path} is a folder: give a file name inside it")
    folder = p.parent
    if not folder.is_dir():
        raise QfitError(f"{flag} {path}: folder {folder} does not exist; create it (mkdir -p {folder}) "
                        "or choose another path")


def write_output(path: str, text: str, flag: str) -> None:
    """Write a text file a flag asked for; an OS error is one line naming the flag and the file."""
    from pathlib import Path

    check_output_path(path, flag)
    try:
        Path(path).expanduser().write_text(text)
    except OSError as exc:
        raise QfitError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
