"""The clone API from inside a VM: fork semantics, re-identification, lifecycle.

Programs run in the session's parent VM (via `vm exec`) and fork it with
sfmpi.request_ticket/clone, the sfclone CLI and libsfclone.
"""
from __future__ import annotations

import json
import textwrap
import time

import pytest

pytestmark = pytest.mark.timeout(900)

# The parent listens on a TCP port before it forks; every clone connects back
# over the family network and reports what it sees, then exits with its ID.
REPORT_PROGRAM = r'''
import json, os, secrets, socket, sys, time
import sfmpi

me = sfmpi.whoami()
secret = secrets.token_hex(8)                      # a Python variable
open("/tmp/in-tmp", "w").write(secret)              # a file in /tmp (tmpfs)
open("/root/on-disk", "w").write(secret)            # a file on the disk
held = open("/root/held", "w+"); held.write(secret); held.flush(); held.seek(0)   # an open file
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7000)); srv.listen(16)

t = sfmpi.request_ticket(3)
i = sfmpi.clone(t)
if i == 0:
    reports = []
    srv.settimeout(120)
    for _ in range(t.granted):
        c, _ = srv.accept()
        reports.append(json.loads(c.makefile().readline()))
        c.close()
    statuses = sfmpi.join(t)
    print(json.dumps({"parent": me, "granted": t.granted, "reports": reports,
                      "statuses": {str(k): v for k, v in statuses.items()},
                      "failures": statuses.failures, "secret": secret,
                      "parent_sees_clone_file": os.path.exists("/root/clone-wrote")}))
else:
    srv.close()
    open("/root/clone-wrote", "w").write(str(i))   # private to this clone
    ident = sfmpi.whoami()
    report = {"i": i, "whoami": ident, "hostname": socket.gethostname(),
              "variable": secret, "tmp": open("/tmp/in-tmp").read(),
              "disk": open("/root/on-disk").read(), "held": held.read(),
              "machine_id": open("/etc/machine-id").read().strip(),
              "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
              "urandom": os.urandom(16).hex(), "time": time.time()}
    s = socket.create_connection((me["ip"], 7000), timeout=30)
    s.sendall((json.dumps(report) + "\n").encode())
    s.close()
    sfmpi.exit(i)
'''



