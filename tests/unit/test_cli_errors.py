"""CLI errors: one line, the right exit code, and no hostd started for bad input."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from sfmpi.cli import main


@pytest.fixture
def env(tmp_path):
    home, images = tmp_path / "home", tmp_path / "images"
    images.mkdir()
    return {"SFMPI_HOME": str(home), "SFMPI_IMAGE_DIR": str(images)}


@pytest.fixture
def cli(env):
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args), env=env)


def no_hostd(env):
    from pathlib import Path
    home = Path(env["SFMPI_HOME"])
    return not (home / "hostd.sock").exists() and not (home / "hostd.log").exists() \
        and not (home / "hostd.lock").exists()


@pytest.mark.parametrize("n", ["0", "-3"])
def test_clone_n_must_be_positive(cli, env, n):
    r = cli("clone", "ck-1", "-n", n)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("sfmpi: error: ") and "at least 1" in lines[0]
    assert r.stdout == ""
    assert no_hostd(env)


def test_vm_start_without_default_image(cli, env):
    r = cli("vm", "start", "x")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no --image given" in lines[0]
    assert no_hostd(env)


@pytest.mark.parametrize("port, why", [
    ("0", "1..65535"), ("65536", "1..65535"), ("http", "1..65535"), ("80/icmp", "neither tcp nor udp"),
    ("80/", "neither tcp nor udp"),
])
def test_vm_start_bad_open_port(cli, env, port, why):
    # Checked before anything else: no image is needed to be told, and no hostd starts.
    r = cli("vm", "start", "x", "--nat", "--open-port", "22", "--open-port", port)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"sfmpi: error: bad open port '{port}'") and why in lines[0]
    assert r.stdout == ""
    assert no_hostd(env)


@pytest.mark.parametrize("argv, named", [
    (("vm", "start", "x", "--open-port"), "--open-port"),
    (("clone", "ck-1"), "-n"),
    (("checkpoint", "vm1", "--keep", "0"), "--keep"),
    (("checkpoint", "rm"), "ID"),
])
def test_a_missing_or_bad_option_is_a_usage_error(cli, env, argv, named):
    r = cli(*argv)
    assert r.exit_code == 2 and named in r.stderr
    assert no_hostd(env)


def test_bad_choice_rejected_by_click(cli, env):
    r = cli("checkpoint", "vm1", "--mode", "sideways")
    assert r.exit_code == 2 and "sideways" in r.stderr
    assert no_hostd(env)


COMMANDS = [[], ["image"], ["image", "build"], ["vm"], ["vm", "start"], ["vm", "exec"], ["vm", "list"],
            ["vm", "stop"], ["checkpoint"], ["checkpoint", "take"], ["checkpoint", "ls"], ["checkpoint", "rm"],
            ["clone"], ["stats"], ["down"], ["hostd"], ["master"], ["lab"], ["lab", "up"], ["lab", "down"],
            ["lab", "status"], ["lab", "policy"], ["cluster"], ["cluster", "init"],
            ["jobs"], ["jobs", "script"], ["jobs", "submit"], ["jobs", "run"], ["jobs", "cleanup"], ["jobs", "sge-pe"],
            ["slurm"], ["slurm", "config"], ["slurm", "worker-image"], ["slurm", "resume"], ["slurm", "suspend"],
            ["slurm", "mode"], ["pool"], ["pool", "up"], ["pool", "status"], ["pool", "set"],
            ["pool", "client"], ["pool", "down"], ["pool", "serve"], ["console"], ["vm", "set"],
            ["stats", "vm"], ["stats", "latest"], ["stats", "metrics"], ["control"], ["control", "add"], ["control", "rm"],
            ["control", "list"], ["control", "log"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_help(cli, env, cmd):
    r = cli(*cmd, "--help")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Usage: ")
    assert no_hostd(env)


def test_every_command_is_covered_by_help_test():
    listed = {tuple(c) for c in COMMANDS}
    for name, cmd in main.commands.items():
        assert (name,) in listed
        for sub in getattr(cmd, "commands", {}):
            assert (name, sub) in listed
