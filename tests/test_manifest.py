"""Manifest paths: every image and mask path is the one Path.resolve gives, whatever links and '..' the rows hold."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from store.errors import ManifestError
from store.manifest import COLUMNS, read_manifest


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)
    return path


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({"id": f"p{i}", "source_id": "s", "view": "", "laterality": "", "x0": 0, "y0": 0, "x1": 8,
                        "y1": 8, "label": 0, "concepts": "", "split": "train", "masks": "", "attributes": "{}",
                        **row})
    return path


def test_paths_equal_path_resolve_through_links_and_parent_steps(tmp_path):
    data = tmp_path / "data"
    _png(data / "images" / "a.png")
    _png(data / "images" / "sub" / "b.png")
    _png(tmp_path / "elsewhere" / "c.png")
    _png(tmp_path / "elsewhere" / "m" / "mass.png")
    os.symlink(tmp_path / "elsewhere", data / "linked")  # a linked folder
    os.symlink(data / "images" / "a.png", data / "images" / "alias.png")  # a linked file
    listing = data / "lists"
    listing.mkdir()
    rels = ["../images/a.png", "../images/sub/b.png", "../images/sub/../a.png", "../linked/c.png",
            "../linked/../data/images/a.png", "../images/alias.png", str(tmp_path / "elsewhere" / "c.png"),
            "./../images/./sub/b.png", "../images/a.png"]
    manifest = _write(listing / "manifest.csv",
                      [{"image": rel, "masks": "mass=../linked/m/mass.png" if i % 2 else ""}
                       for i, rel in enumerate(rels)])
    records = read_manifest(manifest).records
    for rel, r in zip(rels, records):
        expected = (listing / rel).resolve()
        # a linked file is kept as its link (read through it); everything above it is resolved as Path.resolve does
        assert r.image == (expected if not rel.endswith("alias.png") else (listing / rel).parent.resolve() / "alias.png")
        assert r.image.read_bytes() == expected.read_bytes()
    assert records[3].image == tmp_path.resolve() / "elsewhere" / "c.png"  # through the link, not beside it
    assert records[4].image == (data / "images" / "a.png").resolve()  # '..' after a link leaves the link's target
    assert records[1].masks["mass"] == (tmp_path / "elsewhere" / "m" / "mass.png").resolve()


def test_a_missing_file_names_its_row(tmp_path):
    _png(tmp_path / "images" / "a.png")
    manifest = _write(tmp_path / "manifest.csv", [{"image": "images/a.png"}, {"image": "images/gone/b.png"}])
    with pytest.raises(ManifestError, match=r"row 3 \(id 'p1'\): missing file .*gone/b\.png"):
        read_manifest(manifest)
    assert len(read_manifest(manifest, check_files=False)) == 2
