"""sfmpirun: fork the worker cluster, run the real mpiexec on it, join.

One Job walks explicit states: PLANNED -> TICKETED -> CLONED -> RUNNING ->
ENDED (or FAILED). Whatever ends it, the clones are destroyed (exit or kill),
every process of the job in this VM is killed (its sshd too) and its
directory is removed.
"""
from __future__ import annotations

import enum
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from sfmpi import api
from sfmpi.errors import LaunchError, SfmpiError

from . import control, detect, options, plan, reaper, trust
from .hub import SshHub

# native/sfmpirun-agent: the launcher's ssh, a client of the job's SshHub.
AGENT = "/usr/local/lib/sfmpi/sfmpirun-agent"
JOB_ENV = "SFMPIRUN_JOB"
# native/mpich-finalize: MPICH 4.0 over UCX can hang in MPI_Finalize across hosts.
MPICH_FINALIZE_FIX = "/usr/local/lib/sfmpi/libsfmpirun-finalize.so"
RUN_DIR = Path(os.environ.get("SFMPIRUN_DIR", "/run/sfmpirun"))
POLL = 0.2
MEMBER_CHECK = 1.0   # how often a running job asks hostd whether its clones live
KILL_GRACE = 3.0
JOIN_TIMEOUT = 120.0


class JobState(enum.Enum):
    PLANNED = "planned"
    TICKETED = "ticketed"
    CLONED = "cloned"
    RUNNING = "running"
    ENDED = "ended"
    FAILED = "failed"


