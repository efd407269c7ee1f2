"""`sfmpi console`: the admin console of the host's service pools (docs/console.md)."""
from __future__ import annotations

import sys

import click

DEFAULT_PORT = 8470  # hostd/console/server.py's, repeated so that --help imports no server


def add_console_commands(main: click.Group) -> None:
    main.add_command(console)


@click.command()
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
              help="Port on 127.0.0.1 (the console listens on no other address).")
def console(port: int) -> None:
    """Serve the pools' web console on 127.0.0.1 until SIGINT or SIGTERM."""
    from .errors import UsageError
    from .hostd.console.server import run
    from .paths import Paths

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: use 1-65535 (0: any free port)")
    # Flushed: whoever started the console (a test, a script) reads the address from a pipe.
    run(Paths.from_env().home, port, announce=lambda line: click.echo(line) or sys.stdout.flush())
