"""Dissection speed: IoU of a drawn region with every unit, vectorized vs the per-unit Python loop, in the same run.

    >>> from tests.benchmarks.bench_dissection import run
    >>> run(load_settings())     # [{"name": "dissection/p50_ms", ...}, {"name": "dissection/speedup", ...}, ...]

Setting of the published system: 512 units, 32×32 maps, a 512×512 patch. The maps are smooth random activation
fields (ReLU of Gaussian-blurred noise, stored as float16 like the store), thresholds their per-unit 0.99 quantile
over 32 such images, and the regions star-shaped polygons of 2–25 % of the patch drawn at random places — one new
image and region per call, so nothing is cached between calls. The reference (explain.dissection.reference_unit_iou)
upsamples each unit with torch.nn.functional.interpolate and counts, unit by unit. Every call's result is checked
equal to the reference's. When the demo store exists, the same comparison on its deepest layer is reported too
(no goal: the demo patches are 64×64).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

N_UNITS, MAP, PATCH = 512, 32, 512
N_FAST, N_REF = 40, 4


def _fields(rng, n_images: int) -> np.ndarray:
    """float32 (image, unit, y, x): smooth nonnegative activation fields, rounded to float16 as stored."""
    import torch

    x = torch.from_numpy(rng.standard_normal((n_images * N_UNITS, 1, MAP, MAP)).astype(np.float32))
    k = torch.exp(-torch.arange(-4, 5, dtype=torch.float32) ** 2 / 4)
    k = k / k.sum()
    x = torch.nn.functional.conv2d(x, k[None, None, :, None], padding=(4, 0))
    x = torch.nn.functional.conv2d(x, k[None, None, None, :], padding=(0, 4))
    x = torch.relu(x * 3).reshape(n_images, N_UNITS, MAP, MAP)
    return x.numpy().astype(np.float16).astype(np.float32)


def _region(rng) -> np.ndarray:
    from explain.regions import Polygon, rasterize_regions

    n = int(rng.integers(6, 40))
    radius = rng.uniform(0.08, 0.28) * PATCH
    c = rng.uniform(radius, PATCH - radius, 2)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.6, 1.0, n)
    return rasterize_regions([Polygon(np.c_[c[0] + r * np.cos(ang), c[1] + r * np.sin(ang)])], (PATCH, PATCH))


def _time(fn, *args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _figures_synthetic() -> list[dict]:
    import torch

    from explain.dissection import UpsampleGrid, iou_from_counts, mask_counts, reference_unit_iou, region_iou

    torch.set_num_threads(1)  # the reference and the fast path on the same single core
    rng = np.random.default_rng(0)
    data = _fields(rng, 32)
    thresholds = np.quantile(data.transpose(1, 0, 2, 3).reshape(N_UNITS, -1), 0.99, axis=1,
                             method="lower").astype(np.float32)
    grid = UpsampleGrid.build((MAP, MAP), (PATCH, PATCH))
    fast_t, ref_t, mismatches, regions = [], [], 0, []
    for i in range(N_FAST):
        region = _region(rng)
        maps = data[i % len(data)]
        t, fast = _time(lambda: region_iou(maps, thresholds, region, grid=grid))
        fast_t.append(t)
        regions.append((maps, region, fast))
    for maps, region, fast in regions[:N_REF]:
        t, ref = _time(reference_unit_iou, maps, thresholds, region)
        ref_t.append(t)
        mismatches += int((ref != fast).sum())
    # further drawings on an image already seen: its unit areas are known, only touched windows are examined
    warm_t = []
    for i, (maps, _, _) in enumerate(regions[:N_FAST // 2]):
        area, _ = mask_counts(maps, thresholds, size=(PATCH, PATCH), grid=grid)
        region = _region(rng)
        t, (_, inter) = _time(lambda: mask_counts(maps, thresholds, region[None], grid=grid, known_area=area))
        warm_t.append(t)
        if i < N_REF:
            n = int(region.sum())
            warm = iou_from_counts(area, inter[0], n)
            mismatches += int((reference_unit_iou(maps, thresholds, region) != warm).sum())
    p50 = statistics.median(fast_t) * 1000
    ref50 = statistics.median(ref_t) * 1000
    speedup = ref50 / p50
    labeled = float(np.mean([(f > 0.2).sum() for _, _, f in regions]))
    note = (f"{N_UNITS} units, {MAP}×{MAP} maps, {PATCH}×{PATCH} patch, 1 thread, {N_FAST} calls (reference "
            f"{N_REF}); units differing from the reference: {mismatches}; mean units with IoU > 0.2: {labeled:.1f}")
    return [
        {"name": "dissection/p50_ms", "value": p50, "unit": "ms", "goal": "<= 20", "ok": p50 <= 20,
         "baseline": {"name": "per-unit reference p50", "value": ref50, "unit": "ms"}, "note": note},
        {"name": "dissection/p90_ms", "value": float(np.percentile(fast_t, 90) * 1000), "unit": "ms", "goal": None,
         "ok": None, "note": note},
        {"name": "dissection/speedup", "value": speedup, "unit": "×", "goal": ">= 25", "ok": speedup >= 25,
         "baseline": {"name": "per-unit reference p50", "value": ref50, "unit": "ms"}, "note": note},
        {"name": "dissection/warm_p50_ms", "value": statistics.median(warm_t) * 1000, "unit": "ms", "goal": None,
         "ok": None, "note": "another drawing on an image whose unit areas are cached (UnitIoU keeps the last 32)"},
        {"name": "dissection/reference_mismatches", "value": mismatches, "unit": "units", "goal": "== 0",
         "ok": mismatches == 0, "note": f"exact equality of the IoU arrays, fast (cold and warm) vs reference, "
                                          f"{2 * N_REF} calls × {N_UNITS} units"},
    ]


def _figures_demo(settings) -> list[dict]:
    from explain.dissection import UnitIoU, reference_unit_iou
    from store.activations import open_store, store_exists

    url = settings.store_url("demo")
    if not store_exists(url):
        return [{"name": "dissection/demo_store", "value": "missing", "unit": "", "goal": None, "ok": None,
                 "note": f"no demo store at {url}: run `make extract` for figures on real activations"}]
    store = open_store(url)
    layer = store.layers[-1]
    dissect = UnitIoU(store, layer)
    rng = np.random.default_rng(1)
    h, w = dissect.size
    fast_t, ref_t, mismatches = [], [], 0
    for _ in range(20):
        i = int(rng.integers(store.n_images))
        region = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        region[y0:y0 + h // 3, x0:x0 + w // 3] = True
        t, fast = _time(dissect.compute, i, region)
        fast_t.append(t)
        t, ref = _time(reference_unit_iou, store.maps(layer, i), dissect.thresholds, region)
        ref_t.append(t)
        mismatches += int((ref != fast).sum())
    p50, ref50 = statistics.median(fast_t) * 1000, statistics.median(ref_t) * 1000
    return [{"name": "dissection/demo_p50_ms", "value": p50, "unit": "ms", "goal": None, "ok": None,
             "baseline": {"name": "per-unit reference p50", "value": ref50, "unit": "ms"},
             "note": f"demo store layer {layer} ({dissect.n_units} units, maps {store.layer_shape(layer)[1:]}, "
                     f"patch {h}×{w}), store read included; units differing from the reference: {mismatches}"}]


def run(settings) -> list[dict]:
    import torch

    threads = torch.get_num_threads()
    try:
        return _figures_synthetic() + _figures_demo(settings)
    finally:
        torch.set_num_threads(threads)  # the areas benched after this one get torch's threads back


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from store.settings import load_settings

    for f in run(load_settings()):
        print(f)
