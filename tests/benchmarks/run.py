"""`make bench`: run every tests/benchmarks/bench_*.py, print each figure next to its goal, write results.json.

Each module exposes `run(settings) -> list[Figure]`; a Figure is a dict:
    {"name": "extract/throughput_ratio", "value": 0.94, "unit": "×", "goal": ">= 0.9",
     "ok": True, "baseline": {"name": "forward-only", "value": 512.0, "unit": "img/s"}, "note": "…"}
`goal` is text (None when there is no goal) and `ok` is None when there is no goal to meet.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from store.settings import load_settings  # noqa: E402


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str]) -> int:
    only = set(argv)
    settings = load_settings().ensure()
    out = settings.bench_dir
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()}, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "figures": [], "errors": []}
    failed = 0
    for path in sorted(HERE.glob("bench_*.py")):
        area = path.stem.removeprefix("bench_")
        if only and area not in only:
            continue
        print(f"\n== {area}", flush=True)
        try:
            figures = _load(path).run(settings)
        except Exception:
            traceback.print_exc()
            results["errors"].append({"area": area, "error": traceback.format_exc(limit=3)})
            failed += 1
            continue
        for f in figures:
            f.setdefault("area", area)
            mark = {True: "ok  ", False: "MISS", None: "    "}[f.get("ok")]
            base = f.get("baseline")
            base_txt = f"  (baseline {base['name']}: {_fmt(base['value'])} {base.get('unit', '')})" if base else ""
            goal = f"  goal {f['goal']}" if f.get("goal") else ""
            print(f"  {mark} {f['name']:<48} {_fmt(f['value']):>10} {f.get('unit', ''):<6}{goal}{base_txt}", flush=True)
            results["figures"].append(f)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
