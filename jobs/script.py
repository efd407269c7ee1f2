"""Job scripts for batch schedulers: one template, one small class per scheduler.

As in dask-jobqueue's `job_script()`: the scheduler's header lines differ, the
body is shared. The body hands the job to `sfmpi jobs run`, which starts
sfmpi's daemons on the job's nodes the scheduler's own way, restores a parent
VM from a checkpoint (or boots an image), runs the command inside it (usually
`sfmpirun ...`) and tears everything down when the command ends or the job is
cancelled. Users add directives (`extra`) and drop the ones they do not want
(`skip`, by their option name, e.g. "--time" or "-l").

Everything here is pure: `script()` returns text, `submit_argv()` a command line.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from sfmpi.errors import UsageError

TEMPLATE = """\
#!/bin/bash
{header}
# Made by `sfmpi jobs script {scheduler}`. sfmpi starts its daemons on the
# job's nodes, {parent}, runs the command inside it and
# tears everything down when it ends or the job is cancelled.
set -euo pipefail
{env}exec {run}
"""

_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?$|^(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_time(text: str) -> int:
    """A wall-clock limit as Slurm writes it ("D-HH:MM:SS", "HH:MM:SS", "MM:SS"
    or minutes) -> seconds."""
    m = _TIME.match(text.strip())
    if not m:
        raise UsageError(f"cannot read the time limit {text!r} (use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    if m.group(5):
        return int(m.group(5)) * 60
    days, a, b, c = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    h, mi, s = (a, b, int(c)) if c is not None else (0, a, b)
    if mi > 59 or s > 59:
        raise UsageError(f"time limit {text!r}: minutes and seconds go up to 59")
    return ((int(days or 0) * 24 + h) * 60 + mi) * 60 + s


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True)
class JobSpec:
    """What a user asks for; the scheduler subclasses turn it into directives."""
    command: tuple[str, ...]
    nodes: int = 1
    ntasks: int | None = None        # default: one per node
    time: str | None = None          # the scheduler's wall-clock limit
    name: str = "sfmpi"
    checkpoint: str | None = None    # a checkpoint directory to restore the parent from
    image: str | None = None         # else an image to boot it from (default: the default image)
    mem: str = "512M"                # the parent VM's RAM (booted from an image)
    cpus: int = 1
    extra: tuple[str, ...] = ()      # more directive lines, written as given after the prefix
    skip: tuple[str, ...] = ()       # directives to leave out, by option ("--time", "-l")
    sfmpi: str = "sfmpi"             # the sfmpi command on the nodes

    def __post_init__(self):
        if not self.command:
            raise UsageError("no command to run in the job (sfmpi jobs script ... -- sfmpirun -n 4 ./prog)")
        for what, v in (("--nodes", self.nodes), ("--cpus", self.cpus)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{what} must be at least 1 (got {v!r})")
        if self.ntasks is not None and self.ntasks < 1:
            raise UsageError(f"--ntasks must be at least 1 (got {self.ntasks})")
        if self.checkpoint and self.image:
            raise UsageError("give --checkpoint or --image, not both")
        if not _NAME.match(self.name):
            raise UsageError(f"job name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if self.time is not None:
            parse_time(self.time)
        for line in self.extra:
            if "\n" in line:
                raise UsageError(f"a directive is one line (got {line!r})")

    @property
    def tasks(self) -> int:
        return self.ntasks if self.ntasks is not None else self.nodes


class JobScript:
    """A scheduler's job script: header lines + the shared body."""
    scheduler = ""
    prefix = ""                       # "#SBATCH", "#$"

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def directives(self) -> list[tuple[str, str]]:
        """(option, the rest of the line) in the order they are written."""
        raise NotImplementedError

    def header(self) -> list[str]:
        skip = set(self.spec.skip)
        lines = [f"{self.prefix} {opt}{rest}" for opt, rest in self.directives() if opt not in skip]
        return lines + [f"{self.prefix} {line}" for line in self.spec.extra]

    def run_argv(self) -> list[str]:
        s = self.spec
        argv = [s.sfmpi, "jobs", "run"]
        if s.checkpoint:
            argv += ["--checkpoint", s.checkpoint]
        else:
            argv += (["--image", s.image] if s.image else []) + ["--mem", s.mem, "--cpus", str(s.cpus)]
        return argv + ["--", *s.command]

    def script(self) -> str:
        s = self.spec
        parent = (f"restores a parent VM from the checkpoint {s.checkpoint}" if s.checkpoint else
                  f"boots a parent VM from {'the image ' + s.image if s.image else 'the default image'}")
        return TEMPLATE.format(header="\n".join(self.header()), scheduler=self.scheduler, parent=parent,
                               env=self.env_lines(), run=shlex.join(self.run_argv()))

    def env_lines(self) -> str:
        return ""

    submit = ""                       # the submit command
    id_end = ""                       # what follows the ID in its output, if anything

    def submit_argv(self, path: str) -> list[str]:
        raise NotImplementedError

    @classmethod
    def parse_job_id(cls, stdout: str) -> str:
        first = stdout.strip().split(cls.id_end)[0]
        if not first.isdigit():
            raise UsageError(f"{cls.submit} printed no job ID: {stdout.strip()!r:.200}")
        return first


