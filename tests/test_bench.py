"""bench/generation.py runs end to end on the tiny recipe (its numbers are not asserted: no timing
asserts in tests; the README carries the measured ratios)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_generation_bench_reports_both_shapes(tiny_model, capsys):
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "bench" / "generation.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is built
    spec.loader.exec_module(bench)
    text = bench.main(bench.GenBenchArgs(recipe="recipes/tiny.yaml", rounds=1))
    lines = text.splitlines()
    assert lines[0].startswith("generation on tiny")
    assert [line.split(":")[0] for line in lines[2:]] == ["train", "eval"]
    assert all(line.rstrip().endswith("x") for line in lines[2:])
