"""Checkpoint lifecycle: ls and rm, what holds a checkpoint, disk layers freed,
a long-lived parent's chain kept short, and clone() checkpoints freed with their ticket."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)


def listed(cli) -> dict[str, dict]:
    return {r["id"]: r for r in cli.json("checkpoint", "ls")}


def disk_usage(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def chain_of(cli, vm: str) -> list[str]:
    """The files of a VM's disk as QEMU sees it: active layer first, the image last."""
    info = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", active_layer(cli, vm)],
                          capture_output=True, text=True, check=True).stdout
    return [entry["filename"] for entry in json.loads(info)]


def active_layer(cli, vm: str) -> str:
    from sfmpi.hostd.state.store import Store
    store = Store(cli.paths.db)
    try:
        return store.get_vm(vm).overlay
    finally:
        store.close()


def test_ls_and_rm_give_the_space_back(cli, parent):
    ck = cli.json("checkpoint", parent, "--mode", "paused")
    rows = listed(cli)
    assert rows[ck["id"]]["kept"] and rows[ck["id"]]["vm"] == parent and rows[ck["id"]]["used_by"] == []
    assert rows[ck["id"]]["bytes"] > 1 << 20
    clone = cli.json("clone", ck["id"], "-n", "1")["clones"][0]
    assert listed(cli)[ck["id"]]["used_by"] == [clone]
    refused = cli("checkpoint", "rm", ck["id"], check=False)
    assert refused.returncode != 0 and f"in use by VM(s) {clone}" in refused.stderr
    cli("vm", "stop", clone)
    before = disk_usage(cli.paths.checkpoints)
    res = cli.json("checkpoint", "rm", ck["id"])
    assert res["freed_bytes"] > 1 << 20
    assert ck["id"] not in listed(cli)
    assert not Path(ck["path"]).exists()
    assert disk_usage(cli.paths.checkpoints) <= before - res["freed_bytes"] + (1 << 20)
    # Its frozen layer is still the parent's backing: kept; the parent runs on.
    assert res["freed_layers"] == []
    assert cli.exec(parent, "echo alive").stdout.strip() == "alive"
    again = cli("checkpoint", "rm", ck["id"], check=False)
    assert again.returncode != 0 and "no checkpoint" in again.stderr


def test_a_long_lived_parents_chain_stays_bounded(cli, parent):
    from sfmpi.hostd.fork.retention import CHAIN_BOUND
    layers_before = len(list(cli.paths.disks.glob("*.qcow2")))
    longest = 0
    for i in range(50):
        cli.exec(parent, f"echo {i} > /root/generation; sync")
        cli.json("checkpoint", parent, "--mode", "paused", "--keep", "2")
        longest = max(longest, len(chain_of(cli, parent)))
    # active layer + at most CHAIN_BOUND frozen layers + the image
    assert longest <= CHAIN_BOUND + 2, longest
    mine = [r for r in listed(cli).values() if r["vm"] == parent]
    assert len(mine) == 2
    # Layers: the parent's chain and the two checkpoints' chains, nothing more.
    layers = len(list(cli.paths.disks.glob("*.qcow2")))
    assert layers <= layers_before + 2 * (CHAIN_BOUND + 1), (layers_before, layers)
    # And QEMU let go of the merged layers: no deleted layer held open, no more
    # open layers than its chain (a node left in its graph per checkpoint was a leak).
    pid = next(r["pid"] for r in cli.json("vm", "list") if r["name"] == parent)
    held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    held = [f for f in held if ".qcow2" in f]
    assert not [f for f in held if f.endswith("(deleted)")], held
    assert len(held) <= CHAIN_BOUND + 2, held    # active + frozen layers + the image
    # The merged disk still holds what the guest wrote, and clones of the last checkpoint see it.
    assert cli.exec(parent, "cat /root/generation").stdout.strip() == "49"
    last = max(mine, key=lambda r: r["created"])
    clone = cli.json("clone", last["id"], "-n", "1")["clones"][0]
    assert cli.exec(clone, "cat /root/generation").stdout.strip() == "49"
    cli("vm", "stop", clone)
    for r in mine:
        cli("checkpoint", "rm", r["id"])


GUEST_CLONE = textwrap.dedent('''
    import json, sfmpi
    t = sfmpi.request_ticket(1)
    i = sfmpi.clone(t)
    if i:
        sfmpi.exit(0)
    sfmpi.join(t)
    c = sfmpi.checkpoint_parent()
    print(json.dumps({"ticket": t.id, "kept": c.id}))
''')


def test_a_clone_checkpoint_goes_with_its_ticket_and_checkpoint_parent_stays(cli, parent):
    before = set(listed(cli))
    cli.put(parent, "/root/lifecycle.py", GUEST_CLONE)
    out = json.loads(cli.exec(parent, "python3 /root/lifecycle.py").stdout.strip().splitlines()[-1])
    new = {k: v for k, v in listed(cli).items() if k not in before}
    # clone()'s checkpoint was freed at join; checkpoint_parent()'s is kept for create_clones.
    assert list(new) == [out["kept"]] and new[out["kept"]]["kept"], new
    assert all(r["ticket"] != out["ticket"] for r in listed(cli).values())
    for k in new:
        cli("checkpoint", "rm", k)
    assert os.path.isdir(cli.paths.checkpoints)
