"""Batch systems: `sfmpi jobs script|submit|run|cleanup|sge-pe` and elastic Slurm,
`sfmpi slurm config|worker-image|resume|suspend` (docs/batch.md)."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import click

_COMMAND = {"ignore_unknown_options": True}


def add_jobs_commands(main: click.Group) -> None:
    main.add_command(jobs)
    main.add_command(slurm)


@click.group()
def jobs() -> None:
    """Job scripts for Slurm and Grid Engine, and what runs inside them."""


def _spec_options(f):
    for opt in reversed([
        click.option("--nodes", type=int, default=1, show_default=True, help="Nodes (hosts) for the job."),
        click.option("--ntasks", type=int, default=None, help="Tasks (Slurm) or PE slots (SGE); default: one per node."),
        click.option("--time", "time_limit", default=None, help="Wall-clock limit (minutes, HH:MM:SS, D-HH:MM:SS)."),
        click.option("--name", default="sfmpi", show_default=True, help="Job name."),
        click.option("--checkpoint", default=None, help="Restore the parent VM from this checkpoint directory."),
        click.option("--image", default=None, help="Else boot the parent from this image (default: the default image)."),
        click.option("--mem", default="512M", show_default=True, help="The parent's RAM (when booted)."),
        click.option("--cpus", type=int, default=1, show_default=True, help="The parent's vCPUs (when booted)."),
        click.option("--directive", "extra", multiple=True, metavar="LINE",
                     help="One more header directive, without its prefix (repeatable): --directive '--partition=big'."),
        click.option("--skip", multiple=True, metavar="OPTION", help="Leave out a default directive, e.g. --skip --exclusive."),
    ]):
        f = opt(f)
    return f


def _script(scheduler, nodes, ntasks, time_limit, name, checkpoint, image, mem, cpus, extra, skip, command):
    from .jobs.script import JobSpec, for_scheduler
    return for_scheduler(scheduler, JobSpec(command=tuple(command), nodes=nodes, ntasks=ntasks, time=time_limit,
                                            name=name, checkpoint=checkpoint, image=image, mem=mem, cpus=cpus,
                                            extra=tuple(extra), skip=tuple(skip)))


@jobs.command("script", context_settings=_COMMAND)
@click.argument("scheduler", type=click.Choice(["slurm", "sge"]))
@_spec_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def jobs_script(scheduler, command, **opts) -> None:
    """Print a job script that runs COMMAND (e.g. `sfmpirun -n 8 ./prog`) in a parent VM."""
    click.echo(_script(scheduler, command=command, **opts).script(), nl=False)


@jobs.command("submit", context_settings=_COMMAND)
@click.argument("scheduler", type=click.Choice(["slurm", "sge"]))
@_spec_options
@click.option("--json", "as_json", is_flag=True)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def jobs_submit(scheduler, command, as_json, **opts) -> None:
    """Write the job script next to the output and submit it; prints the job ID."""
    from . import proc
    job = _script(scheduler, command=command, **opts)
    fd, path = tempfile.mkstemp(prefix=f"{job.spec.name}-", suffix=".sh", dir=os.getcwd())
    with os.fdopen(fd, "w") as f:
        f.write(job.script())
    os.chmod(path, 0o755)
    job_id = job.parse_job_id(proc.output(job.submit_argv(path), timeout=60))
    click.echo(json.dumps({"job": job_id, "script": path}) if as_json else job_id)


@jobs.command("run", context_settings=_COMMAND)
@click.option("--checkpoint", default=None, help="Restore the parent VM from this checkpoint directory.")
@click.option("--image", default=None, help="Else boot it from this image (default: the default image).")
@click.option("--mem", default="512M", show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def jobs_run(checkpoint, image, mem, cpus, command) -> None:
    """Inside a batch job (what the job script runs): start sfmpi on the job's nodes,
    run COMMAND in a parent VM, tear down. Exits with COMMAND's code."""
    from .hostd.master import allocation
    from .hostd.policy.admission import parse_size_mb
    from .jobs.runner import ParentSpec, run
    if checkpoint and image:
        from .errors import UsageError
        raise UsageError("give --checkpoint or --image, not both")
    code = run(allocation.from_env(), ParentSpec(checkpoint, image, parse_size_mb(mem), cpus), list(command))
    sys.exit(code)


@jobs.command("cleanup")
@click.option("--job", default=None, help="The job whose leftovers to remove (ID, or BACKEND-ID).")
@click.option("--stale", is_flag=True, help="Every job directory whose master is gone.")
@click.option("--json", "as_json", is_flag=True)
def jobs_cleanup(job, stale, as_json) -> None:
    """Remove what a killed job left on this node (for Slurm's epilog, SGE's PE stop procedure)."""
    from .jobs.runner import cleanup
    if job is None and "SLURM_JOB_ID" in os.environ and not stale:
        job = os.environ["SLURM_JOB_ID"]
    done = cleanup(job, stale)
    click.echo(json.dumps({"cleaned": done}) if as_json else "".join(f"cleaned {d}\n" for d in done), nl=False)


