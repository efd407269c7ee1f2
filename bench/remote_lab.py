"""bench/remote.py --lab: the fork across hosts, on a lab of 3 (`sfmpi lab up --hosts 3`).

8 clones of a 256 MiB parent on lab1, spread over lab1-3 (3/3/2) against all
8 on lab1 (policy pack), alternating, median of the repeats: from the clone
request to every clone answering, one command run in each. The remote clones'
RAM comes from lab1's memory server through their host's memtap (one per
host, shared by its clones), their disk over NBD. Bytes moved per remote host:
what its memtap fetched. All hosts share this machine's 2 cores: ratios, not
absolute times, carry over to real hosts.
Then `sfmpirun -n 8 ./cpi` inside the parent with the master's policy
spread (ranks on 3 hosts) against pack (all on lab1), alternating.
JSON keys: fork8_spread_vs_local, fork8_spread_s, fork8_local_s, remote_bytes_per_host,
mpi8_spread_vs_local, mpi8_spread_s, mpi8_local_s.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sfmpi.client import HostdClient
from sfmpi.hostd.lab.lab import Lab
from sfmpi.paths import Paths
from tests.leakcheck import lab_leaks

GUEST_MB = 256


def in_lab(prefix: str, k: int, run, res: dict, **up) -> dict:
    """run(lab, clients by host name) in a lab of k made for it (`lab.up(k,
    "spread", "3G", **up)`), into res; an error is reported in res, and what
    `lab down` left in res["host_leaks"]."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")) / "lab"
    lab = Lab(home)
    homes: list[Path] = []
    try:
        rec = lab.up(k, "spread", "3G", **up)
        homes = [Path(h["home"]) for h in rec["hosts"].values()]
        run(lab, {name: HostdClient(Paths(Path(h["home"])), autostart=False) for name, h in rec["hosts"].items()})
    except Exception as exc:  # noqa: BLE001 - reported with the leak check
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        lab.down()
        res["host_leaks"] = lab_leaks(home, homes)
    return res


def run_lab(image: str, repeats: int) -> dict:
    res: dict = {"guest_mb": GUEST_MB, "clones": 8, "hosts": 3}

    def run(lab: Lab, clients: dict) -> None:
        lab1 = clients["lab1"]
        lab1.call("vm.start", name="bp", image=image, mem_mb=GUEST_MB, cpus=1, timeout=600)
        ck = lab1.call("checkpoint", name="bp")["id"]
        times: dict[str, list[float]] = {"spread": [], "pack": []}
        moved: list[int] = []
        pool = ThreadPoolExecutor(8)
        for i in range(repeats):
            for policy in (("spread", "pack") if i % 2 == 0 else ("pack", "spread")):
                t0 = time.monotonic()
                r = lab1.call("clone", checkpoint=ck, n=8, policy=policy)
                hosts = r.get("hosts") or {name: "lab1" for name in r["clones"]}

                def job(name: str) -> None:
                    out = clients[hosts[name]].call("vm.exec", name=name, argv=["true"])
                    if out["code"] != 0:
                        raise RuntimeError(f"command in {name} exited {out['code']}")
                list(pool.map(job, r["clones"]))
                times[policy].append(time.monotonic() - t0)
                if policy == "spread":
                    for h in ("lab2", "lab3"):
                        taps = clients[h].call("stats")["memory"]["memtaps"]
                        # By unicast and by the group (1 KiB a datagram).
                        moved.append(sum(m["fetch_bytes"] + 1024 * m["mc_received"] for m in taps))
                list(pool.map(lambda name: clients[hosts[name]].call("vm.stop", name=name), r["clones"]))
        res["fork8_spread_s"] = statistics.median(times["spread"])
        res["fork8_local_s"] = statistics.median(times["pack"])
        res["fork8_spread_vs_local"] = res["fork8_spread_s"] / res["fork8_local_s"]
        res["runs_s"] = times
        res["remote_bytes_per_host"] = statistics.median(moved)
        res["remote_bytes_share_per_host"] = res["remote_bytes_per_host"] / (GUEST_MB << 20)
        res.update(mpi_runs(lab, lab1, repeats))
    return in_lab("sfmpi-benchlab-", 3, run, res)


def guest(client: HostdClient, vm: str, script: str) -> str:
    out: list[bytes] = []
    code = client.call("vm.exec", name=vm, argv=["sh", "-c", script],
                       on_output=lambda fd, data: out.append(data))["code"]
    if code != 0:
        raise RuntimeError(f"{script!r} in {vm} exited {code}: {b''.join(out)[-300:]!r}")
    return b"".join(out).decode(errors="replace")


def mpi_runs(lab: Lab, lab1: HostdClient, repeats: int) -> dict:
    """sfmpirun -n 8 cpi in the parent, spread over 3 hosts vs packed on one."""
    src = (Path(__file__).resolve().parent.parent / "examples" / "mpi" / "cpi.c").read_text()
    guest(lab1, "bp", f"cat > /root/cpi.c <<'EOF'\n{src}\nEOF\ncd /root && mpicc.mpich -O2 -o cpi cpi.c -lm")
    times: dict[str, list[float]] = {"spread": [], "pack": []}
    for i in range(repeats):
        for policy in (("spread", "pack") if i % 2 == 0 else ("pack", "spread")):
            lab.admin("policy", policy=policy)
            t0 = time.monotonic()
            out = guest(lab1, "bp", "cd /root && sfmpirun -n 8 ./cpi 1000000")
            times[policy].append(time.monotonic() - t0)
            if "pi is approximately" not in out:
                raise RuntimeError(f"sfmpirun printed no pi: {out[-300:]!r}")
    lab.admin("policy", policy="spread")
    spread, pack = statistics.median(times["spread"]), statistics.median(times["pack"])
    return {"mpi8_spread_s": spread, "mpi8_local_s": pack, "mpi8_spread_vs_local": spread / pack, "mpi8_runs_s": times}


def print_lab_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Fork across hosts: 8 clones of a {r['guest_mb']} MiB parent, lab of 3 on one machine")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    t.add_row("8 clones answering + a command in each, spread over 3 hosts", f"{r['fork8_spread_s']:.2f} s", "")
    t.add_row("the same, all 8 on the parent's host (pack)", f"{r['fork8_local_s']:.2f} s", "")
    t.add_row("spread / one host", f"{r['fork8_spread_vs_local']:.2f}x", "<= 1.5x")
    t.add_row("RAM moved per remote host (its memtap's fetches)",
              f"{r['remote_bytes_per_host'] / 2**20:.1f} MiB = {100 * r['remote_bytes_share_per_host']:.1f}%", "")
    t.add_row("sfmpirun -n 8 cpi, spread over 3 hosts / all on one",
              f"{r['mpi8_spread_s']:.2f} s / {r['mpi8_local_s']:.2f} s = {r['mpi8_spread_vs_local']:.2f}x", "")
    Console(width=110).print(t)
