"""Helpers for tests and benchmarks: N gloo ranks in local processes, TE stand-ins."""
