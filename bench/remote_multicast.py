"""bench/remote.py --multicast: what multicast, push and prefetch do across hosts.

Two labs of 4 hosts, one after the other in one run: the defaults (multicast,
push for tickets, working-set prefetch), then `--no-multicast` with
SFMPI_PUSH_TICKETS=0 and SFMPI_PREFETCH=0 (unicast only, as before). In each,
a 256 MiB parent on lab1 holds 48 MiB of random data in /dev/shm.
1. Memory-server egress (lab1's server: multicast and unicast payload bytes)
   for a fork whose served clones are on 1 host (policy spread, 2 clones:
   lab1 and lab2) and on 3 hosts (4 clones: one on each of lab1-lab4); each
   remote clone reads the 48 MiB (md5sum). A fresh checkpoint each time.
   multicast_egress_ratio / unicast_egress_ratio: 3 hosts over 1 host.
2. Prefetch (first lab): two forks of 2 from one checkpoint; lab2's memtap's
   requests for faults in the second (after the first's working set) against
   the first: prefetch_fault_reduction = 1 - second / first.
3. `sfmpirun -n 8 ./cpi` in the parent (spread: 2 ranks per host), twice per
   lab: seconds to its first line of output and in all; with push and
   prefetch (first lab; the second run prefetches the first's working set)
   against without (second lab).
freed_pages_saved_share is bench/remote.py --freed's.
All hosts share this machine's 2 cores: ratios, not absolute times, carry over.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from remote_lab import in_lab

from sfmpi.client import HostdClient

GUEST_MB = 256
BIG_MB = 48
CONFIGS = {"multicast": {"multicast": True, "env": {}},
           "unicast": {"multicast": False, "env": {"SFMPI_PUSH_TICKETS": "0", "SFMPI_PREFETCH": "0"}}}


def guest(client: HostdClient, vm: str, script: str, first_line: list | None = None) -> str:
    out: list[bytes] = []
    t0 = time.monotonic()

    def seen(_fd, data):
        if first_line is not None and not first_line:
            first_line.append(time.monotonic() - t0)
        out.append(data)
    code = client.call("vm.exec", name=vm, argv=["sh", "-c", script], on_output=seen)["code"]
    if code != 0:
        raise RuntimeError(f"{script!r} in {vm} exited {code}: {b''.join(out)[-300:]!r}")
    return b"".join(out).decode(errors="replace")


def egress(lab1: HostdClient, ck: str) -> int:
    c = lab1.call("stats")["memory"]["server"]["checkpoints"][ck]
    return c["mc_sent_bytes"] + c["bytes_sent"]


def fork_and_read(clients: dict, ck: str, n: int, want: str, pool) -> dict:
    r = clients["lab1"].call("clone", checkpoint=ck, n=n, policy="spread")
    hosts = r["hosts"]
    remote = [name for name, h in hosts.items() if h != "lab1"]

    def read(name: str) -> None:
        got = guest(clients[hosts[name]], name, "md5sum /dev/shm/big").split()[0]
        if got != want:
            raise RuntimeError(f"{name} on {hosts[name]} read {got}, not {want}")
    list(pool.map(read, remote))
    taps = {h: next(m for m in clients[h].call("stats")["memory"]["memtaps"] if m["checkpoint"] == ck)
            for h in {hosts[n] for n in remote}}
    list(pool.map(lambda name: clients[hosts[name]].call("vm.stop", name=name), hosts))
    return {"hosts": len(taps), "taps": taps}


def wait_forgotten(lab1: HostdClient, ck: str) -> None:
    """The last remote clone's end reaches lab1 a moment after its stop."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        path = next(Path(r["path"]) for r in lab1.call("checkpoint.list") if r["id"] == ck)
        if (path / "ram.ws").exists() or time.monotonic() > deadline - 50:
            return
        time.sleep(0.3)


