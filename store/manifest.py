"""Patch-dataset manifests: one CSV row per patch, paths relative to the manifest's directory.

    >>> from store.manifest import read_manifest
    >>> m = read_manifest("workspace/data/demo/manifest.csv")   # ManifestError names the row and file that is wrong
    >>> m.sha256, len(m), m.split("train")[0].image              # absolute Path of the patch PNG

Columns (docs/DATA.md has the full description):
    id            stable patch id (unique)
    source_id     pseudonymous id of the source mammogram (sources.csv has one row per source)
    view          CC / MLO / ''
    laterality    L / R / ''
    x0,y0,x1,y1   the patch box, pixels of the oriented display mammogram (mammograms/<source_id>.png)
    label         1 = lesion present, 0 = not (the classifier's target)
    concepts      ';'-joined concept ids present in the patch (mass;spiculated_margin;skin)
    split         train / val / test, by source image (never by patch)
    image         relative path of the patch image (8- or 16-bit grayscale PNG/TIFF)
    masks         ';'-joined concept=relative/path.png (binary masks, the patch's size)
    attributes    JSON object of per-patch concept attributes (shape, margin, size_mm, contrast, …)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError

__all__ = ["PatchRecord", "Manifest", "read_manifest", "write_manifest", "file_sha256", "COLUMNS", "SPLITS"]

COLUMNS = ("id", "source_id", "view", "laterality", "x0", "y0", "x1", "y1", "label", "concepts", "split", "image",
           "masks", "attributes")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PatchRecord:
    id: str
    source_id: str
    view: str
    laterality: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 on the display mammogram
    label: int
    concepts: tuple[str, ...]
    split: str
    image: Path  # absolute
    masks: dict[str, Path] = field(default_factory=dict)  # concept → absolute mask path
    attributes: dict = field(default_factory=dict)

    def row(self, root: Path) -> dict[str, str]:
        rel = lambda p: Path(p).resolve().relative_to(root.resolve()).as_posix()  # noqa: E731
        return {
            "id": self.id, "source_id": self.source_id, "view": self.view, "laterality": self.laterality,
            "x0": str(self.box[0]), "y0": str(self.box[1]), "x1": str(self.box[2]), "y1": str(self.box[3]),
            "label": str(int(self.label)), "concepts": ";".join(self.concepts), "split": self.split,
            "image": rel(self.image), "masks": ";".join(f"{c}={rel(p)}" for c, p in sorted(self.masks.items())),
            "attributes": json.dumps(self.attributes, sort_keys=True, separators=(",", ":")),
        }


@dataclass
class Manifest:
    path: Path
    records: list[PatchRecord]
    sha256: str

    @property
    def root(self) -> Path:
        return self.path.parent

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> list[PatchRecord]:
        return [r for r in self.records if r.split == name]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def by_id(self) -> dict[str, PatchRecord]:
        return {r.id: r for r in self.records}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Resolver:
    """root / relative path → the absolute path Path.resolve gives (symlinks and '..' resolved), one folder at a time
    with each folder resolved once: Path.resolve makes a system call per component of every path, which made reading
    a manifest of a few thousand rows cost as much as extracting a few hundred patches. The file name itself is
    appended unresolved (a symlinked file is read through its link either way)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.folders: dict[str, Path] = {}

    def _folder(self, folder: str) -> Path:
        known = self.folders.get(folder)
        if known is None:
            parent, sep, last = folder.rpartition("/")
            base = self._folder(parent) if sep else self.root
            here = base / last
            # a resolved folder joined with a plain name is resolved unless that name is a link (or '..')
            known = self.folders[folder] = here.resolve() if last in ("..", ".") or here.is_symlink() else here
        return known

    def __call__(self, rel: str) -> Path:
        folder, sep, name = rel.rpartition("/")
        if os.path.isabs(rel) or name in ("", ".", ".."):
            return (self.root / rel).resolve()
        return (self._folder(folder) if sep else self.root) / name


def _parse_row(i: int, row: dict, resolve: _Resolver, path: Path, check_files: bool) -> PatchRecord:
    where = f"{path}: row {i + 2} (id {row.get('id')!r})"
    try:
        label = int(row["label"])
        box = tuple(int(float(row[k])) for k in ("x0", "y0", "x1", "y1"))
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where}: bad number in label or box ({e})") from None
    if label not in (0, 1):
        raise ManifestError(f"{where}: unknown label {row['label']!r} (expected 0 or 1)")
    if row["split"] not in SPLITS:
        raise ManifestError(f"{where}: unknown split {row['split']!r} (expected one of {', '.join(SPLITS)})")
    if not row["image"]:
        raise ManifestError(f"{where}: empty image path")
    image = resolve(row["image"])
    masks: dict[str, Path] = {}
    for item in filter(None, (row.get("masks") or "").split(";")):
        concept, _, rel = item.partition("=")
        if not rel:
            raise ManifestError(f"{where}: mask entry {item!r} is not concept=path")
        masks[concept] = resolve(rel)
    if check_files:
        for p in (image, *masks.values()):
            if not p.is_file():
                raise ManifestError(f"{where}: missing file {p}")
    try:
        attributes = json.loads(row.get("attributes") or "{}")
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: attributes are not JSON ({e})") from None
    return PatchRecord(
        id=row["id"], source_id=row["source_id"], view=row.get("view", ""), laterality=row.get("laterality", ""),
        box=box, label=label, concepts=tuple(filter(None, (row.get("concepts") or "").split(";"))),
        split=row["split"], image=image, masks=masks, attributes=attributes,
    )


def read_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate a manifest. Raises ManifestError naming the file, the row and what is wrong."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "source_id", "label", "split", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        resolve = _Resolver(path.parent)
        records = [_parse_row(i, row, resolve, path, check_files) for i, row in enumerate(reader)]
    if not records:
        raise ManifestError(f"{path}: no rows")
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ManifestError(f"{path}: duplicate id {r.id!r}")
        seen.add(r.id)
    return Manifest(path=path, records=records, sha256=file_sha256(path))


def write_manifest(path: str | Path, records: list[PatchRecord]) -> str:
    """Write records (sorted as given) to CSV with '\\n' line ends; returns the file's sha256."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow(r.row(path.parent))
    tmp.replace(path)
    return file_sha256(path)
