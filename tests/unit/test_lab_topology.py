"""The lab's layout and its build commands, checked by replaying them on a
model of namespaces and links: nothing is run."""
from __future__ import annotations

import ipaddress

import pytest

from sfmpi.errors import UsageError
from sfmpi.hostd.lab import topology
from sfmpi.hostd.lab.topology import BRIDGE, LAB_NS, MASTER_IP


class Model:
    """What the argvs make, namespace by namespace. Every command is checked
    as it is replayed: it names an existing namespace and existing links."""

    def __init__(self):
        self.links: dict[str, set[str]] = {}      # namespace -> its links
        self.up: set[tuple[str, str]] = set()
        self.master: dict[tuple[str, str], str] = {}
        self.addrs: dict[tuple[str, str], str] = {}
        self.no_ipv6: dict[str, set[str]] = {}   # namespace -> the disable_ipv6 scopes set
        self.links_made_with_ipv6: list[tuple[str, str]] = []

    def need_ns(self, ns: str) -> None:
        assert ns in self.links, f"namespace {ns} used before `ip netns add {ns}`"

    def need_link(self, ns: str, dev: str) -> None:
        assert dev in self.links[ns], f"link {dev} in {ns} used before it is made"

    def add_link(self, ns: str, dev: str) -> None:
        self.need_ns(ns)
        assert dev not in self.links[ns], f"two links {dev} in {ns}"
        self.links[ns].add(dev)
        if "default" not in self.no_ipv6[ns]:
            self.links_made_with_ipv6.append((ns, dev))

    def replay(self, argv: list[str]) -> None:
        assert argv[0] == "ip", argv
        if argv[1] == "netns":
            verb, ns = argv[2], argv[3]
            if verb == "add":
                assert ns not in self.links
                self.links[ns], self.no_ipv6[ns] = {"lo"}, set()
            elif verb == "delete":
                self.need_ns(ns)
                del self.links[ns]
            elif verb == "exec":
                self.need_ns(ns)
                assert argv[4:7] == ["sysctl", "-q", "-w"], argv
                key, value = argv[7].split("=")
                scope = key.split(".")[3]
                assert key == f"net.ipv6.conf.{scope}.disable_ipv6" and value == "1", argv
                self.no_ipv6[ns].add(scope)
            else:
                raise AssertionError(f"unexpected {argv}")
            return
        # Anything else must name its namespace: nothing may act on the main one.
        assert argv[1] == "-n", f"{argv} would act in the main namespace"
        ns, rest = argv[2], argv[3:]
        self.need_ns(ns)
        if rest[:2] == ["link", "add"]:
            self.add_link(ns, rest[2])
            if "peer" in rest:
                peer = rest[rest.index("peer") + 2]
                target = rest[rest.index("netns") + 1] if "netns" in rest else ns
                self.add_link(target, peer)
        elif rest[:2] == ["link", "set"]:
            dev = rest[2]
            self.need_link(ns, dev)
            if rest[3:] == ["up"]:
                self.up.add((ns, dev))
            elif rest[3] == "master":
                self.need_link(ns, rest[4])
                self.master[(ns, dev)] = rest[4]
            else:
                raise AssertionError(f"unexpected {argv}")
        elif rest[:2] == ["addr", "add"]:
            dev = rest[rest.index("dev") + 1]
            self.need_link(ns, dev)
            assert (ns, dev) not in self.addrs
            self.addrs[(ns, dev)] = rest[2]
        else:
            raise AssertionError(f"unexpected {argv}")


def built(k: int) -> Model:
    m = Model()
    for argv in topology.up_argvs(k):
        m.replay(argv)
    return m


def test_host_names_ips_and_indexes():
    assert topology.host_names(3) == ["lab1", "lab2", "lab3"]
    assert len(topology.host_names(topology.MAX_HOSTS)) == topology.MAX_HOSTS
    assert topology.host_ip("lab1") == ipaddress.IPv4Address("172.31.254.1")
    assert topology.host_ip("lab16") == ipaddress.IPv4Address("172.31.254.16")
    assert topology.host_index("lab7") == 7
    assert MASTER_IP == ipaddress.IPv4Address("172.31.254.254")
    assert all(topology.host_ip(n) in topology.UNDERLAY for n in topology.host_names(16))
    assert MASTER_IP not in {topology.host_ip(n) for n in topology.host_names(16)}


@pytest.mark.parametrize("k", [0, -1, 17, True, "3", 2.0, None])
def test_host_count_out_of_range(k):
    with pytest.raises(UsageError):
        topology.host_names(k)
    with pytest.raises(UsageError):
        topology.up_argvs(k)


@pytest.mark.parametrize("name", ["lab0", "lab17", "lab01", "lab", "labx", "lab1p", "eth0", LAB_NS, "", None])
def test_not_a_lab_host(name):
    with pytest.raises(UsageError):
        topology.host_index(name)
    with pytest.raises(UsageError):
        topology.host_ip(name)
    assert not topology.is_host_name(name)


@pytest.mark.parametrize("k", [1, 3, 16])
def test_every_command_names_an_existing_namespace_and_link(k):
    built(k)  # Model.replay asserts command by command


@pytest.mark.parametrize("k", [1, 3, 16])
def test_the_built_lab(k):
    m = built(k)
    assert set(m.links) == {LAB_NS, *topology.host_names(k)}
    assert m.addrs[(LAB_NS, BRIDGE)] == "172.31.254.254/24"
    assert (LAB_NS, BRIDGE) in m.up and (LAB_NS, "lo") in m.up
    for name in topology.host_names(k):
        assert m.links[name] == {"lo", "eth0"}
        assert m.addrs[(name, "eth0")] == f"{topology.host_ip(name)}/24"
        assert {(name, "lo"), (name, "eth0")} <= m.up
        port = topology.bridge_port(name)
        assert m.master[(LAB_NS, port)] == BRIDGE and (LAB_NS, port) in m.up
    # The lab namespace holds the bridge and one port per host, nothing else.
    assert m.links[LAB_NS] == {"lo", BRIDGE, *(topology.bridge_port(n) for n in topology.host_names(k))}


def test_ipv6_is_off_before_any_link_is_made():
    m = built(3)
    assert all(scopes == {"all", "default"} for scopes in m.no_ipv6.values())
    assert m.links_made_with_ipv6 == []


def test_mtu_1500_on_every_made_link():
    for argv in topology.up_argvs(3):
        if argv[3:5] == ["link", "add"]:
            ends = 2 if "peer" in argv else 1  # a veth's two ends, or the bridge
            mtus = [argv[i + 1] for i, word in enumerate(argv) if word == "mtu"]
            assert mtus == ["1500"] * ends, argv


@pytest.mark.parametrize("k", [1, 3, 16])
def test_down_removes_everything_up_made_hosts_first(k):
    m = built(k)
    down = topology.down_argvs(k)
    for argv in down:
        assert argv[:3] == ["ip", "netns", "delete"]
        m.replay(argv)
    assert m.links == {}
    assert [a[3] for a in down] == [*reversed(topology.host_names(k)), LAB_NS]
