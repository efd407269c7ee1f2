"""The `sfmpi` command (host side). Every failure: one clear line, non-zero exit."""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from .errors import SfmpiError, UsageError


def _client():
    """hostd of this host, or of the lab host --host / SFMPI_HOST names (never started on demand:
    a lab host's hostd runs in its namespace, started by `lab up`)."""
    from .client import HostdClient
    host = (click.get_current_context(silent=True).find_root().obj or {}).get("host") \
        if click.get_current_context(silent=True) else None
    if host:
        from .hostd.lab.lab import host_home
        from .paths import Paths
        return HostdClient(Paths(host_home(host)), autostart=False)
    return HostdClient()


def _emit(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2))
    else:
        human(obj)


class SfmpiGroup(click.Group):
    """Turns SfmpiError into `sfmpi: error: ...` and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SfmpiError as exc:
            msg = str(exc)
            first, _, rest = msg.partition("\n")
            click.echo(f"sfmpi: error: {first}", err=True)
            if rest:
                click.echo(rest, err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=SfmpiGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log what sfmpi does.")
@click.option("--host", "host", envvar="SFMPI_HOST", default=None, metavar="NAME",
              help="Drive the hostd of lab host NAME (default: this host's).")
@click.pass_context
def main(ctx, verbose: bool, host) -> None:
    """sfmpi: fork running QEMU/KVM virtual machines (SnowFlock-style)."""
    ctx.obj = {"host": host}
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# -- image ----------------------------------------------------------------
@main.group()
def image() -> None:
    """Guest images."""


@image.command("build")
@click.option("--packages", default="", help="Extra Debian packages, comma-separated.")
@click.option("--out", type=click.Path(), default=None, help="Copy the image directory here.")
@click.option("--mirror", default=None, help="Debian mirror (default: $SFMPI_MIRROR or deb.debian.org).")
@click.option("--force", is_flag=True, help="Rebuild even if a cached image matches.")
def image_build(packages: str, out, mirror, force: bool) -> None:
    """Build the guest image (cached by recipe) and print its path."""
    from rich.console import Console

    from . import image as image_mod

    extra = tuple(p.strip() for p in packages.split(",") if p.strip())
    console = Console(stderr=True)
    with console.status("building guest image") as status:
        def progress(step: str) -> None:
            status.update(f"guest image: {step}")
            console.log(step)
        path = image_mod.build(image_mod.Recipe(extra_packages=extra), out=out, mirror=mirror,
                               progress=progress, force=force)
    click.echo(str(path))


def _default_image() -> str:
    from .image import default_image
    return default_image()


# -- vm -------------------------------------------------------------------
@main.group()
def vm() -> None:
    """Virtual machines on this host."""


@vm.command("start")
@click.argument("name")
@click.option("--image", "image_path", default=None, help="Image from `sfmpi image build` (default: the default image).")
@click.option("--mem", default="512M", show_default=True, help="Guest RAM.")
@click.option("--cpus", default=1, show_default=True, type=int, help="vCPUs.")
@click.option("--accel", type=click.Choice(["kvm", "tcg"]), default=None,
              help="Force the accelerator (default: KVM if a probe guest boots under it, else TCG).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the guest agent.")
@click.option("--nat", is_flag=True,
              help="Let the VM's family reach the host's uplink (egress, masqueraded). Clones inherit it.")
@click.option("--open-port", "open_ports", multiple=True, metavar="PORT[/tcp|/udp]",
              help="Accept routed traffic from outside the family to this port of its VMs "
                   "(repeatable; default tcp). Clones inherit it.")
@click.option("--ram-backing", type=click.Choice(["auto", "hugepages", "tmpfs"]), default="auto",
              show_default=True,
              help="Where guest RAM lives: 2 MiB huge pages (a hugetlbfs mount with free pages) keep "
                   "checkpoint pauses short at any RAM size; auto uses them when the host has room.")
@click.option("--free-page-reporting/--no-free-page-reporting", default=True, show_default=True,
              help="A virtio-balloon that reports the guest's free pages: they leave the VM's RAM file, "
                   "so its checkpoints neither keep nor send them.")
@click.option("--json", "as_json", is_flag=True)
def vm_start(name, image_path, mem, cpus, accel, timeout, nat, open_ports, ram_backing, free_page_reporting,
             as_json) -> None:
    """Boot a VM from an image and wait until its agent answers."""
    from .hostd.policy.admission import parse_size_mb
    from .hostd.net.nft import parse_open_ports
    # Checked here too (hostd checks again): bad input must not start hostd.
    ports = [str(p) for p in parse_open_ports(open_ports)]
    image_path = os.path.abspath(image_path) if image_path else _default_image()
    res = _client().call("vm.start", name=name, image=image_path, mem_mb=parse_size_mb(mem), cpus=cpus,
                         accel=accel, timeout=timeout, nat=nat, open_ports=ports, ram_backing=ram_backing,
                         free_page_reporting=free_page_reporting)

    def human(r):
        net = (["NAT"] if r.get("nat") else []) + [f"open {p}" for p in r.get("open_ports", [])]
        net += ["RAM on huge pages"] if r.get("ram_backing") == "hugepages" else []
        click.echo(f"{r['name']} running ({r['accel']}, {r['mem_mb']} MiB, {r['cpus']} vCPU"
                   f"{''.join(', ' + n for n in net)}) in {r['boot_ms'] / 1000:.1f} s")
    _emit(res, as_json, human)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def vm_exec(name, argv) -> None:
    """Run a command in the guest: `sfmpi vm exec NAME -- CMD...`. Exits with its code."""
    def out(fd: int, data: bytes) -> None:
        stream = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        stream.write(data)
        stream.flush()
    res = _client().call("vm.exec", on_output=out, name=name, argv=list(argv))
    code = int(res["code"])
    sys.exit(code if 0 <= code < 256 else 128 + abs(code))


@vm.command("list")
@click.option("--all", "all_hosts", is_flag=True, help="Every host's VMs, through the lab's master.")
@click.option("--json", "as_json", is_flag=True)
def vm_list(all_hosts, as_json) -> None:
    """VMs this host runs (with --all: every host of the lab)."""
    if all_hosts:
        from .hostd.lab.lab import Lab
        rows = Lab().admin("vms")
    else:
        # Starts hostd if needed: a new hostd re-attaches to VMs a previous one left.
        rows = _client().call("vm.list")

    def human(rows):
        if not rows:
            click.echo("no VMs")
            return
        fmt = "{:<28} {:<8} {:<8} {:<8} {:>7} {:>5} {:>4}  {}"
        click.echo(fmt.format("NAME", "HOST", "ROLE", "STATE", "PID", "MEM", "CPU", "FROM / ERROR"))
        for r in rows:
            if "name" not in r:   # a host that did not answer the master
                click.echo(f"{r.get('host')}: {r.get('error')}")
                continue
            click.echo(fmt.format(r["name"], r.get("host") or "-", r["role"], r["state"], r["pid"] or "-",
                                  r["mem_mb"], r["cpus"], r["error"] or r["checkpoint"]))
    _emit(rows, as_json, human)


@vm.command("stop")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_stop(name, as_json) -> None:
    """Stop a VM and remove its runtime files."""
    res = _client().call("vm.stop", name=name)
    _emit(res, as_json, lambda r: click.echo(f"{r['name']} stopped"))


@vm.command("set")
@click.argument("name")
@click.option("--cpu-shares", default=None, metavar="N", help="Weight under CPU contention (2-262144; host default 1024).")
@click.option("--cpu-limit", default=None, metavar="PCT", help="CPU ceiling in percent of one host core.")
@click.option("--mem-limit", default=None, metavar="SIZE", help="Host memory ceiling (e.g. 384M).")
@click.option("--disk-iops", default=None, metavar="N", help="Disk operations per second.")
@click.option("--disk-bps", default=None, metavar="N", help="Disk bytes per second.")
@click.option("--net-rate", default=None, metavar="RATE", help="Network rate each way (10mbit, 500kbit, 2MB/s).")
@click.option("--priority", default=None, type=click.Choice(["low", "normal", "high", "none"]),
              help="CPU shares as vSphere gives them: low/normal/high = 1:2:4 (per vCPU).")
@click.option("--all", "all_hosts", is_flag=True, help="NAME runs on any host of the lab: through the lab's master.")
@click.option("--json", "as_json", is_flag=True)
def vm_set(name, all_hosts, as_json, **given) -> None:
    """Set a VM's resources (a Set-VMResourceConfiguration). `none` clears a setting. Settings
    persist with the VM, and its clones start with them."""
    settings = {k: v for k, v in given.items() if v is not None}
    if not settings:
        raise UsageError("vm set: give at least one setting (see `sfmpi vm set --help`)")
    if all_hosts:
        from .hostd.lab.lab import Lab
        res = Lab().admin("vm.set", name=name, settings=settings)
    else:
        res = _client().call("vm.set", name=name, settings=settings)

    def human(r):
        shown = ", ".join(f"{k}={v}" for k, v in r["resources"].items()) or "none"
        where = f" on {r['host']}" if r.get("host") else ""
        click.echo(f"{r['name']}{where}: {shown}{'' if r['applied'] else ' (applied when it runs)'}")
    _emit(res, as_json, human)


# -- checkpoint / clone -----------------------------------------------------
class CheckpointGroup(click.Group):
    """`sfmpi checkpoint NAME` takes a checkpoint (the stable form); `checkpoint ls`
    and `checkpoint rm ID` manage them. A first word that is no subcommand is a VM name."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["take", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        formatter.write_usage(ctx.command_path, "NAME [--mode M] [--keep N] [--json] | ls [--json] | rm ID")