@jobs.command("sge-pe")
@click.option("--name", default="sfmpi", show_default=True)
@click.option("--slots", type=int, default=9999, show_default=True)
@click.option("--allocation-rule", default="$fill_up", show_default=True)
def jobs_sge_pe(name, slots, allocation_rule) -> None:
    """Print the Grid Engine parallel environment for sfmpi jobs (`qconf -Ap FILE`)."""
    from .jobs.script import ParallelEnvironment
    click.echo(ParallelEnvironment(name, slots, allocation_rule, sfmpi=_sfmpi_path()).text(), nl=False)


def _sfmpi_path() -> str:
    import shutil
    return shutil.which("sfmpi") or "sfmpi"


# -- elastic Slurm -----------------------------------------------------------------
_DIR = click.option("--dir", "directory", default=None, metavar="DIR",
                    help="The elastic state directory (default: $SFMPI_SLURM_DIR or /var/lib/sfmpi/slurm).")


@click.group()
def slurm() -> None:
    """Elastic Slurm: State=CLOUD nodes made by cloning a warm worker VM."""


@slurm.command("config")
@click.option("--nodes", required=True, metavar="HOSTLIST", help="The elastic nodes, e.g. cloud[1-4].")
@click.option("--cpus", type=int, default=1, show_default=True, help="vCPUs of each node's VM.")
@click.option("--mem", default="512M", show_default=True, help="RAM of each node's VM.")
@click.option("--partition", default="cloud", show_default=True)
@click.option("--suspend-time", type=int, default=300, show_default=True, help="Idle seconds before a node is suspended.")
@click.option("--resume-timeout", type=int, default=300, show_default=True)
@_DIR
def slurm_config(nodes, cpus, mem, partition, suspend_time, resume_timeout, directory) -> None:
    """Print the slurm.conf lines for elastic nodes (and write the resume and suspend programs they name)."""
    from .hostd.policy.admission import parse_size_mb
    from .jobs import elastic
    d = elastic.elastic_dir(directory).resolve()
    elastic.expand(nodes)
    elastic.write_programs(d)
    click.echo("\n".join(elastic.config_lines(nodes, cpus, parse_size_mb(mem), d, partition, suspend_time,
                                               resume_timeout)))


@slurm.command("worker-image")
@click.option("--slurm-conf", type=click.Path(), default="/etc/slurm/slurm.conf", show_default=True)
@click.option("--munge-key", type=click.Path(), default="/etc/munge/munge.key", show_default=True)
@click.option("--image", default=None, help="An image with slurmd and munge (default: built, cached).")
@click.option("--mem", default="512M", show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True)
@_DIR
@click.option("--json", "as_json", is_flag=True)
def slurm_worker_image(slurm_conf, munge_key, image, mem, cpus, directory, as_json) -> None:
    """Boot the worker VM (slurmd configured, munged running), checkpoint it, and make it what resume forks."""
    from dataclasses import asdict
    from pathlib import Path

    from .cli import _client
    from .hostd.policy.admission import parse_size_mb
    from .jobs import elastic
    home = _client().paths.home
    st = elastic.build_worker(elastic.elastic_dir(directory).resolve(), home, Path(slurm_conf).resolve(),
                              Path(munge_key).resolve(), image, parse_size_mb(mem), cpus)
    click.echo(json.dumps(asdict(st), indent=2) if as_json else st.checkpoint)


@slurm.command("resume")
@click.argument("hostlist")
@_DIR
def slurm_resume(hostlist, directory) -> None:
    """ResumeProgram: fork the worker into the nodes HOSTLIST and register them."""
    from .jobs import elastic
    for node, vm in elastic.resume(elastic.elastic_dir(directory), hostlist).items():
        click.echo(f"{node} {vm}")


@slurm.command("suspend")
@click.argument("hostlist")
@_DIR
def slurm_suspend(hostlist, directory) -> None:
    """SuspendProgram: stop the VMs of the nodes HOSTLIST."""
    from .jobs import elastic
    for vm in elastic.suspend(elastic.elastic_dir(directory), hostlist):
        click.echo(f"stopped {vm}")


@slurm.command("mode")
@click.argument("mode", type=click.Choice(["clone", "boot"]))
@_DIR
def slurm_mode(mode, directory) -> None:
    """How resume makes nodes: clone the worker (default) or boot each from the worker image."""
    from .jobs import elastic
    click.echo(elastic.set_mode(elastic.elastic_dir(directory), mode).mode)
