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


@pytest.mark.slow
def test_gpu_bench_dry_run_reports_both_sides_and_the_speedups():
    """bench/gpu_step.py's plumbing on the CPU (tiny shapes): each side in its own process, the
    repo side's shared-prefix loss on every micro-batch, the table, then the two speedup lines."""
    import re
    import subprocess

    proc = subprocess.run([sys.executable, "bench/gpu_step.py", "--device", "cpu", "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu_step ") and "bare random-init qwen2.5-0.5b-instruct.json (tiny)" in lines[0]
    table = lines[lines.index(next(line for line in lines if line.startswith("side "))):]
    assert re.fullmatch(r"side +step s +generation s +loss s +peak RSS GB +settings", table[0])
    number = r" +\d+\.\d\d"
    assert re.match(rf"repo{number * 4}  SharedPrefixGRPOTrainer, loss micro-batch 2 x 2, checkpointing False; "
                    r"shared-prefix loss on every micro-batch$", table[1]), table[1]
    assert re.match(rf"stock{number * 4}  GRPOTrainer, loss micro-batch 2 x 2, checkpointing True$", table[2])
    assert re.fullmatch(r"gpu loss speedup vs stock GRPOTrainer: \d+\.\d\dx", lines[-2])
    assert re.fullmatch(r"gpu step speedup vs stock GRPOTrainer: \d+\.\d\dx", lines[-1])


@pytest.mark.slow
def test_gpu_bench_attention_mode_times_each_kernel_and_layout():
    import subprocess

    proc = subprocess.run([sys.executable, "bench/gpu_step.py", "--device", "cpu", "--tiny", "--repeats", "1",
                           "--attention", "sdpa,eager,flex_attention"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split()[:2] for line in proc.stdout.splitlines()[3:-1]]
    # flex attention has no backward on a CPU: its row says why instead of a time
    assert rows == [["sdpa", "packed"], ["sdpa", "cached"], ["eager", "packed"], ["eager", "cached"],
                    ["flex_attention", "packed"]], proc.stdout
    assert "_scaled_dot_product" in proc.stdout  # the SDPA kernel that ran is named
    assert proc.stdout.splitlines()[-1].startswith("fastest: ")


@pytest.mark.slow
def test_validation_bench_times_trl_and_both_art_paths(tiny_model, capsys):
    """bench/validation.py on the tiny recipe: each path generates the val titles and is reported
    against TRL's (the numbers themselves are the bench's to print, not the test's to assert)."""
    pytest.importorskip("art")
    spec = importlib.util.spec_from_file_location("bench_validation", ROOT / "bench" / "validation.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    best = bench.main(bench.ValBenchArgs(recipe="recipes/tiny.yaml", rounds=1))
    assert list(best) == ["trl", "art", "art, one request at a time"] and all(t > 0 for t in best.values())
    out = capsys.readouterr().out
    assert "greedy validation of 4 val stories" in out and out.count("x TRL") == 3


@pytest.mark.slow
def test_evaluation_bench_times_both_evaluations_and_curve_points(tiny_model, capsys):
    """bench/evaluation.py on the tiny recipe: the old evaluation shape (fewer stories, two passes)
    against the recipe's (one prefill), and both curve-point shapes, each timed once."""
    spec = importlib.util.spec_from_file_location("bench_evaluation", ROOT / "bench" / "evaluation.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    best = bench.main(bench.EvalBenchArgs(recipe="recipes/tiny.yaml", before_stories=2, before_samples=2, rounds=1))
    out = capsys.readouterr().out
    assert list(best) == ["before: 2 x (1 + 2), two passes", "now: 4 x (1 + 1), one prefill",
                          "before: 2 stories", "now: 4 stories"]
    assert all(t > 0 for t in best.values()) and out.count("x before") == 2
