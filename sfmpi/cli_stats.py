"""`sfmpi stats vm NAME` and `sfmpi stats metrics` (docs/monitoring.md)."""
from __future__ import annotations

import datetime as dt
import time

import click

from .errors import UsageError

RELATIVE = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """A point in time: `90s`, `10m`, `2h`, `1d` ago, Unix seconds, or an ISO 8601 time (local if no zone)."""
    now = time.time() if now is None else now
    text = text.strip()
    if text and text[-1] in RELATIVE and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * RELATIVE[text[-1]]
    try:
        value = float(text)
    except ValueError:
        try:
            return dt.datetime.fromisoformat(text).timestamp()
        except ValueError:
            raise UsageError(f"--since: {text!r} is not a time (use 90s, 10m, 2h, Unix seconds "
                             "or 2026-12-03T15:00:00)") from None
    if value < 0:
        raise UsageError(f"--since: {text!r} is before 1970")
    return value


def rates(samples: list[dict]) -> list[dict]:
    """Each sample with its disk and network counters also as bytes per second
    since the one before (None for the first, and where a counter went back)."""
    out = []
    for prev, cur in zip([None] + samples[:-1], samples):
        row = dict(cur)
        for key in ("disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes"):
            rate = None
            if prev is not None and cur["at"] > prev["at"] and cur[key] >= prev[key]:
                rate = (cur[key] - prev[key]) / (cur["at"] - prev["at"])
            row[key.replace("_bytes", "_bps")] = rate
        out.append(row)
    return out


def _fmt_rate(value) -> str:
    if value is None:
        return "-"
    for unit, size in (("MiB/s", 2 ** 20), ("KiB/s", 2 ** 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B/s"


def add_stats_commands(stats: click.Group) -> None:
    from .cli import _client, _emit

    @stats.command("vm")
    @click.argument("name")
    @click.option("--since", default="60s", show_default=True,
                  help="From when: 90s, 10m, 2h ago, Unix seconds, or an ISO time.")
    @click.option("--json", "as_json", is_flag=True, help="Every sample as JSON (rates added as *_bps).")
    def stats_vm(name, since, as_json) -> None:
        """A VM's statistics, one row per sample: CPU (% of one host core, the whole QEMU
        and each vCPU), memory as the VM costs it (PSS), disk and network."""
        res = _client().call("stats.vm", name=name, since=parse_since(since))
        res["samples"] = rates(res["samples"])

        def human(r):
            from rich.console import Console
            from rich.table import Table
            table = Table("time", "cpu %", "vcpu %", "PSS MiB", "disk read", "disk write", "net rx", "net tx",
                          title=f"VM {r['vm']} ({r['state']}), a sample every {r['interval_s']:g} s")
            for s in r["samples"]:
                table.add_row(time.strftime("%H:%M:%S", time.localtime(s["at"])), f"{s['cpu_percent']:.1f}",
                              " ".join(f"{v:.0f}" for v in s["vcpu_percent"]) or "-",
                              f"{s['mem_pss_bytes'] / 2 ** 20:.1f}", _fmt_rate(s["disk_read_bps"]),
                              _fmt_rate(s["disk_write_bps"]), _fmt_rate(s["net_rx_bps"]),
                              _fmt_rate(s["net_tx_bps"]))
            Console(width=160).print(table)
            if not r["samples"]:
                click.echo(f"no samples of {r['vm']} since {time.strftime('%H:%M:%S', time.localtime(float(parse_since(since))))}")
        _emit(res, as_json, human)

    @stats.command("latest")
    @click.option("--all", "all_hosts", is_flag=True, help="Every host's VMs, through the lab's master.")
    @click.option("--json", "as_json", is_flag=True)
    def stats_latest(all_hosts, as_json) -> None:
        """The latest sample of every VM (with --all: of every host, each with its host)."""
        if all_hosts:
            from .hostd.lab.lab import Lab
            rows = Lab().admin("stats")
        else:
            rows = _client().call("stats.latest")

        def human(rows):
            if not rows:
                click.echo("no samples")
            fmt = "{:<28} {:<8} {:>7} {:>9} {:>12} {:>12}"
            click.echo(fmt.format("VM", "HOST", "CPU %", "PSS MiB", "NET RX MiB", "NET TX MiB"))
            for r in rows:
                if "vm" not in r:   # a host that did not answer the master
                    click.echo(f"{r.get('host')}: {r.get('error')}")
                    continue
                click.echo(fmt.format(r["vm"], r.get("host") or "-", f"{r['cpu_percent']:.1f}",
                                      f"{r['mem_pss_bytes'] / 2 ** 20:.1f}", f"{r['net_rx_bytes'] / 2 ** 20:.1f}",
                                      f"{r['net_tx_bytes'] / 2 ** 20:.1f}"))
        _emit(rows, as_json, human)

    @stats.command("metrics")
    def stats_metrics() -> None:
        """Every live VM's latest statistics in the Prometheus text format (what
        `sfmpi hostd --metrics-port` serves at /metrics)."""
        click.echo(_client().call("stats.metrics")["text"], nl=False)

