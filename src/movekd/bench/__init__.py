"""Benchmarks: functions that measure and return figures (the CLI prints them). Never timed asserts."""

from movekd.bench.mole import run_mole_bench

__all__ = ["run_mole_bench"]
