"""``jobs dev``: reading the Procfile, choosing processes, and what each process is started with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs import dev
from jobs.cli import main
from jobs.dev import (
    RELEASE,
    Output,
    ProcessType,
    ProcfileError,
    find_procfile,
    parse_procfile,
    read_procfile,
    select_processes,
    shell_command,
)

PROJECT_PROCFILE = Path(dev.__file__).resolve().parent.parent / "Procfile"


def test_comments_blank_lines_env_prefixes_and_colons_in_commands_are_read():
    text = (
        "# processes of the app\r\n"
        "\n"
        "release: python -m jobs migrate\r\n"
        "   \n"
        "  worker:   env dramatiq_worker_timeout=10 dramatiq jobs.app --queues default  \n"
        "web: python -m http.server --bind 127.0.0.1:8000\n"
        "    # an indented comment\n"
    )
    assert parse_procfile(text) == [
        ProcessType("release", "python -m jobs migrate"),
        ProcessType("worker", "env dramatiq_worker_timeout=10 dramatiq jobs.app --queues default"),
        ProcessType("web", "python -m http.server --bind 127.0.0.1:8000"),
    ]


def test_the_projects_procfile_has_release_and_four_processes():
    names = [e.name for e in read_procfile(PROJECT_PROCFILE)]
    assert names == ["release", "worker", "heavy", "background", "scheduler"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker dramatiq jobs.app\n", "Procfile:1: 'worker dramatiq jobs.app' is not 'name: command'"),
        ("# fine\nweb.1: serve\n", "Procfile:2: 'web.1: serve' is not 'name: command'"),
        ("worker:\n", "Procfile:1: process 'worker' has no command"),
        ("a: one\nb: two\na: three\n", "Procfile:3: process 'a' is already defined on line 1"),
        ("a: python -c 'print(1)\n", "Procfile:1: cannot read the command of 'a' (No closing quotation)"),
        ("# only a comment\n\n", "Procfile defines no process"),
        ("", "Procfile defines no process"),
    ],
)
def test_a_malformed_procfile_names_the_line_and_the_fix(text, message):
    with pytest.raises(ProcfileError) as raised:
        parse_procfile(text)
    assert str(raised.value).startswith(message)
    assert "write" in str(raised.value) or "rename" in str(raised.value) or "quotes" in str(raised.value)


def test_errors_name_the_file_they_read(tmp_path):
    path = tmp_path / "Procfile"
    path.write_text("ok: true\nnot a line\n")
    with pytest.raises(ProcfileError, match=f"^{re.escape(str(path))}:2: "):
        read_procfile(path)
    path.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ProcfileError, match=f"cannot read Procfile {re.escape(str(path))}: .*--procfile"):
        read_procfile(path)


def test_an_explicit_procfile_must_exist(tmp_path):
    missing = tmp_path / "Procfile.dev"
    with pytest.raises(ProcfileError, match=f"Procfile {missing} not found; pass --procfile"):
        find_procfile(missing)
    with pytest.raises(ProcfileError, match="not found"):
        find_procfile(tmp_path)  # a directory is not a Procfile


def test_the_procfile_in_the_current_directory_wins_over_the_projects(tmp_path):
    (tmp_path / "Procfile").write_text("web: true\n")
    assert find_procfile(cwd=tmp_path) == tmp_path / "Procfile"
    assert find_procfile(cwd=tmp_path / "elsewhere") == PROJECT_PROCFILE


def test_without_any_procfile_the_error_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(dev, "__file__", str(tmp_path / "pkg" / "dev.py"))
    with pytest.raises(ProcfileError) as raised:
        find_procfile(cwd=tmp_path / "here")
    assert f"{tmp_path / 'here' / 'Procfile'} or {tmp_path / 'Procfile'}" in str(raised.value)
    assert "--procfile PATH" in str(raised.value)


ENTRIES = [ProcessType(n, "true") for n in ("release", "worker", "heavy", "background", "scheduler")]


def _names(chosen: tuple[ProcessType | None, list[ProcessType]]) -> tuple[str | None, list[str]]:
    release, others = chosen
    return (release.name if release else None, [e.name for e in others])


def test_release_runs_first_and_only_and_skip_choose_the_others():
    assert _names(select_processes(ENTRIES)) == (RELEASE, ["worker", "heavy", "background", "scheduler"])
    assert _names(select_processes(ENTRIES, only=["worker,scheduler"])) == (RELEASE, ["worker", "scheduler"])
    assert _names(select_processes(ENTRIES, only=["worker", " heavy "])) == (RELEASE, ["worker", "heavy"])
    assert _names(select_processes(ENTRIES, skip=["heavy"])) == (RELEASE, ["worker", "background", "scheduler"])
    assert _names(select_processes(ENTRIES, skip=["release,heavy"])) == (None, ["worker", "background", "scheduler"])
    assert _names(select_processes(ENTRIES, only=["worker,heavy"], skip=["heavy"])) == (RELEASE, ["worker"])
    assert _names(select_processes(ENTRIES, only=["release"])) == (RELEASE, [])
    assert _names(select_processes(ENTRIES[1:2])) == (None, ["worker"])


def test_unknown_names_and_an_empty_choice_are_refused():
    with pytest.raises(ProcfileError, match="--only names 'wroker', not in the Procfile; choose among release, worker"):
        select_processes(ENTRIES, only=["wroker"])
    with pytest.raises(ProcfileError, match="--skip names 'x', 'y'"):
        select_processes(ENTRIES, skip=["x,y"])
    with pytest.raises(ProcfileError, match="leave no process to start"):
        select_processes(ENTRIES, skip=["worker,heavy,background,scheduler"])


@pytest.mark.parametrize(
    ("command", "script"),
    [
        ("python -m scheduler run", "exec python -m scheduler run"),
        ("env A=b dramatiq jobs.app --queues heavy", "exec env A=b dramatiq jobs.app --queues heavy"),
        ("serve --name 'a b' > log.txt", "exec serve --name 'a b' > log.txt"),
        ("migrate && serve", "migrate && serve"),
        ("a; b", "a; b"),
        ("a | b", "a | b"),
        ("serve &", "serve &"),
        ("echo $(date)", "echo $(date)"),
        ("A=b serve", "A=b serve"),
    ],
)
def test_a_simple_command_replaces_its_shell_and_a_compound_one_keeps_it(command, script):
    assert shell_command(command) == script


def test_processes_find_this_interpreters_executables_and_the_real_broker(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("JOBS_BROKER", "stub")
    env = dev._environment("unix:///tmp/r.sock?db=0", tmp_path)
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin", "/bin"]
    assert "JOBS_BROKER" not in env
    assert env["REDIS_URL"] == "unix:///tmp/r.sock?db=0"
    assert env["JOBS_DATA_DIR"] == str(tmp_path)
    assert env["PYTHONUNBUFFERED"] == "1"


def test_prefixes_are_aligned(capsys):
    output = Output(["release", "background"])
    output.line("release", "migrated")
    output.system("started")
    assert capsys.readouterr().out.splitlines() == ["release    | migrated", "system     | started"]


def test_the_command_reports_a_missing_procfile(tmp_path):
    missing = tmp_path / "Procfile"
    result = CliRunner().invoke(main, ["dev", "--procfile", str(missing)])
    assert result.exit_code == 1
    assert f"Error: Procfile {missing} not found; pass --procfile" in result.output


def test_a_group_of_zombies_has_stopped():
    # Given a process group whose only member has exited but is not reaped yet
    zombie = subprocess.Popen(["true"], start_new_session=True)
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # waits for its exit, leaves it a zombie
        os.killpg(zombie.pid, 0)  # the kernel still counts it as a member

        # Then it does not count as running, while this test's own group does
        assert not dev._runs_in_group(zombie.pid)
        assert dev._runs_in_group(os.getpgrp())
    finally:
        zombie.wait()
