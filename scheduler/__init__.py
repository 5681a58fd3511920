"""Periodic background jobs: periodiq's ``cron(...)`` declarations sent by one leader at a time,
de-duplicated while queued or running, on the ``background`` queue."""
