"""The decode benchmark runs end to end at a tiny size, and reports the cache's worst case beside its best."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_decode.py"


def test_reports_best_worst_and_mean_cache_ratios(tmp_path):
    out = tmp_path / "decode.json"
    argv = ["--contexts", "64", "--block-size", "16", "--steps", "2", "--rounds", "1", "--settle", "0", "--out", out]
    subprocess.run([sys.executable, SCRIPT, *map(str, argv)], check=True, capture_output=True, timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    # At a multiple of b the cache holds only pooled tokens; b - 1 positions later, b - 1 raw ones too.
    assert row["ratio_worst"] < row["ratio_mean"] < row["ratio_best"]
    assert row["ratio_best"] == pytest.approx(row["dynamic_cache_bytes"] / row["global_cache_bytes"], rel=0.2)