class SlurmScript(JobScript):
    scheduler = "slurm"
    prefix = "#SBATCH"

    def directives(self) -> list[tuple[str, str]]:
        s = self.spec
        out = [("--job-name", f"={s.name}"), ("--nodes", f"={s.nodes}"), ("--ntasks", f"={s.tasks}"),
               # One sfmpi job per node: its daemons listen on the node's fixed ports.
               ("--exclusive", ""), ("--output", f"={s.name}-%j.out")]
        if s.time:
            out.append(("--time", f"={s.time}"))
        return out

    submit, id_end = "sbatch", ";"    # --parsable: "ID" or "ID;cluster"

    def submit_argv(self, path: str) -> list[str]:
        return [self.submit, "--parsable", path]


class SgeScript(JobScript):
    scheduler = "sge"
    prefix = "#$"

    def directives(self) -> list[tuple[str, str]]:
        s = self.spec
        out = [("-N", f" {s.name}"), ("-S", " /bin/bash"), ("-cwd", ""), ("-j", " y"),
               ("-o", f" {s.name}.o$JOB_ID"),
               # Slots of the sfmpi PE (`sfmpi jobs sge-pe`): one per task.
               ("-pe", f" sfmpi {s.tasks}")]
        if s.time:
            out.append(("-l", f" h_rt={hms(parse_time(s.time))}"))
        return out

    submit, id_end = "qsub", "."      # -terse: "ID" (or "ID.1-4:1" for an array job)

    def submit_argv(self, path: str) -> list[str]:
        return [self.submit, "-terse", path]


SCHEDULERS: dict[str, type[JobScript]] = {"slurm": SlurmScript, "sge": SgeScript}


def for_scheduler(name: str, spec: JobSpec) -> JobScript:
    try:
        return SCHEDULERS[name](spec)
    except KeyError:
        raise UsageError(f"scheduler is one of {', '.join(SCHEDULERS)} (got {name!r})") from None


@dataclass(frozen=True)
class ParallelEnvironment:
    """Grid Engine's PE for sfmpi jobs (`qconf -Ap FILE`): control_slaves so that
    `qrsh -inherit` may start hostd on the job's other hosts, and start/stop
    procedures that clean up after a job whose runner was killed."""
    name: str = "sfmpi"
    slots: int = 9999
    allocation_rule: str = "$fill_up"
    sfmpi: str = "sfmpi"
    fields: dict = field(default_factory=dict)

    def text(self) -> str:
        lines = {"pe_name": self.name, "slots": str(self.slots), "user_lists": "NONE", "xuser_lists": "NONE",
                 "start_proc_args": f"{self.sfmpi} jobs cleanup --stale", "stop_proc_args":
                 f"{self.sfmpi} jobs cleanup --job $job_id", "allocation_rule": self.allocation_rule,
                 "control_slaves": "TRUE", "job_is_first_task": "FALSE", "urgency_slots": "min",
                 "accounting_summary": "FALSE", "qsort_args": "NONE", **self.fields}
        return "".join(f"{k:<19}{v}\n" for k, v in lines.items())
