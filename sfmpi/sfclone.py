"""sfclone: the clone API for shell scripts (same verbs as sfmpi.api).

    T=$(sfclone ticket 4)
    ID=$(sfclone clone "$T")
    if [ "$ID" = 0 ]; then sfclone join "$T"; else work; sfclone exit 0; fi
"""
from __future__ import annotations

import json
import sys

import click

from . import api
from .errors import SfmpiError


def _emit(obj, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fork this VM from a shell script (docs/clone-api.md)."""


@main.command()
@click.argument("n", type=int)
@click.option("--timeout", type=float, default=None, help="kill clones still alive after S seconds")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="a resource setting for the clones instead of this VM's (cpu_limit=50, priority=low, "
                   "net_rate=10mbit; KEY=none drops it); repeatable")
@click.option("--json", "as_json", is_flag=True)
def ticket(n, timeout, settings, as_json):
    """Reserve up to N clones; print the ticket id (granted count with --json)."""
    resources = None
    if settings:
        resources = {}
        for item in settings:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
            resources[key.strip().replace("-", "_")] = None if value.strip().lower() == "none" else value.strip()
    t = api.request_ticket(n, timeout, resources)
    _emit(t.__dict__, as_json, t.id)


@main.command("clone")
@click.argument("ticket")
@click.option("--json", "as_json", is_flag=True)
def clone_cmd(ticket, as_json):
    """Fork this VM; print 0 in the parent and the clone's ID in each clone."""
    ans = api.call("clone", ticket=ticket)
    _emit({k: v for k, v in ans.items() if k not in ("v", "ok")}, as_json, str(ans["id"]))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def checkpoint(as_json):
    """Keep this instant for create-clones; print the checkpoint id."""
    c = api.checkpoint_parent()
    _emit(c.__dict__, as_json, c.id if c.clone_id == 0 else f"{c.id} {c.clone_id}")


@main.command("create-clones")
@click.argument("ckpt")
@click.argument("ticket")
def create_clones(ckpt, ticket):
    """Start the ticket's clones from an earlier checkpoint."""
    click.echo(" ".join(str(i) for i in api.create_clones(ckpt, ticket)))


@main.command("exit")
@click.argument("status", type=int, default=0)
def exit_cmd(status):
    """End this clone with STATUS (clones only)."""
    api.exit(status)


@main.command()
@click.argument("ticket")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
def join(ticket, timeout, as_json):
    """Wait for the ticket's clones; print `ID STATUS` per clone.

    Exits 1 if a clone failed (crashed, killed, timed out) instead of exiting."""
    res = api.join(ticket, timeout)
    lines = [f"{i} {s}" for i, s in sorted(res.items())]
    lines += [f"{i} failed: {why}" for i, why in sorted(res.failures.items())]
    _emit({"statuses": dict(res), "failures": res.failures}, as_json, "\n".join(lines))
    if res.failures:
        sys.exit(1)


@main.command()
@click.argument("ticket")
def kill(ticket):
    """Destroy the ticket's clones now."""
    click.echo(" ".join(str(i) for i in api.kill(ticket)))


@main.command()
@click.argument("ticket")
@click.option("--json", "as_json", is_flag=True)
def members(ticket, as_json):
    """The ticket's clones: ID, state, IP and hostname, one per line."""
    rows = api.members(ticket)
    if as_json:
        click.echo(json.dumps([m.__dict__ for m in rows]))
    else:
        for m in rows:
            click.echo(f"{m.id} {m.state} {m.ip or '-'} {m.hostname or '-'}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def whoami(as_json):
    """This VM's ID, role, family, IP, hostname and the host it runs on."""
    me = api.whoami()
    _emit(me, as_json, f"{me['id']} {me['role']} {me['family']} {me['ip']} {me['hostname']} {me.get('host') or '-'}")


def run() -> None:
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except SfmpiError as exc:
        click.echo(f"sfclone: {type(exc).__name__}: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))


if __name__ == "__main__":
    run()
