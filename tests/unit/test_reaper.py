"""The reaper ends mpiexec's session when sfmpirun dies, even by SIGKILL, and
holds none of sfmpirun's descriptors meanwhile."""
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

from launcher.reaper import SessionReaper, session_members

# A stand-in for sfmpirun, a real process: forks the reaper, starts a session
# whose leader ignores SIGTERM (as a stuck mpirun), prints its id, and waits.
SFMPIRUN = textwrap.dedent("""
    import subprocess, sys, time
    from launcher.reaper import SessionReaper
    r = SessionReaper(grace=0.5)
    r.fork()
    p = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600 & wait"], start_new_session=True)
    r.watch(p.pid)
    print(p.pid, flush=True)
    if sys.argv[1] == "release":
        p.kill(); p.wait(); r.release(); print("released", flush=True)
    else:
        time.sleep(600)
""")


def _start(mode: str, **kw) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SFMPIRUN, mode], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), **kw)
    return proc, int(proc.stdout.readline())


def _gone_within(sid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not session_members(sid):
            return True
        time.sleep(0.05)
    return False


def test_sigkilled_parent_leaves_no_session_behind():
    proc, sid = _start("wait")
    assert _gone_within(sid, 0.3) is False          # it ignores the SIGTERM it would get
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone_within(sid, 10), session_members(sid)


def test_release_waits_for_the_reaper_and_leaves_nothing():
    proc, sid = _start("release")
    assert proc.stdout.readline().strip() == "released"
    assert proc.wait(timeout=10) == 0
    assert not session_members(sid)


def test_reaper_holds_none_of_the_parents_descriptors():
    # The parent's end of a pipe must close when the parent dies, reaper or not:
    # the clones' control lines depend on it.
    r, w = os.pipe()
    proc, sid = _start("wait", pass_fds=(w,))
    os.close(w)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    readable, _, _ = select.select([r], [], [], 5.0)
    assert readable and os.read(r, 1) == b""          # EOF: nobody else holds it
    os.close(r)
    assert _gone_within(sid, 10)


def test_release_without_a_session_is_harmless():
    reaper = SessionReaper(grace=0.1)
    reaper.fork()
    reaper.release()
    reaper.release()
