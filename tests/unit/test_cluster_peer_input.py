"""What one host sends another is checked before anything acts on it: a clone
host refuses a malformed or hostile `clones.start` with a UsageError and
touches nothing, and the master lets a host speak only for itself. No VMs."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from sfmpi.errors import CheckpointError, RoleError, UsageError
from sfmpi.hostd.cluster import keys
from sfmpi.hostd.cluster.config import ClusterConfig, parse_address
from sfmpi.hostd.cluster.spanning import Spanning
from sfmpi.hostd.master.daemon import Master
from sfmpi.hostd.master.store import MasterStore
from sfmpi.paths import Paths


class Untouchable:
    """Any use of a part the validation should have stopped short of fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a malformed request reached .{name}")


@pytest.fixture
def span(tmp_path):
    keys.init_cluster(tmp_path / "keys", ["master", "lab1", "lab2"])
    config = ClusterConfig(host="lab2", address="172.31.254.2", keys=tmp_path / "keys",
                           master=("172.31.254.254", 7440))
    nothing = Untouchable()
    return Spanning(config, Paths(tmp_path / "home"), nothing, nothing, nothing, nothing, nothing, nothing)


GOOD_FAMILY = {"name": "p", "number": 1, "peers": ["172.31.254.1"]}
GOOD_ORDERS = [{"name": "p-3", "netid": 3, "index": 3}]
GOOD_DESCRIPTOR = {"manifest": {"id": "p-ck1"}, "state": base64.b64encode(b"x").decode(), "page_map": ""}


@pytest.mark.parametrize("descriptor,family,orders,match", [
    ("nope", GOOD_FAMILY, GOOD_ORDERS, "descriptor, family and orders"),
    ({"manifest": {"id": "../../etc"}}, GOOD_FAMILY, GOOD_ORDERS, "checkpoint id"),
    ({"manifest": {"id": "p-ck1"}}, {**GOOD_FAMILY, "name": "a/b"}, GOOD_ORDERS, "family name"),
    (GOOD_DESCRIPTOR, {**GOOD_FAMILY, "number": 0}, GOOD_ORDERS, "family number"),
    (GOOD_DESCRIPTOR, {**GOOD_FAMILY, "number": True}, GOOD_ORDERS, "family number"),
    (GOOD_DESCRIPTOR, {**GOOD_FAMILY, "peers": "172.31.254.1"}, GOOD_ORDERS, "peers"),
    (GOOD_DESCRIPTOR, GOOD_FAMILY, [], "1..250 clones"),
    (GOOD_DESCRIPTOR, GOOD_FAMILY, [{"name": "p-3", "netid": 3, "index": 3}] * 251, "1..250 clones"),
    (GOOD_DESCRIPTOR, GOOD_FAMILY, [{"name": "evil", "netid": 3, "index": 3}], "named after its family"),
    (GOOD_DESCRIPTOR, GOOD_FAMILY, [{"name": "p-3", "netid": 300, "index": 3}], "clone ID"),
    (GOOD_DESCRIPTOR, GOOD_FAMILY, ["p-3"], "named after its family"),
    ({**GOOD_DESCRIPTOR, "state": "not base64!"}, GOOD_FAMILY, GOOD_ORDERS, "not base64"),
    ({**GOOD_DESCRIPTOR, "state": "A" * (100 << 20)}, GOOD_FAMILY, GOOD_ORDERS, "too large"),
    ({**GOOD_DESCRIPTOR, "manifest": {"id": "p-ck1", "format": "other"}}, GOOD_FAMILY, GOOD_ORDERS, "manifest"),
])
def test_a_malformed_clones_start_is_refused_before_anything_is_done(span, tmp_path, descriptor, family, orders,
                                                                     match):
    with pytest.raises(Exception, match=match) as info:
        asyncio.run(span.start_here("lab1", descriptor, family, orders))
    assert isinstance(info.value, (UsageError, CheckpointError))
    # Nothing was written where checkpoints of other hosts go.
    assert not (tmp_path / "home" / "checkpoints" / "remote").exists() or \
        not any((tmp_path / "home" / "checkpoints" / "remote").iterdir())


def test_only_the_master_sets_resources_here_and_only_well_formed(span):
    asked = []

    async def set_resources(name, settings):
        asked.append((name, settings))
        return {"name": name, "resources": settings, "applied": True}
    vm_set = span.handlers(lambda: [], set_resources=set_resources)["vm.set"]
    with pytest.raises(RoleError, match="only the master sets a VM's resources on lab2 .not lab1."):
        asyncio.run(vm_set("lab1", {"name": "p", "settings": {"cpu_limit": 50}}))
    for bad in ({"name": 5, "settings": {}}, {"name": "p", "settings": ["cpu_limit"]}, {}):
        with pytest.raises(UsageError, match="a VM name and an object of settings"):
            asyncio.run(vm_set("master", bad))
    assert asked == []
    assert asyncio.run(vm_set("master", {"name": "p", "settings": {"cpu_limit": 50}}))["applied"]
    assert asked == [("p", {"cpu_limit": 50})]


