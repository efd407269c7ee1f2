"""`sfmpi pool up|status|set|client|down` (docs/pool.md)."""
from __future__ import annotations

import json
import os
import time

import click

from .errors import UsageError


def _home():
    from .paths import Paths
    return Paths.from_env().home


def _print_status(st: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    console.print(f"[bold]pool {st['name']}[/bold]: {st['state']}  front end {st['frontend'] or '-'}  "
                  f"workers {st['vm_count']}  checkpoint {st['checkpoint'] or '-'}")
    if st["error"]:
        console.print(f"error: {st['error']}")
    table = Table("worker", "ip", "state", "cpu %", "mem MiB", "free_count", "last report")
    for vm in st["vms"]:
        age = vm["report_age_ms"]
        table.add_row(vm["name"], vm["ip"] or "-", vm["state"], f"{vm['cpu'] or 0:.1f}",
                      f"{(vm['ram'] or 0) / 2**20:.0f}", str(vm["free_count"]),
                      f"{age / 1000:.1f} s ago" if age is not None else "-")
    console.print(table)
    lat = st.get("latency") or {}
    if lat.get("count"):
        console.print(f"last {lat['window_ms'] / 1000:g} s at the balancer: {lat['count']} requests, "
                      f"{lat['errors']} errors, p50 {lat['p50_ms']:g} ms, p95 {lat['p95_ms']:g} ms, "
                      f"max {lat['max_ms']:g} ms")
    console.print("params: " + "  ".join(f"{k}={v}" for k, v in st["params"].items()))
    for ev in st["events"][-5:]:
        console.print(f"  {time.strftime('%H:%M:%S', time.localtime(ev['at'] / 1000))} {ev['kind']:<10} "
                      f"{ev['vm'] or '':<14} {ev['detail']}")


def add_pool_commands(main: click.Group) -> None:
    @main.group()
    def pool() -> None:
        """Elastic service pools: workers cloned from a warm checkpoint behind HAProxy."""

    @pool.command("up")
    @click.argument("name")
    @click.option("--checkpoint", default="", help="A warm checkpoint whose service already runs.")
    @click.option("--image", "image_path", default="", help="Boot the first worker from this image "
                  "(default when no --checkpoint: the default image).")
    @click.option("--service", default="", help="The service's command in the guest "
                  "(default: the example text service).")
    @click.option("--port", type=int, default=8080, show_default=True, help="The service's port in the workers.")
    @click.option("--front-port", type=int, default=0, help="The balancer's port on 127.0.0.1 (default: a free one).")
    @click.option("--min", "min_vm", type=int, default=None, help="min_vm_count (default 1).")
    @click.option("--max", "max_vm", type=int, default=None, help="max_vm_count (default 8).")
    @click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Any other parameter.")
    @click.option("--mem", default="256M", show_default=True, help="Memory of the first worker.")
    @click.option("--cpus", type=int, default=1, show_default=True)
    @click.option("--workers", type=click.Choice(["clone", "boot"]), default="clone", show_default=True,
                  help="clone: from the warm checkpoint; boot: cold-boot each from the image (for comparison).")
    @click.option("--probe-timeout", type=float, default=120.0, show_default=True,
                  help="Seconds the service has to answer in the first worker.")
    @click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds until the pool serves.")
    @click.option("--json", "as_json", is_flag=True)
    def pool_up(name, checkpoint, image_path, service, port, front_port, min_vm, max_vm, assignments, mem, cpus,
                workers, probe_timeout, timeout, as_json):
        """Start pool NAME and print its front end."""
        from .hostd.policy.admission import parse_size_mb
        from .hostd.pool.lifecycle import PoolSpec, up
        from .hostd.pool.params import parse_assignment
        from .hostd.pool.status import check_name
        check_name(name)
        overrides = dict(parse_assignment(a) for a in assignments)
        if min_vm is not None:
            overrides["min_vm_count"] = parse_assignment(f"min_vm_count={min_vm}")[1]
        if max_vm is not None:
            overrides["max_vm_count"] = parse_assignment(f"max_vm_count={max_vm}")[1]
        if not checkpoint and not image_path:
            from .image import default_image
            image_path = default_image()
        spec = PoolSpec(name=name, checkpoint=checkpoint, image=os.path.abspath(image_path) if image_path else "",
                        service=service, port=port, front_port=front_port, mem_mb=parse_size_mb(mem), cpus=cpus,
                        workers=workers, probe_timeout_s=probe_timeout)
        res = up(_home(), spec, overrides, timeout)
        if as_json:
            click.echo(json.dumps(res, indent=2))
        else:
            click.echo(f"pool {name}: {res['frontend']} ({res['workers']} worker(s), checkpoint {res['checkpoint']})")

    @pool.command("status")
    @click.argument("name", required=False)
    @click.option("--json", "as_json", is_flag=True)
    @click.option("--watch", is_flag=True, help="Redraw every second (Ctrl-C ends).")
    def pool_status_cmd(name, as_json, watch):
        """A pool's workers, their load, its parameters and last events (all pools without NAME)."""
        from .hostd.pool.status import pool_names, pool_status
        home = _home()
        names = [name] if name else pool_names(home)
        if watch:
            from rich.console import Console
            while True:
                Console().clear()
                for n in names:
                    _print_status(pool_status(home, n))
                time.sleep(1.0)
        states = [pool_status(home, n) for n in names]
        if as_json:
            click.echo(json.dumps(states[0] if name else states, indent=2))
        elif not states:
            click.echo("no pools")
        for st in ([] if as_json else states):
            _print_status(st)

    @pool.command("set")
    @click.argument("name")
    @click.argument("assignments", nargs=-1, required=True)
    def pool_set(name, assignments):
        """Change parameters (system_params): `pool set NAME free_count=5 max_vm_count=4`."""
        from .hostd.pool.params import parse_assignment
        from .hostd.pool.status import open_pool
        values = [parse_assignment(a) for a in assignments]
        db = open_pool(_home(), name)
        try:
            for key, value in values:
                db.set_param(key, value)
            db.event("param", None, " ".join(f"{k}={v}" for k, v in values))
        finally:
            db.close()
        click.echo(" ".join(f"{k}={v}" for k, v in values))

    @pool.command("client")
    @click.argument("name")
    @click.option("--rate", type=float, default=5.0, show_default=True, help="Requests per second.")
    @click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds of requests.")
    @click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
                  help="The text to post (default: a built-in paragraph).")
    @click.option("--rounds", type=int, default=None, help="The example service's CPU cost per request.")
    @click.option("--timeout", type=float, default=120.0, show_default=True, help="Per request.")
    @click.option("--json", "as_json", is_flag=True)
    def pool_client(name, rate, duration, text_file, rounds, timeout, as_json):
        """Send text requests to pool NAME's front end; print latency, errors, throughput."""
        from .hostd.pool import loadgen
        from .hostd.pool.status import pool_status
        loadgen.check_args(rate, duration, timeout)
        st = pool_status(_home(), name)
        if st["state"] != "serving":
            raise UsageError(f"pool {name} is {st['state']}, not serving")
        if text_file:
            try:
                text = open(text_file, "rb").read()
            except OSError as exc:
                raise UsageError(f"--text {text_file}: {exc.strerror}") from None
        else:
            text = loadgen.DEFAULT_TEXT.encode()
        url = st["frontend"] + (f"?rounds={rounds}" if rounds is not None else "")
        t0 = time.monotonic()
        results = loadgen.run(url, rate, duration, text, timeout)
        res = {"pool": name, "rate": rate, "duration": duration,
               **loadgen.summary(results, time.monotonic() - t0)}
        if as_json:
            click.echo(json.dumps(res, indent=2))
        else:
            lat = res["latency_s"]
            click.echo(f"{res['requests']} requests, {res['ok']} ok, {res['failed']} failed "
                       f"{res['errors'] or ''}; {res['throughput_rps']} req/s; latency p50 {lat['p50']:.3f} s, "
                       f"p90 {lat['p90']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s")
        if res["failed"]:
            raise SystemExit(1)

    @pool.command("down")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True)
    def pool_down(name, as_json):
        """Stop pool NAME: its workers, its balancer."""
        from .hostd.pool.lifecycle import stop
        from .hostd.pool.status import check_name
        res = stop(_home(), check_name(name))
        click.echo(json.dumps(res) if as_json else f"pool {name}: {res['state']}")

    @pool.command("serve", hidden=True)
    @click.argument("name")
    def pool_serve(name):
        """The controller process (started by `pool up`)."""
        import logging
        from .hostd.pool.lifecycle import serve
        from .paths import Paths
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        os.umask(0o077)
        serve(_home(), name, Paths.from_env())
