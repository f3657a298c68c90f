"""``bnfuse.cli.app``: the command line as a typer app, for ``typer.testing.CliRunner``.

The command line itself is :func:`bnfuse.cli.run` (argparse); this wraps it so that code
written against the former typer app (``CliRunner().invoke(app, [...])``) keeps working.
Every argument is passed through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import typer  # only this module imports typer; bnfuse.cli imports it on first use of ``app``

__all__ = ["make_app"]


def make_app(run: Callable[[Sequence[str]], int]) -> Any:
    """A typer app whose only command hands its raw arguments to ``run``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    settings = {
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    }

    @app.command(context_settings=settings)
    def _command(ctx: typer.Context) -> None:
        raise typer.Exit(run(list(ctx.args)))

    return app
