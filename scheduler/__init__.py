"""Periodic background jobs, run by periodiq (``periodiq scheduler.app``) on the background queue."""
