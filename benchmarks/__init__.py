"""Benchmarks and the shared instruments of the throttle's chaos test: an audited workload and an
auditor that knows nothing of the throttle's own data."""
