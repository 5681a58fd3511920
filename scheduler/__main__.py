"""``python -m scheduler``: run the scheduler, or look at it."""

from .cli import main

main(prog_name="python -m scheduler")
