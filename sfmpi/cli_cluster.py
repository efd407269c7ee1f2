"""The cluster's commands: `sfmpi master`, `sfmpi lab up|down|status`, `sfmpi cluster init`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click


def add_cluster_commands(main: click.Group) -> None:
    main.add_command(master_cmd)
    main.add_command(lab)
    main.add_command(cluster)


@click.command("master")
@click.option("--home", type=click.Path(), required=True, help="The master's state directory.")
@click.option("--keys", "keys_dir", type=click.Path(), required=True, help="The cluster's key directory.")
@click.option("--listen", required=True, help="The address to listen on (the hosts' network).")
@click.option("--port", default=7440, show_default=True, type=int)
@click.option("--policy", type=click.Choice(["spread", "pack"]), default="spread", show_default=True,
              help="How clones of one fork are placed over hosts.")
def master_cmd(home, keys_dir, listen, port, policy) -> None:
    """Run the master daemon in the foreground (`lab up` starts it for a lab)."""
    from .hostd.master.daemon import serve
    logging.getLogger().setLevel(logging.INFO)
    serve(Path(home), Path(keys_dir), listen, port, policy)


@click.group()
def lab() -> None:
    """A lab of hosts on this machine (network namespaces, a hostd each, the master)."""


@lab.command("up")
@click.option("--hosts", "k", type=int, default=3, show_default=True, help="How many hosts.")
@click.option("--policy", type=click.Choice(["spread", "pack"]), default="spread", show_default=True)
@click.option("--mem-budget", default=None, help="Memory each host's VMs may use (default: hostd's).")
@click.option("--ram-dir-size", default=None,
              help="Each host's RAM directory, a tmpfs of its own (default: its memory budget).")
@click.option("--multicast/--no-multicast", default=True, show_default=True,
              help="Memory servers answer by multicast (--no-multicast: unicast only, as on a network "
                   "without multicast).")
@click.option("--json", "as_json", is_flag=True)
def lab_up(k, policy, mem_budget, ram_dir_size, multicast, as_json) -> None:
    """Make the lab: K hosts lab1..labK, each with its own hostd, and the master."""
    from .hostd.lab.lab import Lab
    rec = Lab().up(k, policy, mem_budget, ram_dir_size, multicast)
    if as_json:
        click.echo(json.dumps(rec, indent=2))
    else:
        for name, h in rec["hosts"].items():
            click.echo(f"{name} {h['address']} {h['home']}")
        click.echo(f"master {rec['master']['address']} (policy {policy})")


@lab.command("down")
@click.option("--json", "as_json", is_flag=True)
def lab_down(as_json) -> None:
    """Stop every VM and daemon of the lab and remove its namespaces and files."""
    from .hostd.lab.lab import Lab
    res = Lab().down()
    click.echo(json.dumps(res, indent=2) if as_json else
               f"lab down: {len(res['hosts'])} host(s), {len(res['stopped'])} VM(s) stopped")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True)
def lab_status(as_json) -> None:
    """The lab's hosts as the master sees them."""
    from .hostd.lab.lab import Lab
    hosts = Lab().admin("hosts")
    if as_json:
        click.echo(json.dumps(hosts, indent=2))
    else:
        for h in hosts:
            click.echo(f"{h['name']:<8} {h['state']:<5} {h['address']:<22} {h['mem_mb']} MiB {h['vcpus']} vCPUs, "
                       f"used {h['used_mem_mb']} MiB {h['used_vcpus']} vCPUs")


@lab.command("policy")
@click.argument("policy", type=click.Choice(["spread", "pack"]))
def lab_policy(policy) -> None:
    """How the master places clones from now on (a request's `clone --policy` still wins)."""
    from .hostd.lab.lab import Lab
    click.echo(Lab().admin("policy", policy=policy)["policy"])


@click.group()
def cluster() -> None:
    """A cluster of real hosts (docs/cluster.md)."""


@cluster.command("init")
@click.option("--keys", "keys_dir", type=click.Path(), required=True, help="Where the cluster's keys go.")
@click.argument("names", nargs=-1, required=True)
def cluster_init(keys_dir, names) -> None:
    """Make the cluster's CA and a certificate for the master, the admin and each host NAME."""
    from .hostd.cluster import keys
    from .hostd.cluster.config import ADMIN_NAME, MASTER_NAME
    keys.init_cluster(Path(keys_dir), [MASTER_NAME, ADMIN_NAME, *names])
    click.echo(keys_dir)
