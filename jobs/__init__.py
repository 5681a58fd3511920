"""Broker set-up, actors (the granular tasks), executors and the command line."""
