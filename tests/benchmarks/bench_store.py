"""Activation store: extraction throughput against forward passes alone, bytes on disk, map reads, peak memory.

    >>> from tests.benchmarks.bench_store import run
    >>> run(load_settings())   # [{"name": "store/extract_throughput_ratio", ...}, ...]

Uses the demo workspace's registered model and demo dataset when they exist (`make extract` has run); otherwise a
small built-in VGG on synthetic 64×64 patches. Every figure's note says which.
Baseline for extraction (the goal): the same model, the same batch size, forward passes over the same preprocessed
patches held in memory, the model called on each batch in turn as a user would call it (torch's default intra-op
threads) — what any extraction must pay; ours adds reading the patches, hooks, float16 maps, compression, checksums,
writing, and the quantiles/top-k. Extraction itself runs one single-threaded forward worker per core (whole batches
side by side, store/extract.py), which computes a small model faster than intra-op threads do; so that this gain
cannot hide the cost of storing, the same forward passes scheduled that way are a second baseline
(`store/extract_over_worker_forward`, no goal). A third figure (`store/extract_unstored_ratio`, no goal) runs the
same extraction with storing switched off by the bench (`_NothingStored`): the most any storing could reach.
Throughput is measured over N_THROUGHPUT images (up to the whole demo dataset): a few hundred images take well under
a second to forward, so fixed costs (Lightning's trainer, creating the store's arrays, finalizing) would dominate;
they are reported on their own (`store/extract_fixed_s`).
A second ratio uses a model of the published system's scale (VGG16-BN widths, 224×224 inputs, a few images): the
demo VGG is so small that writing its 112 KiB of maps per image costs about as much as computing them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = "models:/conceptlens-demo@champion"
N_SMALL = 64  # the RSS comparison runs N and 4N images
N_THROUGHPUT = 2048  # images for the throughput ratio (fewer when the dataset has fewer)
BATCH = 32
HEAVY = {"images": 32, "batch": 16, "size": 224}  # the published-scale model: VGG16-BN widths on 224×224


def _builtin_model():
    import torch

    from training.zoo import VGGConfig, default_layers, vgg_bn

    torch.manual_seed(0)
    net = vgg_bn(VGGConfig(widths=(16, 32, 64), convs=1)).eval()
    meta = {"input_size": [64, 64], "transform": {"mean": 0.5, "std": 0.25},
            "layers": default_layers(net, (64, 64), count=3), "classes": ["normal", "lesion"],
            "model_uri": "builtin:vgg_bn(16,32,64)", "run_id": None, "name": "builtin", "version": "0"}
    return net, meta


def _heavy_model():
    """VGG16-BN's widths and convs (64 … 512, 2-2-3-3-3) on 224×224 single-channel input, random weights."""
    import torch

    from training.zoo import VGGConfig, default_layers, vgg_bn

    torch.manual_seed(0)
    net = vgg_bn(VGGConfig(widths=(64, 128, 256, 512, 512), convs=(2, 2, 3, 3, 3))).eval()
    size = (HEAVY["size"], HEAVY["size"])
    meta = {"input_size": list(size), "transform": {"mean": 0.5, "std": 0.25},
            "layers": default_layers(net, size, count=3), "classes": ["normal", "lesion"],
            "model_uri": "builtin:vgg16_bn-widths", "run_id": None, "name": "builtin-vgg16", "version": "0"}
    return net, meta


