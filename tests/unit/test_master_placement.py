"""The master's placement: pack and spread over hosts' free room, pure functions."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfmpi.errors import CapacityError, UsageError
from sfmpi.hostd.master.placement import POLICIES, HostRoom, place

BIG = 1 << 20


def equal_hosts(*names: str) -> list[HostRoom]:
    return [HostRoom(name, free_mem_mb=BIG, free_vcpus=BIG) for name in names]


def test_pack_fills_the_parents_host_first_then_by_name():
    hosts = [HostRoom("c", 1024, 8), HostRoom("a", 512, 8), HostRoom("b", 1024, 8)]
    got = place(hosts, 7, 256, 1, "pack", first="b")
    assert got == {"b": 4, "a": 2, "c": 1}
    assert list(got) == ["b", "a", "c"]


def test_pack_without_first_goes_by_name_and_skips_unused_hosts():
    got = place(equal_hosts("z", "y", "x"), 3, 256, 1, "pack")
    assert got == {"x": 3}


@pytest.mark.parametrize("n, want", [(6, {"b": 2, "a": 2, "c": 2}), (8, {"b": 3, "a": 3, "c": 2}),
                                     (2, {"b": 1, "a": 1})])
def test_spread_round_robins_from_the_first_host(n, want):
    got = place(equal_hosts("a", "b", "c"), n, 256, 1, "spread", first="b")
    assert got == want and list(got) == list(want)


def test_spread_moves_on_when_a_host_is_full():
    hosts = [HostRoom("a", 256, 8), HostRoom("b", BIG, BIG), HostRoom("c", BIG, BIG)]
    assert place(hosts, 7, 256, 1, "spread", first="a") == {"a": 1, "b": 3, "c": 3}


def test_capacity_is_the_tighter_of_memory_and_vcpus():
    hosts = [HostRoom("mem-bound", 1024, 100), HostRoom("cpu-bound", BIG, 3)]
    assert place(hosts, 5, 512, 1, "pack", first="mem-bound") == {"mem-bound": 2, "cpu-bound": 3}
    assert place(hosts, 3, 256, 2, "pack", allow_fewer=True) == {"cpu-bound": 1, "mem-bound": 2}


def test_down_hosts_get_nothing_and_show_as_down():
    hosts = [HostRoom("lab1", 512, 4), HostRoom("lab2", 768, 8), HostRoom("lab3", BIG, BIG, up=False)]
    with pytest.raises(CapacityError) as err:
        place(hosts, 8, 256, 1, "pack")
    assert str(err.value) == "asked for 8 clones of 256 MB, 1 vCPU: only 5 fit (lab1: 2, lab2: 3, lab3: down)"
    assert place(hosts, 8, 256, 1, "spread", allow_fewer=True) == {"lab1": 2, "lab2": 3}


def test_nothing_fits_even_with_allow_fewer():
    with pytest.raises(CapacityError, match="no host has room for one clone of 4096 MB, 2 vCPUs"):
        place([HostRoom("a", 1024, 8)], 3, 4096, 2, "pack", allow_fewer=True)
    with pytest.raises(CapacityError, match=r"asked for 1 clone of 64 MB, 1 vCPU: none fit \(no hosts registered\)"):
        place([], 1, 64, 1, "spread")


def test_family_limit_caps_what_the_family_holds_at_once():
    hosts = equal_hosts("a", "b")
    assert place(hosts, 5, 256, 1, "spread", allow_fewer=True, family_limit=6,
                 family_held={"a": 2, "b": 1}) == {"a": 2, "b": 1}
    with pytest.raises(CapacityError, match=r"only 3 fit \(family limit 6, 3 held; a: \d+, b: \d+\)"):
        place(hosts, 5, 256, 1, "spread", family_limit=6, family_held={"a": 3})
    with pytest.raises(CapacityError, match="already holds 6 clones, its limit is 6"):
        place(hosts, 1, 256, 1, "pack", allow_fewer=True, family_limit=6, family_held={"a": 6})
    assert place(hosts, 2, 256, 1, "pack", family_limit=2) == {"a": 2}


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=-1), dict(n=True), dict(n=2.0), dict(mem_mb=0),
                                    dict(cpus=0), dict(cpus=True), dict(mem_mb=False), dict(policy="random"),
                                    dict(family_limit=-1), dict(family_limit=True),
                                    dict(family_limit=4, family_held={"a": -1})])
def test_bad_input_is_a_usage_error(kwargs):
    args = dict(hosts=equal_hosts("a"), n=1, mem_mb=256, cpus=1, policy="pack") | kwargs
    with pytest.raises(UsageError):
        place(**args)


def test_a_host_listed_twice_is_a_usage_error():
    with pytest.raises(UsageError, match="twice"):
        place(equal_hosts("a", "a"), 1, 256, 1, "pack")


# -- properties ------------------------------------------------------------
NAMES = st.sampled_from(["h0", "h1", "h2", "h3", "h4", "h5"])
host_rooms = st.lists(st.builds(HostRoom, name=NAMES, free_mem_mb=st.integers(-512, 8192),
                                free_vcpus=st.integers(-2, 32), up=st.booleans()),
                      max_size=6, unique_by=lambda h: h.name)
requests = st.fixed_dictionaries(dict(hosts=host_rooms, n=st.integers(1, 60), mem_mb=st.integers(1, 2048),
                                      cpus=st.integers(1, 4), policy=st.sampled_from(POLICIES),
                                      allow_fewer=st.booleans(), first=st.none() | NAMES))
PROPERTY = settings(max_examples=200, deadline=None)


def fits(host: HostRoom, mem_mb: int, cpus: int) -> int:
    return max(0, min(host.free_mem_mb // mem_mb, host.free_vcpus // cpus)) if host.up else 0


@PROPERTY
@given(req=requests)
def test_placement_respects_every_host_and_gives_all_or_refuses(req):
    total_room = sum(fits(h, req["mem_mb"], req["cpus"]) for h in req["hosts"])
    try:
        got = place(**req)
    except CapacityError:
        assert total_room < req["n"] if not req["allow_fewer"] else total_room == 0
        return
    by_name = {h.name: h for h in req["hosts"]}
    for name, count in got.items():
        host = by_name[name]
        assert host.up, "a down host got clones"
        assert 0 < count <= fits(host, req["mem_mb"], req["cpus"])
    assert sum(got.values()) == min(req["n"], total_room)
    expected_order = sorted(got, key=lambda name: (name != req["first"], name))
    assert list(got) == expected_order


@PROPERTY
@given(req=requests)
def test_spread_is_even_among_hosts_with_room_left(req):
    req = req | dict(policy="spread", allow_fewer=True)
    try:
        got = place(**req)
    except CapacityError:
        return
    room = {h.name: fits(h, req["mem_mb"], req["cpus"]) for h in req["hosts"]}
    not_full = [got.get(name, 0) for name, cap in room.items() if cap > 0 and got.get(name, 0) < cap]
    if not_full:
        assert max(not_full) - min(not_full) <= 1
        # a host filled up in some round, so it is at most one round ahead of the open ones
        assert all(got[name] <= min(not_full) + 1 for name in got if got[name] == room[name])


@PROPERTY
@given(req=requests, limit=st.integers(0, 40), held=st.dictionaries(NAMES, st.integers(0, 15), max_size=3))
def test_family_limit_is_never_exceeded(req, limit, held):
    try:
        got = place(**req, family_limit=limit, family_held=held)
    except CapacityError:
        return
    assert sum(got.values()) + sum(held.values()) <= limit
