"""Re-identification pieces of the guest agent, run on the host (no VM):
network ioctls inside a scratch network namespace, /etc/hosts, clone.d hooks."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from sfmpi.guest import identity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def netns():
    name = f"sfid-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def configure_in(ns: str, ident: dict) -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from sfmpi.guest import identity; "
            "identity.nic_name = lambda: 'd0'; identity.configure_network(eval(sys.argv[2]))")
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, ROOT, repr(ident)], check=True)


def test_network_identity_replaces_mac_address_and_keeps_default_route(netns):
    for k in (3, 4):  # a second change replaces the first (a clone of a clone)
        configure_in(netns, {"mac": f"0a:5f:00:01:00:0{k}", "ip": f"10.100.1.{k + 2}", "prefix": 24,
                             "gateway": "10.100.1.1"})
    link = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "d0"], capture_output=True, text=True).stdout
    addrs = subprocess.run(["ip", "-n", netns, "-o", "-4", "addr", "show", "d0"], capture_output=True,
                           text=True).stdout
    routes = subprocess.run(["ip", "-n", netns, "route"], capture_output=True, text=True).stdout
    assert "link/ether 0a:5f:00:01:00:04" in link and ",UP" in link
    assert addrs.count("inet ") == 1 and "inet 10.100.1.6/24" in addrs
    assert "default via 10.100.1.1 dev d0" in routes


def test_hosts_block_is_replaced_not_appended(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.1.1 sfmpi\n10.0.0.9 user-entry\n")
    monkeypatch.setattr(identity, "HOSTS_FILE", str(hosts))
    identity.write_hosts([["p", "10.100.1.2"], ["p-1", "10.100.1.3"]])
    identity.write_hosts([["p", "10.100.1.2"], ["p-2", "10.100.1.4"]])
    assert hosts.read_text() == ("127.0.0.1 localhost\n10.0.0.9 user-entry\n# sfmpi family begin\n"
                                 "10.100.1.2 p\n10.100.1.4 p-2\n# sfmpi family end\n")


def hook(directory, name: str, body: str, mode: int = 0o755) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)


IDENT = {"id": 2, "family": "p", "ip": "10.100.1.4", "hostname": "p-2"}


def test_hooks_run_in_order_with_the_clone_environment(tmp_path, monkeypatch):
    log = tmp_path / "log"
    hook(tmp_path, "20-second", f'echo "second $SF_CLONE_ID" >> {log}')
    hook(tmp_path, "10-first", f'echo "first $SF_CLONE_ID $SF_FAMILY $SF_IP $SF_HOSTNAME" >> {log}')
    hook(tmp_path, "30-not-executable", f"echo never >> {log}", mode=0o644)
    monkeypatch.setattr(identity, "HOOK_DIR", str(tmp_path))
    identity.run_clone_hooks(IDENT)
    assert log.read_text() == "first 2 p 10.100.1.4 p-2\nsecond 2\n"


def test_a_failing_hook_names_itself_and_stops_the_rest(tmp_path, monkeypatch):
    log = tmp_path / "log"
    hook(tmp_path, "10-bad", "echo broken config >&2; exit 4")
    hook(tmp_path, "20-after", f"echo ran >> {log}")
    monkeypatch.setattr(identity, "HOOK_DIR", str(tmp_path))
    with pytest.raises(identity.IdentityError, match="hook 10-bad failed with exit 4: broken config"):
        identity.run_clone_hooks(IDENT)
    assert not log.exists()


def test_no_hook_directory_is_fine(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "HOOK_DIR", str(tmp_path / "missing"))
    identity.run_clone_hooks(IDENT)