@main.group("checkpoint", cls=CheckpointGroup, invoke_without_command=False)
def checkpoint() -> None:
    """Checkpoints (VM descriptors): take one of a running VM, list them, remove them."""


@checkpoint.command("take")
@click.argument("name")
@click.option("--mode", type=click.Choice(["background", "precopy", "paused"]), default=None,
              help="background (default for a VM booted from an image): short stop, RAM copied while the "
                   "VM runs (write-protected); precopy: live pre-copy (relies on dirty tracking, "
                   "unreliable under TCG); paused (default for a clone, whose RAM is copy-on-write): "
                   "everything copied while stopped.")
@click.option("--keep", type=click.IntRange(min=1), default=None,
              help="Keep only this VM's N newest checkpoints (older ones no VM runs from are removed).")
@click.option("--json", "as_json", is_flag=True)
def checkpoint_take(name, mode, keep, as_json) -> None:
    """Checkpoint a running VM (it goes on running); print the checkpoint id."""
    res = _client().call("checkpoint", name=name, mode=mode, keep=keep)  # mode None: hostd picks by role
    _emit(res, as_json, lambda r: click.echo(r["id"]))


@checkpoint.command("ls")
@click.option("--json", "as_json", is_flag=True)
def checkpoint_ls(as_json) -> None:
    """Checkpoints of this host, oldest first, with what holds them."""
    rows = _client().call("checkpoint.list")

    def human(rows):
        if not rows:
            click.echo("no checkpoints")
            return
        fmt = "{:<28} {:<20} {:>9}  {:<14} {}"
        click.echo(fmt.format("ID", "VM", "MiB", "HELD BY", "USED BY"))
        for r in rows:
            held = "kept" if r["kept"] else f"ticket {r['ticket']}"
            click.echo(fmt.format(r["id"], r["vm"], f"{r['bytes'] / 2**20:.1f}", held,
                                  ", ".join(r["used_by"]) or "-"))
    _emit(rows, as_json, human)