class Job:
    def __init__(self, spec: plan.JobSpec, environ: dict[str, str] | None = None):
        self.spec = spec
        self.environ = dict(os.environ if environ is None else environ)
        self.state = JobState.PLANNED
        self.job_id = uuid.uuid4().hex[:10]
        self.dir = RUN_DIR / self.job_id
        self.ticket: api.Ticket | None = None
        self.trust: trust.JobTrust | None = None
        self.reaper = reaper.SessionReaper(grace=KILL_GRACE)
        self.lines = control.CloneLines()
        self.mpiexec: subprocess.Popen | None = None
        self.hub: SshHub | None = None
        self.rank_clones: set[str] = set()  # clones with ranks: the launcher's agent must log in to each
        self.must_reach: set[str] = set()   # of those, the ones not yet seen in this launch
        self.argv: list[str] = []
        self.stop_signal: int | None = None
        self.t0 = time.monotonic()

    # -- reporting -------------------------------------------------------
    def say(self, text: str) -> None:
        if self.spec.verbose:
            sys.stderr.write(f"sfmpirun: [{time.monotonic() - self.t0:7.3f} s] {text}\n")
            sys.stderr.flush()

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    # -- the job ---------------------------------------------------------
    def run(self) -> int:
        try:
            self.start()
            return self.finish(self.run_mpiexec())
        finally:
            self._clean_up()

    def start(self) -> None:
        """Fork the cluster and prepare the launch. In a clone this never returns."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        wanted = plan.clones_wanted(self.spec)
        importing = _import_paramiko_meanwhile() if wanted else None
        flavour = self.spec.mpi if self.spec.mpi != "auto" else detect.detect(self.spec.launcher_args)
        env = plan.resolve_env(self.spec, self.environ)
        me = api.whoami()
        self.say(f"{flavour}, {self.spec.ranks} rank(s), {wanted} clone(s) wanted, parent {me['ip']}")
        sweep_stale_jobs()
        self.dir.mkdir(parents=True, mode=0o700)
        (self.dir / OWNER).write_text(_process_id(os.getpid()) + "\n")
        if importing is not None:
            clone_id = self._fork(wanted, importing)
            if clone_id:
                self._be_a_clone()  # never returns
        self._prepare(flavour, env, me)

    def _fork(self, wanted: int, importing: threading.Thread) -> int:
        self.ticket = api.request_ticket(wanted)
        self.state = JobState.TICKETED
        try:
            plan.check_granted(self.spec, wanted, self.ticket.granted)
        except SfmpiError:
            self._give_back_ticket()
            raise
        if self.ticket.granted == 0:
            self.say("no clone granted: running here only")
            self._give_back_ticket()
            return 0
        self.say(f"ticket {self.ticket.id}: {self.ticket.granted} clone(s)")
        importing.join()  # before the fork (see _import_paramiko_meanwhile); the keys need it too
        self.say("paramiko imported")
        self.trust = trust.create(self.dir, self.job_id)
        self.listener = control.listen()
        self.control_port = self.listener.port
        self.control_key = self.listener.authkey   # made now, before the fork: the clones have it too
        self.say(f"the job's sshd listens on port {self.trust.port}; forking")
        clone_id = api.clone(self.ticket)
        if clone_id:
            return clone_id
        self.state = JobState.CLONED
        self.listener.close()
        self.say("forked")
        return 0

    def _give_back_ticket(self) -> None:
        """An unused ticket: hand its reservation back at once, not when it expires."""
        api.kill(self.ticket)
        self.ticket = None

    def _be_a_clone(self) -> None:
        """This is a clone's copy of sfmpirun: wait for the parent's word, then end the clone."""
        status = control.wait_for_exit_word(self.listener)
        try:
            api.exit(status)
        finally:
            os._exit(status)

    def _members(self) -> list[api.Member]:
        if self.ticket is None:  # no clone: everything runs here
            return []
        members = api.members(self.ticket)
        for m in members:
            if m.state != "running":
                raise LaunchError(f"clone {m.id} ended before the job started: {m.failure or m.status}")
        return members

    def _prepare(self, flavour: str, env: dict[str, str], me: dict) -> None:
        members = self._members()
        hosts = ([me["ip"]] if self.spec.parent_ranks or not members else []) + [m.ip for m in members]
        per_host = plan.slots(self.spec, len(hosts))
        self.rank_clones = set(plan.hosts_with_ranks(hosts, self.spec.ranks, per_host)) - {me["ip"]}
        if self.trust is not None:
            # Logging in to the clones starts first: it takes them longest.
            self.hub = SshHub(self.dir, self.trust.key, self.trust.host_key, port=self.trust.port, say=self.say)
            self.hub.start(self.rank_clones)
        for m in members:
            self.lines.connect(m.id, m.ip, self.control_port, self.control_key)
        hostfile = self.dir / "hostfile"
        hostfile.write_text(plan.hostfile(flavour, hosts, per_host))
        # Installed, not written to the job directory: /run is mounted noexec.
        if not os.access(AGENT, os.X_OK):
            raise LaunchError(f"{AGENT} is not installed in this VM (it comes with the guest image: native/)")
        subnet = api.family_subnet(me["ip"])
        if flavour == "mpich" and os.path.exists(MPICH_FINALIZE_FIX):
            env = plan.with_preload(env, self.environ, MPICH_FINALIZE_FIX)
        self.argv = plan.mpiexec_argv(flavour, self.spec, str(hostfile), AGENT, subnet, env)
        self.say("hosts " + " ".join(hosts) + "; " + " ".join(self.argv))
        if shutil.which(self.argv[0]) is None:
            raise LaunchError(f"{self.argv[0]} is not installed in this VM")

    def run_mpiexec(self) -> int:
        """The real mpiexec, once, on the cluster; its exit status. A job that
        has to be stopped is killed here with its clones (LaunchError, or
        128 + signal when sfmpirun was signalled)."""
        if self.hub is not None:
            self.hub.forget_launch()
        self.must_reach = set(self.rank_clones)
        # Killed with sfmpirun, even by SIGKILL: SIGTERM by the kernel and, should
        # mpiexec not heed it, SIGKILL by the reaper after a grace. Hydra and Open
        # MPI end their ranks and agents; the clones see the control line close and exit.
        self.reaper.fork()
        self.mpiexec = subprocess.Popen(self.argv, start_new_session=True, preexec_fn=trust.die_with_parent,
                                        env={**self.environ, JOB_ENV: str(self.dir)})
        self.reaper.watch(self.mpiexec.pid)
        self.state = JobState.RUNNING
        reason = self._supervise()
        if reason is None:
            status = self.mpiexec.returncode
            self.say(f"mpiexec exited with {status}")
            return status if status >= 0 else 128 - status
        self._kill_local()
        self._end_clones(ok=False)
        self.state = JobState.FAILED
        if self.stop_signal is not None:
            sys.stderr.write(f"sfmpirun: {reason}\n")
            return 128 + self.stop_signal
        raise LaunchError(reason)

    def finish(self, status: int) -> int:
        """The job ended by itself: the clones exit and are joined."""
        if self.state == JobState.FAILED:
            return status
        self._end_clones(ok=True)
        self.state = JobState.ENDED
        return status

    def _supervise(self) -> str | None:
        """Wait for mpiexec; the reason to stop it early, or None if it ended by itself."""
        next_check = time.monotonic() + MEMBER_CHECK
        launch_deadline = time.monotonic() + self.spec.launch_timeout
        while self.mpiexec.poll() is None:
            if self.stop_signal is not None:
                return f"stopped by {signal.Signals(self.stop_signal).name}; job killed"
            failures = self.hub.failures() if self.hub is not None else []
            if failures:
                return "SSH to a clone failed, job killed: " + "; ".join(failures)
            if self.ticket is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + MEMBER_CHECK
                for m in api.members(self.ticket):
                    if m.state != "running":
                        return f"clone {m.id} died ({m.failure or f'exited {m.status}'}); job killed"
            if self.must_reach and time.monotonic() >= launch_deadline:
                # Hydra waits forever for a proxy its launcher never started.
                missing = self.must_reach - (self.hub.reached() if self.hub is not None else set())
                if missing:
                    return (f"the launcher did not reach {', '.join(sorted(missing))} within "
                            f"{self.spec.launch_timeout} s (--launch-timeout); job killed")
                self.must_reach = set()
            time.sleep(POLL)
        return None

    def _kill_local(self) -> None:
        """mpiexec and everything it started here (local proxies, ranks): its session."""
        reaper.end_session(self.mpiexec.pid, KILL_GRACE, reap=self.mpiexec.poll)

    def _end_clones(self, ok: bool) -> None:
        if self.ticket is None or self.state not in (JobState.CLONED, JobState.RUNNING):
            return
        if ok:
            self.lines.send_exit(0)
        else:
            self.lines.close()
            api.kill(self.ticket)
        res = api.join(self.ticket, timeout=JOIN_TIMEOUT)
        self.say(f"joined: {dict(res)} {res.failures or ''}")
        self.ticket = None

    def _clean_up(self) -> None:
        if self.ticket is not None and self.state != JobState.TICKETED:
            # An error between fork and join: the clones must not outlive the job.
            try:
                api.kill(self.ticket)
                api.join(self.ticket, timeout=JOIN_TIMEOUT)
            except SfmpiError as exc:
                sys.stderr.write(f"sfmpirun: cleaning up clones: {exc}\n")
        if self.mpiexec is not None and self.mpiexec.poll() is None:
            self._kill_local()
        self.reaper.release()
        self.lines.close()
        if self.hub is not None:
            self.hub.close()
        if self.trust is not None:
            trust.stop(self.trust)
        shutil.rmtree(self.dir, ignore_errors=True)


OWNER = "owner"   # "PID STARTTIME" of the job's sfmpirun, in its directory


def sweep_stale_jobs() -> None:
    """Jobs whose sfmpirun was killed outright (SIGKILL: no clean-up ran) left
    their directory: the next sfmpirun removes it. Their sshd and clones are
    gone already (parent-death signal; the control line closed with sfmpirun)."""
    if not RUN_DIR.is_dir():
        return
    for job_dir in RUN_DIR.iterdir():
        try:
            owner = (job_dir / OWNER).read_text().split()
            alive = _process_id(int(owner[0])).split() == owner
        except (OSError, ValueError, IndexError):
            continue
        if alive:
            continue
        shutil.rmtree(job_dir, ignore_errors=True)


def _process_id(pid: int) -> str:
    """PID and start time: the same pair only while that very process lives."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22 is the start time; the command name (field 2) may hold spaces.
            return f"{pid} {f.read().rsplit(')', 1)[1].split()[19]}"
    except OSError:
        return f"{pid} gone"


def _import_paramiko_meanwhile() -> threading.Thread:
    """The hub needs paramiko after the fork; importing it takes ~2 s of a TCG
    guest's vCPU, so it is imported while the program is inspected and the
    ticket asked. It must be done before the fork (join the thread): an import still
    running goes on in every clone, where it only costs CPU, and in the parent
    it would compete with N-1 fresh clones for the host's cores (measured: the
    logins waited for it 8-12 s at N = 8)."""
    thread = threading.Thread(target=__import__, args=("paramiko",), daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = options.parse(argv)
    except options.HelpRequested:
        sys.stdout.write(options.USAGE)
        sys.exit(0)
    except SfmpiError as exc:
        sys.stderr.write(f"sfmpirun: {exc}\n{options.USAGE.splitlines()[0]}\n")
        sys.exit(exc.exit_code)
    try:
        sys.exit(Job(spec).run())
    except SfmpiError as exc:
        sys.stderr.write(f"sfmpirun: {exc}\n")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