@pytest.fixture(scope="module")
def python_run(cli, parent) -> dict:
    cli.put(parent, "/root/report.py", REPORT_PROGRAM)
    t0 = time.time()
    p = cli.exec(parent, "cd /root && python3 report.py", check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["host_t0"], out["host_t1"] = t0, time.time()
    return out


def test_python_clone_returns_ids_and_join_gets_exit_statuses(python_run):
    assert python_run["granted"] == 3
    assert sorted(r["i"] for r in python_run["reports"]) == [1, 2, 3]
    assert python_run["statuses"] == {"1": 1, "2": 2, "3": 3}
    assert python_run["failures"] == {}


def test_clones_inherit_memory_open_files_tmp_and_disk(python_run):
    secret = python_run["secret"]
    for r in python_run["reports"]:
        assert (r["variable"], r["tmp"], r["disk"], r["held"]) == (secret,) * 4, r["i"]
    # ... and then diverge: what a clone wrote is not in the parent.
    assert python_run["parent_sees_clone_file"] is False


def test_every_copy_has_its_own_identity(python_run):
    parent = python_run["parent"]
    copies = [parent] + [r["whoami"] for r in python_run["reports"]]
    for key in ("mac", "ip", "hostname"):
        values = [c[key] for c in copies]
        assert len(set(values)) == len(values), (key, values)
    reports = python_run["reports"]
    assert len({r["machine_id"] for r in reports}) == 3
    assert len({r["boot_id"] for r in reports}) == 3   # UCX and systemd take it for "same machine"
    assert len({r["urandom"] for r in reports}) == 3
    for r in reports:
        # hostname and address are the documented function of (family, ID)
        assert r["hostname"] == r["whoami"]["hostname"] == f"parent-{r['whoami']['id']}"
        assert r["whoami"]["role"] == "clone" and r["whoami"]["family"] == "parent"
        # the clock was set from the host's
        assert python_run["host_t0"] - 1 <= r["time"] <= python_run["host_t1"] + 1


def test_clones_are_gone_after_join(cli, python_run):
    names = {r["name"] for r in cli.json("vm", "list")}
    assert not any(n.startswith("parent-") and n[7:].isdigit() for n in names), names


SHELL_PROGRAM = r'''
set -e
T=$(sfclone ticket 2)
ID=$(sfclone clone "$T")
if [ "$ID" = 0 ]; then
    sfclone join "$T"
else
    echo "clone $ID at $(hostname)" > /dev/null
    sfclone exit $((ID + 10))
fi
'''


def test_sfclone_from_a_shell_script(cli, parent):
    cli.put(parent, "/root/fork.sh", SHELL_PROGRAM)
    p = cli.exec(parent, "sh /root/fork.sh", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["1 11", "2 12"]


C_PROGRAM = r'''
#include <stdio.h>
#include <sfclone.h>
int main(void) {
    sfc_ticket t; int id, st[8], n, rc;
    if ((rc = sfc_request_ticket(2, 0, &t)) != 0) { fprintf(stderr, "ticket: %s\n", sfc_last_error()); return 2; }
    if ((rc = sfc_clone(&t, &id)) != 0) { fprintf(stderr, "clone: %s\n", sfc_last_error()); return 3; }
    if (id > 0) { sfc_exit(20 + id); return 4; }
    if ((rc = sfc_join(&t, st, 8, &n)) != 0) { fprintf(stderr, "join: %s\n", sfc_last_error()); return 5; }
    for (int i = 1; i <= n; i++) printf("%d %d\n", i, st[i]);
    return 0;
}
'''


def test_libsfclone_from_c(cli, parent):
    cli.put(parent, "/root/fork.c", C_PROGRAM)
    cli.exec(parent, "cd /root && cc -O2 -o fork fork.c $(pkg-config --cflags --libs sfclone)")
    p = cli.exec(parent, "/root/fork", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["1 21", "2 22"]


def py(cli, vm: str, code: str, check: bool = False):
    return cli("vm", "exec", vm, "--", "python3", "-c", textwrap.dedent(code), check=check, timeout=240)


def test_wrong_role_and_bad_tickets_fail_clearly(cli, parent):
    p = py(cli, parent, "import sfmpi; sfmpi.exit(0)")
    assert p.returncode != 0 and "RoleError" in p.stderr and "not a clone" in p.stderr
    p = py(cli, parent, "import sfmpi; sfmpi.clone('no-such-ticket')")
    assert "TicketError" in p.stderr and "no ticket no-such-ticket" in p.stderr
    p = py(cli, parent, "import sfmpi; sfmpi.request_ticket(0)")
    assert "UsageError" in p.stderr
    p = py(cli, parent, "import sfmpi; t = sfmpi.request_ticket(1); sfmpi.join(t)")
    assert "TicketError" in p.stderr and "not been used" in p.stderr
    # A used ticket cannot fork again; a clone cannot join its parent's ticket.
    p = py(cli, parent, """
        import sfmpi, sys
        t = sfmpi.request_ticket(1)
        i = sfmpi.clone(t)
        if i:
            try:
                sfmpi.join(t)
            except sfmpi.errors.RoleError:
                sfmpi.exit(7)
            sfmpi.exit(1)
        try:
            sfmpi.clone(t)
        except sfmpi.errors.TicketError as e:
            print("used:", e)
        print(dict(sfmpi.join(t)))
    """)
    assert p.returncode == 0, p.stderr
    assert "used: ticket" in p.stdout and "{1: 7}" in p.stdout


def test_kill_destroys_clones_and_join_reports_them(cli, parent):
    p = py(cli, parent, """
        import sfmpi, time
        t = sfmpi.request_ticket(2)
        i = sfmpi.clone(t)
        if i:
            time.sleep(3600)
        print(sorted(sfmpi.kill(t)))
        r = sfmpi.join(t)
        print(dict(r), sorted(r.failures))
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["[1, 2]", "{} [1, 2]"]


def test_ticket_timeout_kills_hanging_clones(cli, parent):
    p = py(cli, parent, """
        import sfmpi, time
        t = sfmpi.request_ticket(1, timeout=5)
        if sfmpi.clone(t):
            time.sleep(3600)
        r = sfmpi.join(t)
        print(r.failures[1])
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("timeout")


def test_failing_clone_hook_fails_the_clone_call(cli, parent):
    cli.exec(parent, "printf '#!/bin/sh\\necho bad hook >&2\\nexit 3\\n' > /etc/sfmpi/clone.d/50-bad; "
                     "chmod +x /etc/sfmpi/clone.d/50-bad")
    try:
        p = py(cli, parent, """
            import sfmpi
            t = sfmpi.request_ticket(1)
            try:
                print("id", sfmpi.clone(t))
            except sfmpi.errors.CloneError as e:
                print("CloneError:", e)
        """)
    finally:
        cli.exec(parent, "rm -f /etc/sfmpi/clone.d/50-bad")
    assert "CloneError:" in p.stdout and "hook 50-bad failed with exit 3: bad hook" in p.stdout, p.stdout + p.stderr
    names = {r["name"] for r in cli.json("vm", "list")}
    assert not any(n.startswith("parent-") and n[7:].isdigit() for n in names), names


def test_second_concurrent_clone_call_is_busy(cli, parent):
    # A slow hook keeps the first call open for seconds, so the second one surely overlaps it.
    cli.exec(parent, "printf '#!/bin/sh\\nsleep 3\\n' > /etc/sfmpi/clone.d/10-slow; "
                     "chmod +x /etc/sfmpi/clone.d/10-slow")
    try:
        p = py(cli, parent, """
            import sfmpi, threading, time
            t1, t2 = sfmpi.request_ticket(1), sfmpi.request_ticket(1)
            res = {}

            def first():
                i = sfmpi.clone(t1)
                if i:
                    sfmpi.exit(0)  # the clone ends here, whatever its main thread does
                res["a"] = i

            th = threading.Thread(target=first)
            th.start()
            time.sleep(0.5)
            try:
                sfmpi.clone(t2)
                print("no error")
            except sfmpi.errors.BusyError as e:
                print("busy:", e)
            except Exception as e:
                print("other:", type(e).__name__, e)
            th.join()
            print(dict(sfmpi.join(t1)))
            sfmpi.kill(t2)   # never used: its slot goes back to the host
        """)
    finally:
        cli.exec(parent, "rm -f /etc/sfmpi/clone.d/10-slow")
    assert p.returncode == 0, p.stderr
    assert "busy: another clone call is in progress" in p.stdout and "{1: 0}" in p.stdout, p.stdout


HOSTILE = r'''
import json, socket
def call(raw):
    s = socket.socket(socket.AF_UNIX); s.settimeout(90); s.connect("/run/sfmpi/api.sock")
    s.sendall(raw + b"\n")
    out = s.makefile("rb").readline()
    s.close()
    return json.loads(out) if out else None
lines = [b'{"v": 1, "op": "ticket", "n": 2, "timeout": NaN}', b'{"v": 1, "op": "ticket", "n": 1e400}',
         b'{"v": 1, "op": "ticket", "n": "4"}', b'{"v": 1, "op": "ticket", "n": 99999999999999999999}',
         b'{"v": 1, "op": "join", "ticket": {"a": [[[[[[[[1]]]]]]]]}, "timeout": -Infinity}',
         b'{"v": 1, "op": "create_clones", "checkpoint": "/etc/passwd", "ticket": "x"}',
         b'{"v": 1, "op": "exit", "status": 1.5}', b'{"v": 1, "op": "no-such-op"}',
         b'{"v": 1, "op": "kill", "ticket": "' + b"x" * 200000 + b'"}', b'\xff\xfe not json']
print(json.dumps([call(l) for l in lines]))
print(json.dumps(call(b'{"v": 1, "op": "ticket", "n": 1}')))
'''


def test_a_hostile_program_in_the_guest_gets_errors_and_hostd_serves_on(cli, parent):
    from sfmpi.client import HostdClient
    # What other tests' tickets hold, if any: the hostile program must add nothing to it.
    held_before = HostdClient(cli.paths).call("ping")["reserved"]
    cli.put(parent, "/root/hostile.py", HOSTILE)
    out = cli.exec(parent, "python3 /root/hostile.py").stdout.strip().splitlines()
    answers, good = json.loads(out[-2]), json.loads(out[-1])
    for a in answers:
        assert a is not None and a["ok"] is False and a["error"]["type"] in ("UsageError", "ProtocolError"), a
    assert "NaN" in answers[0]["error"]["message"] and "longer than" in answers[8]["error"]["message"]
    assert good["ok"] is True and good["ticket"]["granted"] == 1
    # The good ticket, never used, is all the program holds; killing it gives it back.
    assert HostdClient(cli.paths).call("ping")["reserved"] != held_before
    py(cli, parent, f"import sfmpi; sfmpi.kill({good['ticket']['id']!r})")
    assert HostdClient(cli.paths).call("ping")["reserved"] == held_before
    assert cli.exec(parent, "echo still-here").stdout.strip() == "still-here"
