"""Typed configuration of `bertforge benchmark` (benchmarking.py runs a benchmarks.yml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bertforge.config.core import RunConfig, Section, opt


@dataclass
class BenchmarkSection(Section):
    """Which entries of which benchmarks.yml run, and where the results go."""

    spec: str = opt("benchmarks/benchmarks.yml", "the benchmarks.yml", metavar="PATH")
    benchmark: list[str] = opt([], "entry names (repeatable; default: every entry)",
                               metavar="NAME")
    output: str = opt("benchmark-results.json", "results as JSON", metavar="PATH")


@dataclass
class BenchmarkConfig(RunConfig):
    """`bertforge benchmark`."""

    run: BenchmarkSection = field(default_factory=BenchmarkSection)
