"""`sfmpi control add|rm|list|log`: feedback controllers of VMs (docs/monitoring.md)."""
from __future__ import annotations

import time

import click


def add_control_commands(main: click.Group) -> None:
    from .cli import _client, _emit
    from .cli_stats import parse_since

    @main.group()
    def control() -> None:
        """Feedback control: hold a high class's target by limiting the best-effort class's CPU."""

    @control.command("add")
    @click.argument("name")
    @click.option("--class", "cls", required=True, type=click.Choice(["high", "best-effort"]),
                  help="high: its target is held; best-effort: its CPU limit is what the controller moves.")
    @click.option("--target", default=None, metavar="MEASURE=VALUE",
                  help="A high member's target: cpu_percent=60 for a VM (percent of one host core it must get), "
                       "p95_ms=200 for pool:NAME (its 95th-percentile response time).")
    @click.option("--group", default="default", show_default=True, help="The controller this VM joins.")
    @click.option("--period", "period_s", type=float, default=None, help="Seconds per control step (default 2).")
    @click.option("--kp", type=float, default=None, help="Proportional gain (default 0.5).")
    @click.option("--ki", type=float, default=None, help="Integral gain per period (default 0.6).")
    @click.option("--min-limit", type=float, default=None, help="Lowest CPU limit it sets, % of a core (default 5).")
    @click.option("--max-limit", type=float, default=None, help="Released, % of a core (default 100).")
    @click.option("--json", "as_json", is_flag=True)
    def control_add(name, cls, target, group, as_json, **params) -> None:
        """Put VM NAME (or a service pool, pool:NAME, as a high member) under a controller."""
        res = _client().call("control.add", name=name, **{"class": cls}, target=target, group=group,
                             params={k: v for k, v in params.items() if v is not None})
        _emit(res, as_json, lambda r: click.echo(
            f"controller {r['name']}: " + ", ".join(f"{vm} ({m['class']}"
                                                    + (f", {m['measure']} {'<=' if m['measure'] == 'p95_ms' else '>='} {m['target']:g}"
                                                       if 'target' in m else "")
                                                    + ")" for vm, m in r["members"].items())
            + ("" if r["running"] else " (idle until it has a high and a best-effort member)")))

    @control.command("rm")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True)
    def control_rm(name, as_json) -> None:
        """Take VM NAME out of its controller (a best-effort VM's limit is lifted)."""
        res = _client().call("control.rm", name=name)
        _emit(res, as_json, lambda r: click.echo(f"{r['removed']} left controller {r['group']}"))

    @control.command("list")
    @click.option("--json", "as_json", is_flag=True)
    def control_list(as_json) -> None:
        """The controllers, their members, gains and last step."""
        rows = _client().call("control.list")

        def human(rows):
            if not rows:
                click.echo("no controllers")
            for r in rows:
                members = ", ".join(f"{vm} ({m['class']})" for vm, m in r["members"].items())
                last = r["last_step"]
                step = (f"measured {last['measurement']}, limit {last['actuation']:g} %" if last else "no step yet")
                click.echo(f"{r['name']}: {'running' if r['running'] else 'idle'}, every {r['period_s']:g} s, "
                           f"kp {r['kp']:g} ki {r['ki']:g}, limit {r['min_limit']:g}-{r['max_limit']:g} %; "
                           f"{members}; {step}")
        _emit(rows, as_json, human)

    @control.command("log")
    @click.argument("group", default="default")
    @click.option("--since", default="10m", show_default=True, help="From when: 90s, 10m, 2h ago, or a time.")
    @click.option("--json", "as_json", is_flag=True)
    def control_log(group, since, as_json) -> None:
        """Every step of a controller: measurement, target, error, integral, actuation."""
        res = _client().call("control.log", group=group, since=parse_since(since))

        def human(r):
            fmt = "{:<9} {:>11} {:>7} {:>8} {:>9} {:>10}  {}"
            click.echo(fmt.format("time", "measurement", "target", "error", "integral", "limit %", "note"))
            for s in r["steps"]:
                meas = "-" if s["measurement"] is None else f"{s['measurement']:.1f}"
                err = "-" if s["error"] is None else f"{s['error']:.1f}"
                click.echo(fmt.format(time.strftime("%H:%M:%S", time.localtime(s["at"])), meas, f"{s['target']:g}",
                                      err, f"{s['integral']:.1f}", f"{s['actuation']:g}", s["note"]))
        _emit(res, as_json, human)
