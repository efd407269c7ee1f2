"""Batch systems: `sfmpi jobs script|submit|run|cleanup|sge-pe` (docs/batch.md)."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import click

_COMMAND = {"ignore_unknown_options": True}


def add_jobs_commands(main: click.Group) -> None:
    main.add_command(jobs)


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
    job_id = job.parse_job_id(proc.run(job.submit_argv(path), timeout=60).stdout)
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
