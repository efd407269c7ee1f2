"""Every failure a user can cause: one clear line, non-zero exit, nothing half-done."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.timeout(900)


def one_error_line(p) -> str:
    assert p.returncode != 0
    first = p.stderr.strip().splitlines()[0]
    assert first.startswith("sfmpi: error: "), p.stderr
    return first


@pytest.fixture(scope="module")
def ck(cli, parent) -> dict:
    return cli.json("checkpoint", parent)


def names(cli) -> set[str]:
    return {r["name"] for r in cli.json("vm", "list")}


@pytest.mark.parametrize("args", [
    ("vm", "exec", "nope", "--", "true"), ("vm", "stop", "nope"), ("checkpoint", "nope")])
def test_unknown_vm(cli, parent, args):
    assert "no VM named nope" in one_error_line(cli(*args, check=False))


def test_missing_image(cli, parent):
    p = cli("vm", "start", "x1", "--image", "/nonexistent/disk.qcow2", check=False)
    assert "does not exist" in one_error_line(p)
    assert "x1" not in names(cli)


def test_bad_vm_name(cli, parent):
    assert "bad VM name" in one_error_line(cli("vm", "start", "Bad_Name", check=False))


def test_duplicate_vm_name(cli, parent):
    assert "already exists" in one_error_line(cli("vm", "start", "parent", check=False))


def test_clone_count_must_be_positive(cli, ck):
    for n in ("0", "-3"):
        assert "at least 1" in one_error_line(cli("clone", ck["id"], "-n", n, check=False))


def test_clone_far_beyond_capacity_is_refused_and_nothing_starts(cli, ck):
    before = names(cli)
    p = cli("clone", ck["id"], "-n", "1000", check=False)
    assert "refused" in one_error_line(p)
    assert names(cli) == before


def test_unknown_checkpoint(cli, parent):
    assert "no checkpoint" in one_error_line(cli("clone", "no-such-ck", "-n", "1", check=False))


@pytest.mark.parametrize("damage", ["truncate-manifest", "flip-state-byte", "remove-ram"])
def test_corrupt_checkpoint_is_rejected(cli, ck, tmp_path, damage):
    # A checkpoint names its disk layers relative to its directory: the copy
    # sits where they are found the same way.
    copy = tmp_path / "checkpoints" / "ck"
    shutil.copytree(ck["path"], copy)
    (tmp_path / "disks").symlink_to(cli.paths.disks)
    if damage == "truncate-manifest":
        text = (copy / "manifest.json").read_text()
        (copy / "manifest.json").write_text(text[: len(text) // 2])
        want = "manifest is corrupt"
    elif damage == "flip-state-byte":
        data = bytearray((copy / "state").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / "state").write_bytes(bytes(data))
        want = "checksum"
    else:
        (copy / "ram").unlink()
        want = "missing"
    before = names(cli)
    assert want in one_error_line(cli("clone", str(copy), "-n", "1", check=False))
    assert names(cli) == before


def test_allow_fewer_trims_to_the_budget(cli, ck, other_home):
    small = other_home(SFMPI_MEM_BUDGET="1280M")  # room for two 512 MiB clones
    p = small("clone", ck["path"], "-n", "4", check=False)
    assert "room for 2 more" in one_error_line(p) and "--allow-fewer" in p.stderr
    res = small.json("clone", ck["path"], "-n", "4", "--allow-fewer")
    assert res["granted"] == 2 and len(res["clones"]) == 2
    for name in res["clones"]:
        assert small.exec(name, "echo alive").stdout == "alive\n"


def test_two_hostds_on_one_state_dir(cli, parent):
    p = subprocess.run(["sfmpi", "hostd"], env=cli.env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "another hostd" in p.stderr


def test_crashed_clone_is_reported_with_its_logs(cli, ck):
    (name,) = cli.json("clone", ck["id"], "-n", "1")["clones"]
    pid = next(r["pid"] for r in cli.json("vm", "list") if r["name"] == name)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = next(r for r in cli.json("vm", "list") if r["name"] == name)
        if row["state"] == "crashed":
            break
        time.sleep(0.2)
    assert row["state"] == "crashed" and "exited" in row["error"]
    assert "crashed" in one_error_line(cli("vm", "exec", name, "--", "true", check=False))
    assert not (cli.paths.shm / f"{name}.qmp").exists()
    cli("vm", "stop", name)
    assert name not in names(cli)


def test_restarted_hostd_reattaches_to_running_vms(cli, parent):
    from sfmpi.client import HostdClient
    pid_before = HostdClient(cli.paths).call("ping")["pid"]
    HostdClient(cli.paths).call("shutdown")
    deadline = time.monotonic() + 10
    while (cli.home / "hostd.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # The next command starts a new hostd, which finds the parent still running.
    assert cli.exec(parent, "echo alive").stdout == "alive\n"
    assert HostdClient(cli.paths).call("ping")["pid"] != pid_before
    row = next(r for r in cli.json("vm", "list") if r["name"] == parent)
    assert row["state"] == "running"


def test_killed_hostd_reattaches_live_vms_and_reaps_dead_ones(cli, ck):
    from sfmpi.client import HostdClient, wait_gone
    a, b = cli.json("clone", ck["id"], "-n", "2")["clones"]
    pids = {r["name"]: r["pid"] for r in cli.json("vm", "list")}
    hostd_pid = HostdClient(cli.paths).call("ping")["pid"]
    os.kill(hostd_pid, signal.SIGKILL)
    assert wait_gone(hostd_pid)
    # While no hostd runs, one clone's QEMU dies.
    os.kill(pids[b], signal.SIGKILL)
    assert wait_gone(pids[b])
    rows = {r["name"]: r for r in cli.json("vm", "list")}  # starts a new hostd
    assert rows[a]["state"] == "running" and rows[a]["pid"] == pids[a]
    assert b not in rows
    assert not (cli.paths.shm / f"{b}.qmp").exists()
    assert cli.exec(a, "echo alive").stdout == "alive\n"
    cli("vm", "stop", a)


JOIN_ACROSS_RESTART = r'''
import json, os, sfmpi, time
t = sfmpi.request_ticket(2)
i = sfmpi.clone(t)
if i:
    time.sleep(45)           # hostd is killed and restarted meanwhile
    sfmpi.exit(10 + i)
open("/tmp/cloned", "w").write(json.dumps({m.id: m.hostname for m in sfmpi.members(t)}))
while not os.path.exists("/tmp/go"):
    time.sleep(0.5)
st = sfmpi.join(t)
print(json.dumps({"statuses": st, "failures": st.failures}))
'''


def test_a_ticket_outlives_a_killed_hostd(cli, parent):
    from sfmpi.client import HostdClient, wait_gone
    cli.exec(parent, "rm -f /tmp/cloned /tmp/go /tmp/join.out; cat > /root/restart.py <<'SFMPI_EOF'\n"
                     f"{JOIN_ACROSS_RESTART}\nSFMPI_EOF")
    cli.exec(parent, "(setsid python3 /root/restart.py > /tmp/join.out 2> /tmp/join.err &) ; true")
    deadline = time.monotonic() + 180
    while cli.exec(parent, "cat /tmp/cloned 2>/dev/null; true").stdout == "" and time.monotonic() < deadline:
        time.sleep(1)
    by_id = json.loads(cli.exec(parent, "cat /tmp/cloned").stdout)   # clone ID -> VM (hostname)
    pids = {r["name"]: r["pid"] for r in cli.json("vm", "list")}
    assert set(by_id.values()) <= set(pids), (by_id, pids)
    hostd_pid = HostdClient(cli.paths).call("ping")["pid"]
    os.kill(hostd_pid, signal.SIGKILL)
    assert wait_gone(hostd_pid)
    os.kill(pids[by_id["2"]], signal.SIGKILL)         # one clone dies while no hostd runs
    assert wait_gone(pids[by_id["2"]])
    cli("vm", "list")                                  # a new hostd
    cli.exec(parent, "touch /tmp/go")
    deadline = time.monotonic() + 180
    out = ""
    while not out and time.monotonic() < deadline:
        out = cli.exec(parent, "cat /tmp/join.out").stdout.strip()
        time.sleep(1)
    assert out, cli.exec(parent, "cat /tmp/join.err").stdout
    res = json.loads(out)
    assert res["statuses"] == {"1": 11}, res
    assert res["failures"] == {"2": "lost while hostd was down"}
    assert [r for r in cli.json("vm", "list") if r["role"] == "clone"] == []
