"""Demo dataset build: a fresh build of the default dataset (in a temporary workspace, the real one is untouched).

    >>> from tests.benchmarks.bench_demo import run; run(load_settings())   # list of figures (see run.py)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from store.settings import load_settings
from training.demo import build_demo


def _size_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(settings) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        scratch = load_settings(Path(tmp) / "ws", env={}).ensure()
        t0 = time.perf_counter()
        report = build_demo(scratch, force=True)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = build_demo(scratch)
        reuse_seconds = time.perf_counter() - t1
        size_mb = _size_bytes(report.path) / 2**20
    positives = sum(c["1"] for c in report.counts.values()) / max(report.patches, 1)
    return [
        {"name": "demo/build_seconds", "value": round(seconds, 2), "unit": "s", "goal": "<= 60",
         "ok": seconds <= 60, "note": f"{report.patches} patches from {report.sources} mammograms"},
        {"name": "demo/reuse_seconds", "value": round(reuse_seconds, 3), "unit": "s", "goal": "<= 2",
         "ok": again.reused and reuse_seconds <= 2, "note": "second call: same parameters and sources"},
        {"name": "demo/patches", "value": report.patches, "unit": "", "goal": "2500..4000",
         "ok": 2500 <= report.patches <= 4000},
        {"name": "demo/positive_fraction", "value": round(positives, 3), "unit": "", "goal": "0.40..0.50",
         "ok": 0.40 <= positives <= 0.50},
        {"name": "demo/size_mb", "value": round(size_mb, 1), "unit": "MiB", "goal": None, "ok": None},
    ]
