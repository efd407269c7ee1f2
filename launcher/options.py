"""sfmpirun's command line, mpirun style.

Hand-written on purpose: mpirun's syntax is single-dash long options (-np,
-ppn, -genv, -wdir), a two-value -genv, and everything not ours handed to the
real launcher untouched. click and argparse split "-bind-to" into short flags
or reorder what they do not know; here our options come first and the first
word that is not one of them starts what goes to mpiexec verbatim.
"""
from __future__ import annotations

from sfmpi.errors import UsageError

from .plan import JobSpec

USAGE = """\
usage: sfmpirun [options] [--] [launcher options] PROGRAM [ARGS...]

Forks this VM into the clones an MPI job needs, runs the job on them with the
real mpiexec (MPICH or Open MPI) and joins. Exit status: the job's.

  -n, -np N          ranks (required)
  -ppn N             ranks per clone (default 1)
  --clones M         clones to fork (default: enough for N at -ppn)
  -genv NAME VALUE   set NAME=VALUE for every rank (repeatable)
  -x NAME[=VALUE]    the same, Open MPI style; NAME alone passes its value here
  -wdir DIR          working directory of the ranks
  --mpi FLAVOUR      mpich, openmpi or auto (default: from the program's libmpi)
  --parent-ranks / --no-parent-ranks
                     run ranks in this VM too (default: on)
  --allow-fewer      run on fewer clones if the host grants fewer
  --launch-timeout S end the job if the launcher has not reached every clone
                     with ranks within S seconds (default 120)
  -v, --verbose      say what happens, with timings, on stderr
  -h, --help         this text
Anything else, and everything after --, goes to the real mpiexec.
"""

VALUE_OPTIONS = {"-n": "ranks", "-np": "ranks", "-ppn": "ppn", "--clones": "clones", "-wdir": "wdir",
                 "--mpi": "mpi", "--launch-timeout": "launch_timeout"}
FLAG_OPTIONS = {"--parent-ranks": ("parent_ranks", True), "--no-parent-ranks": ("parent_ranks", False),
                "--allow-fewer": ("allow_fewer", True), "-v": ("verbose", True), "--verbose": ("verbose", True)}
INTEGER = {"ranks", "ppn", "clones", "launch_timeout"}


class HelpRequested(Exception):
    pass


def _int(option: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{option} needs a number (got {text!r})") from None


def parse(argv: list[str]) -> JobSpec:
    values: dict = {}
    env: list[tuple[str, str]] = []
    env_names: list[str] = []
    i = 0

    def value(n: int = 1) -> list[str]:
        if i + n >= len(argv):
            raise UsageError(f"{argv[i]} needs {n} value(s)")
        return argv[i + 1:i + 1 + n]

    while i < len(argv):
        word = argv[i]
        if word in ("-h", "--help"):
            raise HelpRequested()
        if word == "--":
            i += 1
            break
        if "=" in word and word.split("=", 1)[0] in VALUE_OPTIONS and word.startswith("--"):
            name, text = word.split("=", 1)
            key = VALUE_OPTIONS[name]
            values[key] = _int(name, text) if key in INTEGER else text
            i += 1
        elif word in VALUE_OPTIONS:
            key = VALUE_OPTIONS[word]
            (text,) = value()
            values[key] = _int(word, text) if key in INTEGER else text
            i += 2
        elif word in FLAG_OPTIONS:
            key, flag = FLAG_OPTIONS[word]
            values[key] = flag
            i += 1
        elif word == "-genv":
            name, text = value(2)
            env.append((name, text))
            i += 3
        elif word == "-x":
            (text,) = value()
            if "=" in text:
                env.append(tuple(text.split("=", 1)))
            else:
                env_names.append(text)
            i += 2
        else:
            break
    if "ranks" not in values:
        raise UsageError("sfmpirun needs -n N (the number of ranks)")
    return JobSpec(launcher_args=tuple(argv[i:]), env=tuple(env), env_names=tuple(env_names), **values)