def run_config(image: str, name: str, cfg: dict, repeats: int, pool) -> dict:
    res: dict = {}

    def run(_lab, clients: dict) -> None:
        lab1 = clients["lab1"]
        lab1.call("vm.start", name="bp", image=image, mem_mb=GUEST_MB, cpus=1, timeout=600)
        guest(lab1, "bp", f"head -c {BIG_MB}M /dev/urandom > /dev/shm/big")
        want = guest(lab1, "bp", "md5sum /dev/shm/big").split()[0]
        out: dict[int, list[int]] = {1: [], 3: []}
        for i in range(repeats):
            for n in ((2, 4) if i % 2 == 0 else (4, 2)):
                ck = lab1.call("checkpoint", name="bp")["id"]
                got = fork_and_read(clients, ck, n, want, pool)
                out[got["hosts"]].append(egress(lab1, ck))
                wait_forgotten(lab1, ck)
                lab1.call("checkpoint.rm", id=ck)
        res["egress_1host_bytes"] = statistics.median(out[1])
        res["egress_3hosts_bytes"] = statistics.median(out[3])
        res["egress_ratio"] = res["egress_3hosts_bytes"] / res["egress_1host_bytes"]
        if name == "multicast":
            ck = lab1.call("checkpoint", name="bp")["id"]
            first = fork_and_read(clients, ck, 2, want, pool)["taps"]["lab2"]
            wait_forgotten(lab1, ck)
            second = fork_and_read(clients, ck, 2, want, pool)["taps"]["lab2"]
            res["prefetch_faults_first"] = first["demand_fetches"]
            res["prefetch_faults_second"] = second["demand_fetches"]
            res["prefetch_bytes_second"] = second["prefetch_bytes"]
            res["prefetch_fault_reduction"] = 1 - second["demand_fetches"] / max(1, first["demand_fetches"])
            wait_forgotten(lab1, ck)
            lab1.call("checkpoint.rm", id=ck)
        res.update(mpi_runs(lab1))
    return in_lab(f"sfmpi-benchmc-{name}-", 4, run, res, multicast=cfg["multicast"], env=cfg["env"])


def mpi_runs(lab1: HostdClient) -> dict:
    src = (Path(__file__).resolve().parent.parent / "examples" / "mpi" / "cpi.c").read_text()
    guest(lab1, "bp", f"cat > /root/cpi.c <<'EOF'\n{src}\nEOF\ncd /root && mpicc.mpich -O2 -o cpi cpi.c -lm")
    first, total = [], []
    for _ in range(2):
        line: list[float] = []
        t0 = time.monotonic()
        out = guest(lab1, "bp", "cd /root && sfmpirun -n 8 ./cpi 1000000", first_line=line)
        total.append(time.monotonic() - t0)
        first.append(line[0] if line else total[-1])
        if "pi is approximately" not in out:
            raise RuntimeError(f"sfmpirun printed no pi: {out[-300:]!r}")
    return {"mpi8_first_output_s": first, "mpi8_total_s": total}


def run_multicast(image: str, repeats: int) -> dict:
    pool = ThreadPoolExecutor(8)
    res: dict = {"guest_mb": GUEST_MB, "data_mb": BIG_MB, "host_leaks": []}
    for name, cfg in CONFIGS.items():
        r = run_config(image, name, cfg, repeats, pool)
        res["host_leaks"] += r.pop("host_leaks")
        if "error" in r:
            res["error"] = f"{name}: {r['error']}"
            return res
        res[name] = r
    res["multicast_egress_ratio"] = res["multicast"]["egress_ratio"]
    res["unicast_egress_ratio"] = res["unicast"]["egress_ratio"]
    res["prefetch_fault_reduction"] = res["multicast"]["prefetch_fault_reduction"]
    return res


def print_multicast_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    m, u = r["multicast"], r["unicast"]
    t = Table(title=f"Multicast, push, prefetch: {r['guest_mb']} MiB parent, {r['data_mb']} MiB read by each "
                    "remote clone, labs of 4 hosts on one machine")
    t.add_column("measure")
    t.add_column("multicast + push + prefetch", justify="right")
    t.add_column("unicast only", justify="right")
    t.add_column("target", justify="right")
    mib = 2 ** 20
    t.add_row("server egress, clones on 1 other host", f"{m['egress_1host_bytes'] / mib:.1f} MiB",
              f"{u['egress_1host_bytes'] / mib:.1f} MiB", "")
    t.add_row("server egress, clones on 3 other hosts", f"{m['egress_3hosts_bytes'] / mib:.1f} MiB",
              f"{u['egress_3hosts_bytes'] / mib:.1f} MiB", "")
    t.add_row("3 hosts / 1 host", f"{m['egress_ratio']:.2f}", f"{u['egress_ratio']:.2f}", "<= 1.3 / about 3")
    t.add_row("fault requests of lab2's memtap, 1st fork -> 2nd (prefetched)",
              f"{m['prefetch_faults_first']} -> {m['prefetch_faults_second']} "
              f"({100 * m['prefetch_fault_reduction']:.0f}% fewer)", "", "")
    for i in range(2):
        t.add_row(f"sfmpirun -n 8 cpi, run {i + 1}: first output / total",
                  f"{m['mpi8_first_output_s'][i]:.1f} / {m['mpi8_total_s'][i]:.1f} s",
                  f"{u['mpi8_first_output_s'][i]:.1f} / {u['mpi8_total_s'][i]:.1f} s", "")
    Console(width=120).print(t)
