"""``python -m jobs``: the command line. In a shell, ``jobs`` is a builtin that wins over the installed
``jobs`` script, so this (or the ``cloud-jobs`` script) is the reliable way to call it."""

from .cli import main

main(prog_name="jobs")
