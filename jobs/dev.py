"""``jobs dev``: every Procfile process on this machine, on embedded defaults, logs interleaved.

``release`` runs first, to completion; then every other process starts in a process group of its own
and its output is printed line by line behind a coloured ``name |`` prefix, as foreman and honcho do.
Without REDIS_URL the session starts an embedded Redis and hands its URL to the processes; without
DATABASE_URL they share the default SQLite file. Ctrl-C or SIGTERM stops them all (SIGTERM, then
SIGKILL after a timeout); a process that exits on its own stops the others and fails the session.

Written by hand rather than on honcho: honcho knows nothing of the embedded Redis (which must outlive
the workers' graceful stop, Ctrl-C included), signals whole process groups (a dramatiq worker signalled
by both the group and its master exits at once instead of finishing its steps), and would be one more
dependency for about the size of this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import click

from resources.errors import ConfigurationError

__all__ = [
    "RELEASE",
    "Output",
    "ProcessType",
    "ProcfileError",
    "find_procfile",
    "parse_procfile",
    "read_procfile",
    "run_dev",
    "select_processes",
    "shell_command",
]

#: The one-off process that runs to completion before the others start (Heroku's release phase).
RELEASE = "release"
#: How long the processes get to stop after SIGTERM before they are killed, seconds.
STOP_TIMEOUT_S = 10.0
#: How often the supervisor looks at its processes and at the signals it received, seconds.
POLL_S = 0.05
#: How long to wait for the last lines of a process that has exited, seconds.
DRAIN_S = 2.0
#: Foreman's grammar of a Procfile line.
_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.*)$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: Shell tokens that make a command more than one simple command.
_CONTROL_OPERATORS = frozenset({";", ";;", "&", "&&", "|", "||", "|&", "(", ")"})
_COLOURS = ("cyan", "yellow", "green", "magenta", "blue", "bright_cyan", "bright_yellow", "bright_green")
_SYSTEM = "system"
_FORMAT = "one process a line, 'name: command' ('#' starts a comment)"
_STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 0, signal.SIGHUP: 0}


class ProcfileError(ConfigurationError):
    """The Procfile is missing or malformed; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class ProcessType:
    name: str
    command: str


def parse_procfile(text: str, source: str = "Procfile") -> list[ProcessType]:
    entries: list[ProcessType] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        match = _LINE.match(line)
        if match is None:
            raise ProcfileError(f"{where}: {line!r} is not 'name: command'; write {_FORMAT}")
        name, command = match.group(1), match.group(2).strip()
        if not command:
            raise ProcfileError(f"{where}: process {name!r} has no command; write {_FORMAT}")
        if name in seen:
            raise ProcfileError(f"{where}: process {name!r} is already defined on line {seen[name]}; rename one")
        try:
            shlex.split(command)
        except ValueError as error:  # the shell would refuse it too, but only once everything else is up
            raise ProcfileError(f"{where}: cannot read the command of {name!r} ({error}); check its quotes") from None
        seen[name] = number
        entries.append(ProcessType(name, command))
    if not entries:
        raise ProcfileError(f"{source} defines no process; write {_FORMAT}")
    return entries