@checkpoint.command("rm")
@click.argument("ckpt_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
def checkpoint_rm(ckpt_id, as_json) -> None:
    """Remove a checkpoint no VM runs from; disk layers nothing else needs go with it."""
    res = _client().call("checkpoint.rm", id=ckpt_id)
    _emit(res, as_json, lambda r: click.echo(f"{r['id']} removed ({r['freed_bytes'] / 2**20:.1f} MiB, "
                                             f"{len(r['freed_layers'])} disk layer(s))"))


@main.command("clone")
@click.argument("ckpt")
@click.option("-n", "n", type=int, required=True, help="Number of clones.")
@click.option("--allow-fewer", is_flag=True, help="Take fewer clones if the host budget cannot hold n.")
@click.option("--memory", type=click.Choice(["local", "served"]), default="local", show_default=True,
              help="served: the clones' RAM comes lazily from a memory server through memtap "
                   "(docs/memory.md), as on a host other than the parent's.")
@click.option("--policy", type=click.Choice(["spread", "pack"]), default=None,
              help="In a cluster: how the master places the clones over hosts (default: the master's).")
@click.option("--push", is_flag=True,
              help="Served clones: bring the rest of the checkpoint's RAM to their hosts in the background, "
                   "so they stop depending on the memory server (docs/memory.md).")
@click.option("--multicast/--no-multicast", default=True, show_default=True,
              help="Served clones: the memory server answers by the checkpoint's multicast group, so every "
                   "host gets each range once (--no-multicast: unicast only).")
@click.option("--json", "as_json", is_flag=True)
def clone(ckpt, n, allow_fewer, memory, policy, push, multicast, as_json) -> None:
    """Start N clones from a checkpoint; they resume where the parent was."""
    if n <= 0:
        raise UsageError(f"clone: -n must be at least 1 (got {n})")
    res = _client().call("clone", checkpoint=ckpt, n=n, allow_fewer=allow_fewer, memory=memory,
                         **({"policy": policy} if policy else {}),
                         served={"push": push, "multicast": multicast})

    def human(r):
        for name in r["clones"]:
            click.echo(name)
        note = f" (asked {r['requested']})" if r["granted"] < r["requested"] else ""
        click.echo(f"{r['granted']} clone(s) running in {r['total_ms'] / 1000:.2f} s{note}", err=True)
    _emit(res, as_json, human)


@main.group("stats", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx, as_json) -> None:
    """Counters of the lazy memory path: the memory server and each memtap
    (unicast and multicast bytes, ranges not sent again, repairs, push, prefetch).
    `stats vm NAME`: a VM's statistics; `stats metrics`: all VMs' in the Prometheus format."""
    if ctx.invoked_subcommand is not None:
        return
    res = _client().call("stats")

    def human(r):
        from rich.console import Console
        from rich.table import Table
        mem = r["memory"]
        if mem["server"] is None and not mem["memtaps"]:
            click.echo("no memory served on this host")
            return
        mib = 2 ** 20
        if mem["server"] is not None:
            t = mem["server"]["totals"]
            click.echo(f"memory server {mem['server']['address']} ({'up' if mem['server']['alive'] else 'DOWN'}): "
                       f"{t.get('requests', 0)} ranges, {t.get('bytes_sent', 0) / mib:.1f} MiB sent by unicast, "
                       f"{t.get('mc_sent_bytes', 0) / mib:.1f} MiB by multicast "
                       f"({t.get('mc_suppressed', 0)} ranges not sent again), "
                       f"{t.get('repair_requests', 0)} repairs, {t.get('connections', 0)} connections, "
                       f"{t.get('refused', 0)} refused, {t.get('bad_requests', 0)} bad requests")
        table = Table(title="memtaps (one per served checkpoint on this host)")
        for col in ("checkpoint", "clones", "fetched MiB", "multicast in MiB", "lost", "repairs", "pushed MiB",
                    "prefetched MiB (hit)", "zero MiB (not sent)", "cache hits MiB", "errors", "fetch p50/p99 us"):
            table.add_column(col, justify="right")
        for m in mem["memtaps"]:
            table.add_row(m["checkpoint"] + ("" if m["alive"] else " (dead)") + (" pushed" if m["push_done"] else ""),
                          str(len(m["clones"])), f"{m['fetch_bytes'] / mib:.1f}",
                          f"{m['mc_received'] * 1024 / mib:.1f}", str(m["mc_lost"]), str(m["repair_requests"]),
                          f"{m['push_bytes'] / mib:.1f}",
                          f"{m['prefetch_bytes'] / mib:.1f} ({m['prefetch_hit_bytes'] / mib:.1f})",
                          f"{m['zero_bytes'] / mib:.1f}", f"{m['cache_hit_bytes'] / mib:.1f}", str(m["fetch_errors"]),
                          f"{m['fetch_p50_us'] or 0:.0f}/{m['fetch_p99_us'] or 0:.0f}")
        Console(width=200).print(table)
    _emit(res, as_json, human)


from .cli_stats import add_stats_commands  # noqa: E402 - registers on the stats group

add_stats_commands(stats)


@main.command("down")
@click.option("--json", "as_json", is_flag=True)
def down(as_json) -> None:
    """Stop every VM sfmpi started on this host, and hostd; leave nothing behind."""
    client = _client()
    from .paths import Paths
    from .hostd.pool.lifecycle import stop_all
    stop_all(Paths.from_env().home)  # pools first: their controllers stop their workers and balancers
    if not client.running() and not Paths.from_env().db.exists():
        res = {"stopped": []}
    else:
        from .client import wait_gone
        from .errors import HostdError
        pid = client.call("ping")["pid"]
        res = client.call("down")
        # "Leaves nothing behind" includes hostd itself: return once it is gone.
        if not wait_gone(pid):
            raise HostdError(f"hostd (pid {pid}) did not exit after stopping every VM")
    _emit(res, as_json, lambda r: click.echo(f"stopped {len(r['stopped'])} VM(s)"))


@main.command("hostd")
@click.option("--mem-budget", default=None, help="Memory VMs may use (default: 75% of host RAM).")
@click.option("--vcpu-budget", default=None, type=int, help="vCPUs VMs may use (default: 8 per core).")
@click.option("--no-multicast", is_flag=True,
              help="Serve and fetch clones' memory by unicast only: a network without multicast "
                   "(the same as SFMPI_MULTICAST=0).")
@click.option("--stop-vms-on-signal", is_flag=True,
              help="SIGTERM, SIGINT or SIGHUP stops every VM before hostd exits (a batch job's hostd: "
                   "the job's VMs end with it). Without it they run on for the next hostd.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve the VMs' statistics in the Prometheus text format on 127.0.0.1:PORT "
                   "(default: SFMPI_METRICS_PORT; 0 or unset: none).")
@click.option("--driver", type=click.Choice(["direct", "libvirt"]), default=None,
              help="What runs the VMs: hostd itself (direct, the default) or a private libvirtd, "
                   "each VM a libvirt domain (docs/libvirt.md). The same as SFMPI_DRIVER.")
def hostd_cmd(mem_budget, vcpu_budget, no_multicast, stop_vms_on_signal, metrics_port, driver) -> None:
    """Run hostd in the foreground (commands start it on demand otherwise)."""
    if no_multicast:
        os.environ["SFMPI_MULTICAST"] = "0"
    if driver:
        os.environ["SFMPI_DRIVER"] = driver
    from .hostd.policy.admission import Budget, parse_size_mb
    from .hostd.daemon.server import serve

    from .paths import Paths
    logging.getLogger().setLevel(logging.INFO)
    budget = Budget.default()
    if mem_budget:
        budget = Budget(parse_size_mb(mem_budget), budget.vcpus)
    if vcpu_budget:
        budget = Budget(budget.mem_mb, vcpu_budget)
    serve(Paths.from_env(), budget, stop_vms_on_signal, metrics_port)


from .cli_cluster import add_cluster_commands  # noqa: E402 - registers on main

add_cluster_commands(main)

from .cli_jobs import add_jobs_commands  # noqa: E402 - registers on main

add_jobs_commands(main)

from .cli_pool import add_pool_commands  # noqa: E402 - registers on main

add_pool_commands(main)

from .cli_control import add_control_commands  # noqa: E402 - registers on main

add_control_commands(main)

from .cli_console import add_console_commands  # noqa: E402 - registers on main

add_console_commands(main)

if __name__ == "__main__":
    main()
