"""sfmpirun's pure parts: options, rank layout, hostfiles, mpiexec command lines, trust lines."""
from __future__ import annotations

import os
import subprocess

import pytest

from sfmpi.errors import UsageError
from sfmpi.launcher import detect, options, plan, trust


def spec(*argv: str) -> plan.JobSpec:
    return options.parse(list(argv))


def test_options_mpirun_style():
    s = spec("-np", "4", "-ppn", "2", "-genv", "A", "1", "-x", "B=2", "-x", "HOME", "-wdir", "/tmp",
             "--mpi", "openmpi", "--allow-fewer", "-v", "./cpi", "-n", "3")
    assert (s.ranks, s.ppn, s.wdir, s.mpi, s.allow_fewer, s.verbose) == (4, 2, "/tmp", "openmpi", True, True)
    assert s.env == (("A", "1"), ("B", "2")) and s.env_names == ("HOME",)
    # The program's own -n is the program's.
    assert s.launcher_args == ("./cpi", "-n", "3")


def test_unknown_options_and_double_dash_go_to_the_real_launcher():
    assert spec("-n", "2", "-bind-to", "core", "./a").launcher_args == ("-bind-to", "core", "./a")
    assert spec("-n", "2", "--", "-n", "9", "./a").launcher_args == ("-n", "9", "./a")
    assert spec("--clones=3", "-n", "2", "./a").clones == 3
    assert spec("-n", "2", "--no-parent-ranks", "./a").parent_ranks is False


@pytest.mark.parametrize("argv, message", [
    (["./a"], "needs -n"),
    (["-n", "x", "./a"], "-n needs a number"),
    (["-n", "0", "./a"], "at least 1"),
    (["-n", "2", "-ppn", "0", "./a"], "-ppn must be at least 1"),
    (["-n", "2"], "no program"),
    (["-n", "2", "--mpi", "lam", "./a"], "mpich, openmpi or auto"),
    (["-n", "2", "-genv", "A"], "needs 2 value"),
    (["-n", "1", "--clones", "0", "--no-parent-ranks", "./a"], "nowhere to run"),
])
def test_bad_options_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        options.parse(argv)


def test_help():
    with pytest.raises(options.HelpRequested):
        options.parse(["-n", "2", "--help"])


def test_clones_wanted_counts_the_parent_as_a_host():
    assert plan.clones_wanted(spec("-n", "4", "./a")) == 3
    assert plan.clones_wanted(spec("-n", "1", "./a")) == 0
    assert plan.clones_wanted(spec("-n", "8", "-ppn", "2", "./a")) == 3
    assert plan.clones_wanted(spec("-n", "5", "-ppn", "2", "./a")) == 2
    assert plan.clones_wanted(spec("-n", "4", "--no-parent-ranks", "./a")) == 4
    assert plan.clones_wanted(spec("-n", "4", "--clones", "1", "./a")) == 1


def test_smaller_ticket_fails_unless_allowed():
    s = spec("-n", "4", "./a")
    plan.check_granted(s, 3, 3)
    with pytest.raises(UsageError, match="granted 1.*--allow-fewer"):
        plan.check_granted(s, 3, 1)
    plan.check_granted(spec("-n", "4", "--allow-fewer", "./a"), 3, 1)
    with pytest.raises(UsageError, match="nowhere"):
        plan.check_granted(spec("-n", "4", "--allow-fewer", "--no-parent-ranks", "./a"), 4, 0)


def test_fewer_hosts_oversubscribe():
    s = spec("-n", "8", "./a")
    assert plan.slots(s, 8) == 1 and plan.slots(s, 3) == 3


def test_the_launcher_must_reach_only_hosts_that_get_ranks():
    hosts = ["p", "c1", "c2", "c3"]
    assert plan.hosts_with_ranks(hosts, 4, 1) == hosts
    assert plan.hosts_with_ranks(hosts, 3, 2) == ["p", "c1"]      # --clones beyond what -n fills
    assert plan.hosts_with_ranks(hosts, 10, 3) == hosts


def test_launch_timeout_option():
    assert spec("-n", "2", "./a").launch_timeout == 120
    assert spec("-n", "2", "--launch-timeout", "5", "./a").launch_timeout == 5
    with pytest.raises(UsageError, match="at least 1 second"):
        spec("-n", "2", "--launch-timeout", "0", "./a")


def test_hostfiles():
    assert plan.hostfile("mpich", ["10.100.1.2", "10.100.1.3"], 2) == "10.100.1.2:2\n10.100.1.3:2\n"
    assert plan.hostfile("openmpi", ["10.100.1.2"], 1) == "10.100.1.2 slots=1\n"


def test_mpiexec_argv_mpich():
    s = spec("-n", "4", "-genv", "A", "1", "-wdir", "/w", "-l", "./cpi", "x")
    argv = plan.mpiexec_argv("mpich", s, "/j/hf", "/j/agent", "10.100.1.0/24", {"A": "1"})
    assert argv == ["mpiexec.mpich", "-launcher", "rsh", "-launcher-exec", "/j/agent", "-f", "/j/hf", "-n", "4",
                    "-genv", "A", "1", "-wdir", "/w", "-l", "./cpi", "x"]