def find_procfile(explicit: Path | None = None, cwd: Path | None = None) -> Path:
    """``--procfile``, else ./Procfile (as foreman looks), else the one next to this package."""
    if explicit is not None:
        if not explicit.is_file():
            raise ProcfileError(f"Procfile {explicit} not found; pass --procfile the path of an existing Procfile")
        return explicit
    candidates = [(cwd or Path.cwd()) / "Procfile", Path(__file__).resolve().parent.parent / "Procfile"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise ProcfileError(f"no Procfile at {looked}; run from the project's directory or pass --procfile PATH")


def read_procfile(path: Path) -> list[ProcessType]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ProcfileError(f"cannot read Procfile {path}: {error}; pass --procfile a readable text file") from None
    return parse_procfile(text, str(path))


def _names(values: Sequence[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def select_processes(
    entries: Sequence[ProcessType], only: Sequence[str] = (), skip: Sequence[str] = ()
) -> tuple[ProcessType | None, list[ProcessType]]:
    """(release or None, the long-running processes) chosen by ``--only`` and ``--skip`` (comma-separated).

    ``--only`` chooses among the long-running processes: release still runs first unless skipped, since a
    worker on a database without its schema fails on its first message.
    """
    known = [e.name for e in entries]
    wanted, unwanted = _names(only), _names(skip)
    for option, names in (("--only", wanted), ("--skip", unwanted)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ProcfileError(
                f"{option} names {', '.join(map(repr, unknown))}, not in the Procfile; choose among {', '.join(known)}"
            )
    release = next((e for e in entries if e.name == RELEASE and RELEASE not in unwanted), None)
    chosen = [e for e in entries if e.name != RELEASE and (not wanted or e.name in wanted) and e.name not in unwanted]
    if not chosen and not (release is not None and RELEASE in wanted):
        raise ProcfileError(f"--only/--skip leave no process to start; choose among {', '.join(known)}")
    return release, chosen


def shell_command(command: str) -> str:
    """The script for ``/bin/sh -c``, with ``exec`` in front of a simple command.

    A shell keeps Procfile semantics (quotes, ``$VAR``, ``env A=b cmd``), as on Heroku. ``exec`` makes the
    program itself the group leader that receives SIGTERM: dash does not replace itself with the last
    command, and a shell dies on SIGTERM without passing it on. A compound command keeps its shell.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    compound = any(t in _CONTROL_OPERATORS for t in tokens) or "`" in command or "$(" in command
    if compound or not tokens or _ASSIGNMENT.match(tokens[0]):
        return command
    return f"exec {command}"


class Output:
    """Lines of every process behind an aligned, coloured ``name |``; one lock keeps lines whole."""

    def __init__(self, names: Sequence[str]) -> None:
        self.width = max(len(n) for n in [*names, _SYSTEM])
        self.colours = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}
        self.lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        prefix = click.style(f"{name:<{self.width}} |", fg=self.colours.get(name), bold=name == _SYSTEM)
        with self.lock:
            click.echo(f"{prefix} {text}")

    def system(self, text: str) -> None:
        self.line(_SYSTEM, text)

    def pump(self, name: str, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                self.line(name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    simple: bool
    reader: threading.Thread | None = None
    stopped_group: bool = False

    def group_alive(self) -> bool:
        if self.process.poll() is None:  # reaps the leader: a zombie still counts as a member of its group
            return True
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: the id is someone else's now
            return False
        return _runs_in_group(self.process.pid)

    def killpg(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def drain(self, timeout: float = DRAIN_S) -> None:
        if self.reader is not None:
            self.reader.join(timeout)


def _runs_in_group(pgid: int) -> bool:
    """Whether a process of the group is more than a zombie. What the leader started is orphaned when it
    exits, and init reaps it late or, in a container without one, never: it would look alive forever."""
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): trust killpg
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "stat"), "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


class _Signals:
    """Records SIGINT/SIGTERM/SIGHUP for the supervisor loop (a handler must not take locks)."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def exit_code(self) -> int | None:
        """None until a stop was asked for; then 130 for Ctrl-C (as shells expect), 0 for SIGTERM/SIGHUP."""
        return _STOP_CODES.get(signal.Signals(self.received[0]), 0) if self.received else None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        previous = {s: signal.signal(s, self.handle) for s in _STOP_CODES}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _spawn(entry: ProcessType, env: dict[str, str], cwd: Path) -> _Child:
    from .embedded_redis import _die_with_parent

    script = shell_command(entry.command)
    process = subprocess.Popen(
        ["/bin/sh", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its own group: a terminal's Ctrl-C reaches only us, and we stop each process in order.
        start_new_session=True,
        # A `jobs dev` killed with SIGKILL leaves no worker behind (the embedded Redis does the same).
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    return _Child(entry.name, process, simple=script != entry.command)


def _start_reader(child: _Child, output: Output) -> None:
    assert child.process.stdout is not None
    child.reader = threading.Thread(
        target=output.pump, args=(child.name, child.process.stdout), name=f"dev-{child.name}", daemon=True
    )
    child.reader.start()


def _stop(children: Sequence[_Child], output: Output, signals: _Signals, timeout: float) -> None:
    """SIGTERM every process, wait for their groups to empty, SIGKILL what is left at the deadline."""
    running = [c for c in children if c.group_alive()]
    if not running:
        return
    output.system(f"stopping {', '.join(c.name for c in running)}")
    for child in running:
        if child.simple and child.process.poll() is None:
            # The program owns its children: the dramatiq master forwards SIGTERM to its workers.
            child.process.send_signal(signal.SIGTERM)
        else:
            child.killpg(signal.SIGTERM)
            child.stopped_group = True
    already = len(signals.received)
    deadline = time.monotonic() + timeout
    while running:
        hurry = len(signals.received) > already  # a second Ctrl-C: no more waiting
        for child in list(running):
            if not child.group_alive():
                running.remove(child)
                child.drain()
                output.system(f"{child.name} {_describe(child.process.returncode)}")
            elif hurry or time.monotonic() > deadline:
                child.killpg(signal.SIGKILL)
                child.process.wait()
                running.remove(child)
                child.drain()
                why = "stop asked again" if hurry else f"it did not stop within {timeout:g} s"
                output.system(f"{child.name} killed: {why}")
            elif child.process.poll() is not None and not child.stopped_group:
                child.killpg(signal.SIGTERM)  # the leader is gone; what it started is not
                child.stopped_group = True
        time.sleep(POLL_S)


def _supervise(children: Sequence[_Child], output: Output, signals: _Signals) -> int:
    """Wait for a signal (its exit code) or for a process to exit on its own (its code, never 0)."""
    while True:
        requested = signals.exit_code()
        if requested is not None:
            return requested
        for child in children:
            returncode = child.process.poll()
            if returncode is not None:
                child.drain()
                output.system(f"{child.name} {_describe(returncode)}; stopping the other processes")
                return _exit_code(returncode) or 1
        time.sleep(POLL_S)


def _environment(redis_url: str | None, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JOBS_BROKER", None)  # these processes always use the real broker
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    # Absolute: the processes run in the Procfile's directory and must share the caller's SQLite file.
    env["JOBS_DATA_DIR"] = str(data_dir)
    # The Procfile names `dramatiq` and `python`: this interpreter's (the virtualenv's), not the system's.
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env["PATH"]]) if env.get("PATH") else bin_dir
    # Python buffers a pipe's output: lines would arrive in bursts, out of step with the others.
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """A terminal's Ctrl-C goes to its whole foreground group, embedded Redis included. Started with
    SIGINT blocked (the mask survives exec; Redis never unblocks it), Redis outlives the workers' stop and
    still ends on SIGTERM or with us."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_dev(
    procfile: Path | None = None,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    stop_timeout: float = STOP_TIMEOUT_S,
) -> int:
    """Run the Procfile's processes until a signal or until one exits; return the exit code."""
    from resources.config import get_settings
    from resources.urls import redact_url

    from .embedded_redis import EmbeddedRedis

    path = find_procfile(procfile)
    release, processes = select_processes(read_procfile(path), only, skip)
    settings = get_settings()  # a bad setting fails here, once, rather than in every process
    output = Output([e.name for e in ([release] if release else []) + processes])
    with _Signals().installed() as signals, contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        if redis_url is None:
            embedded = EmbeddedRedis()
            stack.callback(embedded.stop)  # also removes its directory if it fails to start
            with _sigint_blocked():
                redis_url = embedded.start()
            # The exact URL, on a line of its own: other shells and scripts connect with it.
            output.system(f"embedded Redis at {redis_url}")
        else:
            output.system(f"Redis at {redact_url(redis_url)}")
        output.system(f"database at {redact_url(settings.database_url)}; Procfile {path}")
        env = _environment(redis_url, settings.data_dir)
        cwd = path.resolve().parent
        if release is not None:
            child = _spawn(release, env, cwd)
            _start_reader(child, output)
            while child.process.poll() is None and signals.exit_code() is None:
                time.sleep(POLL_S)
            requested = signals.exit_code()
            if requested is not None:
                _stop([child], output, signals, stop_timeout)
                return requested
            child.drain()
            if child.process.returncode != 0:
                output.system(f"{RELEASE} {_describe(child.process.returncode)}; not starting the other processes")
                return _exit_code(child.process.returncode) or 1
            output.system(f"{RELEASE} done")
        requested = signals.exit_code()  # Ctrl-C while Redis started (it was blocked) or as release ended
        if requested is not None or not processes:
            return requested or 0
        # Every process is forked before any reader thread starts: a fork while other threads hold
        # locks (and the preexec_fn it runs) can deadlock the child.
        children: list[_Child] = []
        try:
            for entry in processes:
                children.append(_spawn(entry, env, cwd))
            for child in children:
                output.system(f"{child.name} started (pid {child.process.pid})")
                _start_reader(child, output)
            return _supervise(children, output, signals)
        finally:
            _stop(children, output, signals, stop_timeout)