def _synthetic_manifest(root: Path, n: int, size: int) -> Path:
    """n smooth random uint8 patches (blurred noise with a bright blob in half of them), PNG, with a manifest."""
    from PIL import Image, ImageFilter

    from store.manifest import PatchRecord, write_manifest

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        noise = Image.fromarray(rng.integers(60, 200, (size, size), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        patch = np.asarray(noise).copy()
        if i % 2:
            yy, xx = np.mgrid[:size, :size]
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            patch[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 8) ** 2] = 230
        path = root / "images" / f"s{i:05d}.png"
        Image.fromarray(patch).save(path)
        records.append(PatchRecord(id=f"s{i:05d}", source_id="synthetic", view="", laterality="",
                                   box=(0, 0, size, size), label=i % 2, concepts=(), split="train", image=path))
    write_manifest(root / "manifest.csv", records)
    return root / "manifest.csv"


def _sub_manifest(src: Path, dst: Path, n: int) -> Path:
    """The first n rows of a manifest, written elsewhere with paths made relative to the new place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for _, r in zip(range(n), reader)]
        fields = reader.fieldnames
    for r in rows:
        r["image"] = os.path.relpath(src.parent / r["image"], dst.parent)
        r["masks"] = ";".join(f"{c}={os.path.relpath(src.parent / p, dst.parent)}" for c, _, p in
                              (m.partition("=") for m in filter(None, (r.get("masks") or "").split(";"))))
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dst


def _source(settings, work: Path):
    """(kind, net, meta, manifest for N_THROUGHPUT images, manifest for 4N images, note)."""
    demo = settings.manifest_path("demo")
    if demo.is_file():
        try:
            from training import load_model

            m = load_model(DEMO_MODEL, settings=settings)
            from store.manifest import read_manifest

            total = len(read_manifest(demo, check_files=False))
            n4 = min(4 * N_SMALL, total - total % 4)
            manifest = _sub_manifest(demo, work / "demo4n" / "manifest.csv", n4)
            many = _sub_manifest(demo, work / "demo_many" / "manifest.csv", min(N_THROUGHPUT, total))
            return "demo", m.module, m.meta, many, manifest, f"demo model {m.meta.get('model_uri')} on demo patches"
        except Exception as e:  # noqa: BLE001 — the bench falls back to the built-in model and says why
            reason = f"demo model unavailable ({type(e).__name__}: {e}); "
    else:
        reason = "no demo dataset; "
    net, meta = _builtin_model()
    many = _synthetic_manifest(work / "synthetic", N_THROUGHPUT, 64)
    manifest = _sub_manifest(many, work / "synthetic4n" / "manifest.csv", 4 * N_SMALL)
    return "builtin", net, meta, many, manifest, reason + "built-in VGG (16,32,64) on synthetic 64×64 patches"


CHILD = r"""
import gc, json, resource, sys, time
sys.path[:0] = [{repo!r}, {bench!r}]
kind, manifest, url, workspace = sys.argv[1:5]
from store.extract import ExtractConfig, extract
if kind == "demo":
    from store.settings import load_settings
    from training import load_model
    m = load_model({model!r}, settings=load_settings(workspace)); net, meta = m.module, m.meta
else:
    from bench_store import _builtin_model
    net, meta = _builtin_model()
import lightning, numba, zarr  # noqa: imports are loaded before the high-water mark below

def status(key):  # kB → MB from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

gc.collect()
try:  # Linux: writing 5 to clear_refs resets the peak, so loading the model (mlflow) does not set it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak, before = (lambda: status("VmHWM")), status("VmRSS")
except OSError:
    peak, before = (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), status("VmRSS")
t = time.perf_counter()
extract(net, meta=meta, manifest=manifest, url=url, config=ExtractConfig(batch_size={batch}, progress_bar=False))
print(json.dumps({{"seconds": time.perf_counter() - t, "rss_before_mb": before, "max_rss_mb": peak()}}))
"""


def _child_extract(kind: str, manifest: Path, url: Path, settings) -> dict:
    code = CHILD.format(repo=str(REPO), bench=str(Path(__file__).parent), model=DEMO_MODEL, batch=BATCH)
    proc = subprocess.run([sys.executable, "-c", code, kind, str(manifest), str(url), str(settings.workspace)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"extraction subprocess failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward_only(net, meta, images: np.ndarray, batch: int = BATCH, repeats: int = 3) -> float:
    """Seconds for forward passes over preprocessed in-memory patches (best of `repeats`), with torch's default
    intra-op threads (one per core)."""
    import torch

    from store.extract import _cores_per_process

    from training.transforms import preprocess

    batches = [preprocess(images[i:i + batch], meta["transform"]) for i in range(0, len(images), batch)]
    best = float("inf")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_cores_per_process(1))  # torch's default; an earlier bench area may have set fewer
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                t = time.perf_counter()
                for x in batches:
                    net(x)
                best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads_before)
    return best


def _forward_workers(net, meta, images: np.ndarray, batch: int = BATCH, repeats: int = 3) -> tuple[float, int]:
    """Seconds for the same forward passes run as extraction runs them on a CPU: one single-threaded worker per core,
    whole batches side by side (best of `repeats`); and the number of workers."""
    import torch

    from store.extract import _cores_per_process
    from training.transforms import preprocess

    workers = _cores_per_process(1)
    batches = [preprocess(images[i:i + batch], meta["transform"]) for i in range(0, len(images), batch)]

    def run(share):
        with torch.inference_mode():
            for x in share:
                net(x)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(repeats):
                t = time.perf_counter()
                list(pool.map(run, [batches[w::workers] for w in range(workers)]))
                best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads_before)
    return best, workers


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _NothingStored:
    """Within `with _NothingStored():` extraction computes every block as usual (reading the patches, forward passes,
    hooks, float16 maps, pooled max/mean) but writes, counts and finalizes nothing except its completion record: the
    most an extraction could reach if storing were free (the bench's ceiling figure, not a mode of the product)."""

    def __enter__(self):
        import store.extract as ex
        from store.activations import ActivationStore

        self.saved = ex._BlockWriter.write, ActivationStore.finalize

        def write(writer, block, data, *, spread=True):
            writer.store.write_many([("progress", block, np.ones(1, np.uint8))])
            with writer._count:
                writer.covered.add(block)
                writer.written += 1

        ex._BlockWriter.write, ActivationStore.finalize = write, lambda store, **kw: None
        return self

    def __exit__(self, *exc):
        import store.extract as ex
        from store.activations import ActivationStore

        ex._BlockWriter.write, ActivationStore.finalize = self.saved


def _throughput(net, meta, manifest, work: Path, tag: str, *, batch: int, rounds: int = 3,
                unstored: bool = False) -> dict:
    """Extraction and forward-only seconds over the same images, best of `rounds` each.

    The measurements are interleaved (each round: forward passes batch after batch, the same passes run by the
    workers, one extraction into a new store), so a change in this shared machine's speed during the run reaches
    every figure alike instead of one of them. The first extraction (of a warm-up round not counted) pays for
    loading compiled kernels and lazy imports."""
    from store.extract import ExtractConfig, extract, load_patch

    size = tuple(meta["input_size"])
    images = np.stack([load_patch(r.image, size) for r in manifest.records])  # (image, y, x)
    config = ExtractConfig(batch_size=batch, progress_bar=False)
    _forward_only(net, meta, images[:batch], batch, repeats=1)  # warm-up
    warm = _sub_manifest(manifest.path, work / f"{tag}-warm" / "manifest.csv", batch)
    extract(net, meta=meta, manifest=warm, url=str(work / f"{tag}-warm.zarr"), config=config)
    extract_s = forward_s = workers_s = unstored_s = float("inf")
    workers, url = 1, None
    for attempt in range(rounds):
        forward_s = min(forward_s, _forward_only(net, meta, images, batch, repeats=1))
        w_s, workers = _forward_workers(net, meta, images, batch, repeats=1)
        workers_s = min(workers_s, w_s)
        url = work / f"{tag}{attempt}.zarr"
        t = time.perf_counter()
        extract(net, meta=meta, manifest=manifest, url=str(url), config=config)
        extract_s = min(extract_s, time.perf_counter() - t)
        if unstored:
            with _NothingStored():
                t = time.perf_counter()
                extract(net, meta=meta, manifest=manifest, url=str(work / f"{tag}{attempt}-unstored.zarr"),
                        config=config)
                unstored_s = min(unstored_s, time.perf_counter() - t)
    n = len(images)
    return {"n": n, "extract_s": extract_s, "forward_s": forward_s, "ratio": forward_s / extract_s, "url": url,
            "workers_s": workers_s, "workers": workers, "unstored_s": unstored_s}


def run(settings) -> list[dict]:
    import torch

    from store.activations import open_store
    from store.manifest import read_manifest

    work = settings.bench_dir / "store"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    kind, net, meta, manifest_many, manifest_4n, note = _source(settings, work)
    import lightning  # noqa: F401 — a one-time import is not throughput

    figures = []
    from store.extract import _cores_per_process

    threads = _cores_per_process(1)  # what _forward_only runs with

    # throughput: extraction (whole run, incl. reading the PNGs, store creation and the quantiles) vs forward passes
    many = read_manifest(manifest_many)
    t = _throughput(net, meta, many, work, "throughput", batch=BATCH, rounds=5, unstored=True)
    ratio, n = t["ratio"], t["n"]
    figures.append({"name": "store/extract_throughput_ratio", "value": ratio, "unit": "×", "goal": ">= 0.9",
                    "ok": ratio >= 0.9, "baseline": {"name": "forward-only", "value": n / t["forward_s"],
                                                     "unit": "img/s"},
                    "note": f"{note}; {n} images, batch {BATCH}, {len(meta['layers'])} layers; baseline: the model "
                            f"called on each batch in turn with torch's {threads} intra-op threads (best of 5); "
                            f"extraction {n / t['extract_s']:.1f} img/s (best of 5) incl. reading the PNGs, store "
                            f"creation and the quantile/top-k pass, with {t['workers']} single-threaded forward "
                            f"workers"})
    # the same forward passes run the way extraction runs them (whole batches side by side): what storing costs
    figures.append({"name": "store/extract_over_worker_forward", "value": t["workers_s"] / t["extract_s"],
                    "unit": "×", "goal": None, "ok": None,
                    "baseline": {"name": f"forward-only, {t['workers']} single-threaded workers",
                                 "value": n / t["workers_s"], "unit": "img/s"},
                    "note": f"{note}; the cost of storing alone: extraction against forward passes scheduled exactly "
                            f"as extraction schedules them ({t['workers']} workers, whole batches side by side, best "
                            f"of 5), {n / t['workers_s']:.1f} img/s; 1.0 would be free storage"})

    # the ceiling: the same extraction with storing switched off (nothing written, counted or finalized)
    ceiling = t["forward_s"] / t["unstored_s"]
    figures.append({"name": "store/extract_unstored_ratio", "value": ceiling, "unit": "×", "goal": None, "ok": None,
                    "baseline": {"name": "forward-only", "value": n / t["forward_s"], "unit": "img/s"},
                    "note": f"{note}; the ceiling of store/extract_throughput_ratio: the same extraction (reading "
                            f"and decoding the PNGs, forward workers, hooks, float16 maps, pooled max/mean, the "
                            f"trainer, creating the store) with its blocks not written, counted or finalized, "
                            f"{n / t['unstored_s']:.1f} img/s (best of 5)"})

    # fixed costs: a one-block extraction (trainer, store creation, finalize) against its forward passes
    one = read_manifest(_sub_manifest(manifest_many, work / "one" / "manifest.csv", BATCH))
    small = _throughput(net, meta, one, work, "fixed", batch=BATCH)
    fixed = small["extract_s"] - small["forward_s"]
    figures.append({"name": "store/extract_fixed_s", "value": fixed, "unit": "s", "goal": None, "ok": None,
                    "note": f"{note}; extraction of {BATCH} images ({small['extract_s']:.3f} s) minus their forward "
                            f"passes: the trainer, creating the store's arrays, finalizing. Over the 4N={4 * N_SMALL} "
                            f"images of older runs of this bench it was a large part of the time"})

    # a model of the published system's scale: the cost of storing maps against the cost of computing them
    heavy_net, heavy_meta = _heavy_model()
    heavy = read_manifest(_synthetic_manifest(work / "heavy", HEAVY["images"], HEAVY["size"]))
    h = _throughput(heavy_net, heavy_meta, heavy, work, "heavy", batch=HEAVY["batch"])
    hs = open_store(str(h["url"]))
    shapes = ", ".join(f"{layer} {'×'.join(map(str, hs.layer_shape(layer)))}" for layer in hs.layers)
    figures.append({"name": "store/extract_throughput_ratio_vgg16", "value": h["ratio"], "unit": "×",
                    "goal": ">= 0.9", "ok": h["ratio"] >= 0.9,
                    "baseline": {"name": "forward-only", "value": h["n"] / h["forward_s"], "unit": "img/s"},
                    "note": f"VGG16-BN widths (64…512, convs 2-2-3-3-3, random weights) on {h['n']} synthetic "
                            f"{HEAVY['size']}×{HEAVY['size']} patches, batch {HEAVY['batch']}, layers {shapes}; "
                            f"extraction {h['n'] / h['extract_s']:.2f} img/s (best of 3), {threads} torch threads "
                            f"for the baseline"})
    figures.append({"name": "store/extract_over_worker_forward_vgg16", "value": h["workers_s"] / h["extract_s"],
                    "unit": "×", "goal": None, "ok": None,
                    "baseline": {"name": f"forward-only, {h['workers']} single-threaded workers",
                                 "value": h["n"] / h["workers_s"], "unit": "img/s"},
                    "note": "the same VGG16-scale extraction against its forward passes scheduled as extraction "
                            "schedules them (best of 3): what storing costs at that scale, without the swings of "
                            "torch's intra-op threads in the goal ratio's baseline"})
    del hs, heavy_net

    # bytes per image per layer
    url = t["url"]
    s = open_store(str(url))
    total_raw = total_stored = 0
    for layer in s.layers:
        u, y, x = s.layer_shape(layer)
        maps = _dir_bytes(url / "layers" / layer / "maps") / n
        stored = _dir_bytes(url / "layers" / layer) / n
        raw = u * y * x * 2
        total_raw, total_stored = total_raw + raw, total_stored + stored
        figures.append({"name": f"store/bytes_per_image/{layer}", "value": stored, "unit": "B", "goal": None,
                        "ok": None, "note": f"{note}; maps {u}×{y}×{x} float16 = {raw} B raw, {maps:.0f} B stored "
                                            f"({maps / raw:.2f}× after blosc-lz4 + crc32c); the value includes the "
                                            f"pooled max/mean and per-layer arrays"})
    figures.append({"name": "store/bytes_per_image/all_layers", "value": total_stored, "unit": "B", "goal": None,
                    "ok": None, "note": f"{note}; {len(s.layers)} layers, {total_raw} B of float16 maps raw "
                                        f"({total_stored / total_raw:.2f}×)"})

    # one image's maps, all units of a layer (the largest), p50 over random images
    layer = max(s.layers, key=lambda name: np.prod(s.layer_shape(name)))
    rng = np.random.default_rng(0)
    times = []
    for i in rng.integers(0, n, 300):
        t0 = time.perf_counter()
        s.maps(layer, int(i))
        times.append(time.perf_counter() - t0)
    p50 = statistics.median(times) * 1e3
    figures.append({"name": "store/read_maps_p50_ms", "value": p50, "unit": "ms", "goal": "<= 5", "ok": p50 <= 5,
                    "note": f"{note}; layer {layer} {s.layer_shape(layer)}, local store, 300 random images, "
                            f"p95 {np.percentile(times, 95) * 1e3:.2f} ms"})

    # peak memory for N and 4N images, each extraction in its own process
    n4 = len(read_manifest(manifest_4n))
    manifest_n = _sub_manifest(manifest_4n, work / "n" / "manifest.csv", n4 // 4)
    small_rss = _child_extract(kind, manifest_n, work / "rss_n.zarr", settings)
    large_rss = _child_extract(kind, manifest_4n, work / "rss_4n.zarr", settings)
    rss_ratio = large_rss["max_rss_mb"] / small_rss["max_rss_mb"]
    figures.append({"name": "store/extract_peak_rss_4n_over_n", "value": rss_ratio, "unit": "×", "goal": "<= 1.10",
                    "ok": rss_ratio <= 1.10, "baseline": {"name": f"peak RSS for N={n4 // 4}",
                                                         "value": small_rss["max_rss_mb"], "unit": "MB"},
                    "note": f"{note}; peak RSS during extraction {large_rss['max_rss_mb']:.0f} MB for 4N={n4} "
                            f"images (the peak is reset after loading the model); "
                            f"{large_rss['max_rss_mb'] - large_rss['rss_before_mb']:.0f} MB (4N) and "
                            f"{small_rss['max_rss_mb'] - small_rss['rss_before_mb']:.0f} MB (N) above the process "
                            f"before extraction"})
    return figures


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from store.settings import load_settings

    for fig in run(load_settings()):
        print(json.dumps(fig, default=float))