def test_mpiexec_argv_openmpi():
    s = spec("-n", "2", "./cpi")
    argv = plan.mpiexec_argv("openmpi", s, "/j/hf", "/j/agent", "10.100.1.0/24", {"A": "1"})
    assert argv[:4] == ["mpiexec.openmpi", "--allow-run-as-root", "--hostfile", "/j/hf"]
    joined = " ".join(argv)
    assert "--mca plm_rsh_agent /j/agent" in joined and "--mca plm_rsh_no_tree_spawn 1" in joined
    assert "--mca oob_tcp_if_include 10.100.1.0/24" in joined and "-x A=1" in joined
    assert argv[-1] == "./cpi"


def test_resolve_env_takes_named_values_from_here():
    s = spec("-n", "1", "-genv", "A", "1", "-x", "B", "./a")
    assert plan.resolve_env(s, {"B": "2"}) == {"A": "1", "B": "2"}
    with pytest.raises(UsageError, match="B is not set"):
        plan.resolve_env(s, {})


def test_preload_goes_before_the_users():
    lib = "/usr/local/lib/sfmpi/libsfmpirun-finalize.so"
    assert plan.with_preload({"A": "1"}, {}, lib) == {"A": "1", "LD_PRELOAD": lib}
    assert plan.with_preload({}, {"LD_PRELOAD": "/x.so"}, lib)["LD_PRELOAD"] == lib + ":/x.so"
    # -genv LD_PRELOAD wins over the environment, as it does for the ranks
    assert plan.with_preload({"LD_PRELOAD": "/y.so"}, {"LD_PRELOAD": "/x.so"}, lib)["LD_PRELOAD"] == lib + ":/y.so"


def test_remote_command_is_left_for_the_remote_shell():
    # Hydra quotes the proxy path itself; the remote shell must see the quotes.
    assert plan.remote_command(['"/usr/bin/hydra_pmi_proxy"', "--control-port", "h:1"]) == \
        '"/usr/bin/hydra_pmi_proxy" --control-port h:1'


def test_flavour_from_ldd_output():
    mpich = "\tlinux-vdso.so.1 (0x0)\n\tlibmpich.so.12 => /lib/x86_64-linux-gnu/libmpich.so.12 (0x0)\n"
    ompi = "\tlibmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x0)\n"
    assert detect.flavour_of_libraries(mpich) == "mpich"
    assert detect.flavour_of_libraries(ompi) == "openmpi"
    assert detect.flavour_of_libraries("\tlibc.so.6 => /lib/libc.so.6 (0x0)\n") is None


def test_detect_refuses_a_program_without_mpi(tmp_path):
    with pytest.raises(UsageError, match="not linked against MPICH or Open MPI"):
        detect.detect(("/bin/true",))
    with pytest.raises(UsageError, match="no executable program"):
        detect.detect(("-l", str(tmp_path / "nothing")))


def test_job_sshd_takes_only_the_jobs_keys_and_skips_pam_unless_needed(tmp_path):
    conf = trust.sshd_config(tmp_path, 40123, "root", use_pam=False)
    lines = dict(line.split(" ", 1) for line in conf.splitlines())
    assert lines["Port"] == "40123" and lines["ListenAddress"] == "0.0.0.0"
    assert lines["HostKey"] == str(tmp_path / "host_key")
    assert lines["AuthorizedKeysFile"] == str(tmp_path / "authorized_keys")
    assert lines["AllowUsers"] == "root" and lines["AuthenticationMethods"] == "publickey"
    assert lines["UsePAM"] == "no" and lines["PasswordAuthentication"] == "no"
    assert "UsePAM yes" in trust.sshd_config(tmp_path, 40123, "root", use_pam=True)


def test_job_keys_are_openssh_keys_paramiko_and_ssh_keygen_read(tmp_path):
    import paramiko
    public = trust.write_keypair(tmp_path / "k", "sfmpirun-x")
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600"
    assert paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "k")).get_base64() == public.split()[1]
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(tmp_path / "k")], capture_output=True, text=True)
    assert derived.returncode == 0 and derived.stdout.split()[:2] == public.split()
    assert (tmp_path / "k.pub").read_text() == f"{public} sfmpirun-x\n"
    assert trust.write_keypair(tmp_path / "k2", "c") != public


def test_a_locked_account_is_seen_as_sshd_sees_it():
    shadow = "root:!*:20000:0:99999:7:::\nbob:*:20000::::::\nann:$y$j9T$abc:20000::::::\n"
    assert trust.account_locked(shadow, "root")
    assert not trust.account_locked(shadow, "bob")      # no password, not locked
    assert not trust.account_locked(shadow, "ann")
    assert not trust.account_locked(shadow, "nobody-here")


def test_a_killed_jobs_directory_is_swept(tmp_path, monkeypatch):
    from sfmpi.launcher import run
    monkeypatch.setattr(run, "RUN_DIR", tmp_path / "run")
    dead, live = tmp_path / "run" / "dead1", tmp_path / "run" / "live1"
    dead.mkdir(parents=True)
    live.mkdir()
    (dead / run.OWNER).write_text("999999 12345\n")                  # that process is gone
    (live / run.OWNER).write_text(run._process_id(os.getpid()) + "\n")  # this one lives
    run.sweep_stale_jobs()
    assert not dead.exists() and live.exists()


def test_family_subnet_is_the_family_network():
    from sfmpi import api
    assert api.family_subnet("10.100.7.13") == "10.100.7.0/24"
    assert api.family_subnet("10.101.0.2") == "10.101.0.0/24"