def test_a_clone_stop_takes_only_a_list_of_names(span):
    with pytest.raises(UsageError):
        asyncio.run(span.stop_here("p-3"))


def test_the_master_lets_a_host_speak_only_for_itself(tmp_path):
    master = Master(tmp_path / "m", tmp_path / "keys", "127.0.0.1", 0)
    master.store = MasterStore(tmp_path / "master.db")
    args = {"name": "lab2", "address": "172.31.254.2", "peer_port": 7441, "mem_mb": 1024, "vcpus": 4}
    with pytest.raises(RoleError, match="lab1 may not speak for host lab2"):
        asyncio.run(master.op_register("lab1", args))
    asyncio.run(master.op_register("lab2", args))
    assert [h["name"] for h in master.store.hosts()] == ["lab2"]
    with pytest.raises(RoleError):
        asyncio.run(master.op_heartbeat("lab1", {"name": "lab2", "used_mem_mb": 0, "used_vcpus": 0}))
    with pytest.raises(UsageError):
        asyncio.run(master.op_register("lab2", {**args, "mem_mb": -5}))
    with pytest.raises(RoleError, match="only admin"):
        asyncio.run(master.op_vms("lab2", {}))
    with pytest.raises(RoleError, match="only admin"):
        asyncio.run(master.op_policy("lab2", {"policy": "pack"}))
    with pytest.raises(RoleError, match="only admin sets a VM's resources"):
        asyncio.run(master.op_vm_set("lab2", {"name": "p", "settings": {"cpu_limit": 50}}))
    with pytest.raises(UsageError, match="settings must be an object"):
        asyncio.run(master.op_vm_set("admin", {"name": "p", "settings": "cpu_limit=50"}))
    with pytest.raises(UsageError):
        asyncio.run(master.op_policy("admin", {"policy": "random"}))
    assert asyncio.run(master.op_policy("admin", {"policy": "pack"})) == {"policy": "pack"}


def test_a_placement_over_the_masters_hosts_follows_its_policy(tmp_path):
    import time
    master = Master(tmp_path / "m", tmp_path / "keys", "127.0.0.1", 0, policy="spread")
    master.store = MasterStore(tmp_path / "master.db")
    for h in ("lab1", "lab2", "lab3"):
        master.store.register(h, f"10.0.0.{h[-1]}:7441", 3072, 16, time.time())
        master.store.heartbeat(h, 0, 0, time.time())
    ans = asyncio.run(master.op_place("lab1", {"family": "p", "n": 8, "mem_mb": 256, "cpus": 1}))
    assert ans["placement"] == {"lab1": 3, "lab2": 3, "lab3": 2}
    assert ans["addresses"]["lab2"] == "10.0.0.2:7441"
    ans = asyncio.run(master.op_place("lab1", {"family": "p", "n": 8, "mem_mb": 256, "cpus": 1, "policy": "pack"}))
    assert ans["placement"] == {"lab1": 8}


@pytest.mark.parametrize("text", ["1.2.3.4", "1.2.3.4:0", "x:7", "1.2.3.4:70000", "1.2.3:5"])
def test_addresses_are_checked(text):
    if text == "1.2.3.4":
        assert parse_address(text, 7440) == ("1.2.3.4", 7440)
    else:
        with pytest.raises(UsageError):
            parse_address(text, 7440)


def test_a_hostd_in_a_cluster_needs_its_name_address_and_keys():
    assert ClusterConfig.from_env({}) is None
    with pytest.raises(UsageError, match="SFMPI_HOST_NAME"):
        ClusterConfig.from_env({"SFMPI_MASTER": "1.2.3.4:7440", "SFMPI_HOST_ADDRESS": "1.2.3.5",
                                "SFMPI_CLUSTER_KEYS": "/k"})
    c = ClusterConfig.from_env({"SFMPI_MASTER": "1.2.3.4", "SFMPI_HOST_NAME": "n1", "SFMPI_HOST_ADDRESS": "1.2.3.5",
                                "SFMPI_CLUSTER_KEYS": "/k", "SFMPI_FAMILY_START": "2001"})
    assert c.master == ("1.2.3.4", 7440) and c.family_start == 2001 and c.keys == Path("/k")


def test_the_tunnel_of_a_family_is_made_from_the_hosts_network_into_the_families_namespace():
    from sfmpi.hostd.net import tunnel
    from sfmpi.errors import NetworkError
    make = tunnel.create_argvs("sfmpi-ab", 7, "172.31.254.1")
    # netns before type (what follows type are the vxlan's options); no -n: made where hostd runs.
    assert make[0] == ["ip", "link", "add", "sfvx7", "netns", "sfmpi-ab", "type", "vxlan", "id", "7",
                       "local", "172.31.254.1", "dstport", "4789", "nolearning"]
    assert make[1][-2:] == ["mtu", "1450"] and make[2][-3:] == ["master", "sfbr7", "up"]
    assert tunnel.fdb_argvs("sfmpi-ab", 7, {"172.31.254.3"}, {"172.31.254.2"}) == [
        ["bridge", "-n", "sfmpi-ab", "fdb", "append", "00:00:00:00:00:00", "dev", "sfvx7", "dst", "172.31.254.3"],
        ["bridge", "-n", "sfmpi-ab", "fdb", "del", "00:00:00:00:00:00", "dev", "sfvx7", "dst", "172.31.254.2"]]
    shown = ("00:00:00:00:00:00 dst 172.31.254.2 self permanent\n"
             "0a:5f:00:01:00:05 dst 172.31.254.3 self\n"
             "00:00:00:00:00:00 dst 172.31.254.3 self permanent\n")
    assert tunnel.parse_flood_peers(shown) == {"172.31.254.2", "172.31.254.3"}
    with pytest.raises(NetworkError):
        tunnel.fdb_argvs("sfmpi-ab", 7, {"172.31.254.3; reboot"}, set())


def test_the_master_sweep_downs_silent_hosts_and_a_leaving_host_at_once(tmp_path, monkeypatch):
    import time

    from sfmpi.hostd.master import daemon
    monkeypatch.setattr(daemon, "DOWN_AFTER_S", 5.0)
    master = Master(tmp_path / "m", tmp_path / "keys", "127.0.0.1", 0)
    master.store = MasterStore(tmp_path / "master.db")
    for name in ("lab1", "lab2", "lab3"):
        asyncio.run(master.op_register(name, {"name": name, "address": "172.31.254.9", "peer_port": 7441,
                                              "mem_mb": 1024, "vcpus": 4}))
    master.store.add_ticket("t1", "p", "lab1", 256, 1, {"lab1": 1, "lab2": 2}, time.time())
    with pytest.raises(RoleError):
        asyncio.run(master.op_leave("lab1", {"name": "lab3"}))
    assert asyncio.run(master.op_leave("lab3", {"name": "lab3"})) == {"left": True}
    rooms = asyncio.run(master.op_heartbeat("lab1", {"name": "lab1", "used_mem_mb": 0, "used_vcpus": 0}))["rooms"]
    assert {r["name"]: r["up"] for r in rooms} == {"lab1": True, "lab2": True, "lab3": False}
    # lab2 falls silent: a sweep after the timeout downs it and fails its slots.
    assert master.sweep(time.time() + 1.0) == []
    master.store.heartbeat("lab1", 0, 0, time.time() + 6.0)
    assert master.sweep(time.time() + 6.0) == ["lab2"]
    assert master.store.ticket("t1")["failed"] == {"lab1": 0, "lab2": 2}


@pytest.mark.parametrize("name,number,peers,match", [
    ("a/b", 1, ["172.31.254.3"], "family name"),
    ("p", 0, ["172.31.254.3"], "family number"),
    ("p", 1, "172.31.254.3", "peers"),
    ("p", 1, ["172.31.254.3", 7], "peers"),
    ("p", 1, ["evil.example"], "IPv4"),
    ("p", 1, ["172.31.254.3"] * 2000, "at most"),
])
def test_a_malformed_family_peers_is_refused(span, name, number, peers, match):
    with pytest.raises(UsageError, match=match):
        asyncio.run(span.family_peers_here("lab1", name, number, peers))


def test_family_peers_only_from_the_host_whose_clones_run_here(span):
    """A host may re-point a family's tunnel only if clones of its own run here
    in that family (else any member could splice itself into another's network)."""
    from sfmpi.hostd.net.families import Family
    fam = Family(name="p", number=1, net=None, members={"p-3": 3})
    span.families = type("Fams", (), {"by_name": {"p": fam}})()
    span.origin["p-3"] = ("lab1", "p-ck1")
    for origin, number in (("lab3", 1), ("lab1", 2)):
        with pytest.raises(UsageError, match="holds no family p"):
            asyncio.run(span.family_peers_here(origin, "p", number, ["172.31.254.3"]))
