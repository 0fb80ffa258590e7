"""The demo dataset built from the real CBIS-DDSM films: deterministic, split by source image, clean labels, masks
inside their patch and the breast, patches that are crops of the stored mammograms, bad files skipped and reported."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from store.manifest import read_manifest
from store.settings import load_settings
from training.demo import CONCEPTS, DemoConfig, build_demo, default_sources, main
from training.errors import DataError

LESION_BODIES = {"mass", "calcification", "architectural_distortion"}
LESION_CONCEPTS = LESION_BODIES | {"spiculated_margin", "circumscribed_margin"}
SMALL = DemoConfig(variants=1)


def _settings(path: Path):
    return load_settings(path, env={}).ensure()


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root except dataset.json (which records the build time)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "dataset.json"}


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """All 8 films, 2 variants each: every split, both patients, in a few seconds."""
    settings = _settings(tmp_path_factory.mktemp("medium"))
    report = build_demo(settings, config=DemoConfig(variants=2))
    return settings, report, read_manifest(report.manifest)


@pytest.fixture(scope="module")
def originals(real_dicoms):
    """image pseudonym → (path, patient group, display at 1/8, segmentation) of the 8 real films."""
    from store.images import read_image
    from store.segment import segment_breast

    out = {}
    for path, group in default_sources():
        img = read_image(path)
        display = img.display(scale=SMALL.scale)
        out[img.id] = (path, group, display, segment_breast(display, view=img.view))
    return out


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path, real_dicoms):
    sources = real_dicoms[:2]
    a = build_demo(_settings(tmp_path / "a"), config=SMALL, sources=sources)
    b = build_demo(_settings(tmp_path / "b"), config=SMALL, sources=sources[::-1])  # order does not matter
    c = build_demo(_settings(tmp_path / "c"), config=DemoConfig(variants=1, seed=1), sources=sources)
    assert not a.reused and not b.reused
    assert a.manifest_sha256 == b.manifest_sha256 == read_manifest(a.manifest).sha256
    assert _tree_digest(a.path) == _tree_digest(b.path)  # patches, masks, mammograms, sheet: byte-identical
    assert c.manifest_sha256 != a.manifest_sha256
    assert a.patches > 50 and a.counts["train"]["1"] > 0 and a.counts["test"]["0"] > 0


def test_no_source_image_in_two_splits_and_both_patients_held_out(medium, originals):
    settings, report, manifest = medium
    split_of: dict[str, set[str]] = {}
    original_split: dict[str, set[str]] = {}
    for r in manifest.records:
        split_of.setdefault(r.source_id, set()).add(r.split)
        original_split.setdefault(r.source_id.rsplit("-v", 1)[0], set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert all(len(s) == 1 for s in original_split.values()), "variants of one film landed in two splits"
    assert len(original_split) == 8 and len(split_of) == 16
    per_split = {s: {o for o, sp in original_split.items() if s in sp} for s in ("train", "val", "test")}
    assert [len(per_split[s]) for s in ("train", "val", "test")] == [5, 1, 2]
    assert {originals[o][1] for o in per_split["test"]} == {"case-0", "case-1"}  # one film of each patient
    with open(report.path / "sources.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["source_id"]: r["split"] for r in rows} == {k: next(iter(v)) for k, v in split_of.items()}


def test_class_balance_per_split(medium):
    _, report, manifest = medium
    for split in ("train", "val", "test"):
        labels = [r.label for r in manifest.split(split)]
        assert 0.3 <= np.mean(labels) <= 0.7, (split, np.mean(labels))
        assert report.counts[split] == {"0": labels.count(0), "1": labels.count(1)}


def test_labels_are_clean_and_concepts_match_masks(medium):
    _, report, manifest = medium
    for r in manifest.records:
        assert set(r.concepts) == set(r.masks) and set(r.concepts) <= set(CONCEPTS)
        lesions = r.attributes.get("lesions", [])
        if r.label == 1:
            assert LESION_BODIES & set(r.concepts) and lesions
            if not any(a["share_in_patch"] >= 0.4 for a in lesions):  # a big lesion: ≥ 60 of its pixels instead
                body = sum(int((np.array(Image.open(r.masks[c])) > 0).sum()) for c in LESION_BODIES & set(r.masks))
                assert body >= 60, (r.id, lesions)
        else:  # a negative holds no lesion pixel at all, not even a sliver
            assert not (LESION_CONCEPTS & set(r.concepts)) and not lesions
    assert sum(report.concepts[c] > 0 for c in CONCEPTS) == len(CONCEPTS)  # every concept occurs


def test_patches_are_crops_of_the_stored_mammograms(medium):
    _, report, manifest = medium
    rng = np.random.default_rng(0)
    records = [manifest.records[i] for i in rng.choice(len(manifest), 60, replace=False)]
    mammos: dict[str, np.ndarray] = {}
    for r in records:
        if r.source_id not in mammos:
            mammos[r.source_id] = np.array(Image.open(report.path / "mammograms" / f"{r.source_id}.png"))
        m16 = mammos[r.source_id]
        assert m16.dtype == np.uint16
        x0, y0, x1, y1 = r.box
        patch = np.array(Image.open(r.image))
        assert patch.dtype == np.uint8 and patch.shape == (64, 64) == (y1 - y0, x1 - x0)
        assert np.array_equal(patch, ((m16[y0:y1, x0:x1].astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_masks_lie_inside_the_patch_and_the_breast(medium, originals):
    _, _, manifest = medium
    for r in manifest.records[::7]:
        seg = originals[r.source_id.rsplit("-v", 1)[0]][3]
        x0, y0, x1, y1 = r.box
        breast = seg.breast[y0:y1, x0:x1]
        for concept, path in r.masks.items():
            m = np.array(Image.open(path))
            assert m.shape == (64, 64) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
            m = m > 0
            assert m.any(), f"{path}: an empty mask was stored"
            if concept == "background":
                assert not (m & breast).any()
            elif concept != "film_label":
                assert not (m & ~breast).any(), f"{r.id}: {concept} leaves the breast"


def test_inserted_pixels_are_exactly_the_lesion_footprints(originals):
    """On real films through the builder's own path: what changed is the lesions' footprint, inside the allowed
    region (breast, off skin band, pectoral muscle and labels), and every lesion mask pixel changed: brighter, or
    darker in the halo of a circumscribed mass."""
    from training.demo import _allowed_region, _make_mammogram, _Source
    from store.images import read_image

    config = DemoConfig()
    for image_id, (path, group, display, seg) in list(originals.items())[::3]:
        src = _Source(path=path, group=group, sha256="", image=read_image(path), display=display, seg=seg)
        m = _make_mammogram(src, 1, config)
        assert m.lesions
        changed = m.image != display
        footprint = np.zeros(display.shape, bool)
        for les in m.lesions:
            footprint |= les.full(les.footprint, display.shape)
        assert np.array_equal(changed, footprint)
        assert not (footprint & ~_allowed_region(seg, config)).any()
        assert not (footprint & (seg.pectoral | seg.film_label | seg.skin)).any()
        halo = m.concept_maps["circumscribed_margin"] & ~m.concept_maps["mass"]  # the dark ring outside the border
        for concept in ("mass", "calcification", "spiculated_margin", "circumscribed_margin",
                        "architectural_distortion"):
            mask = m.concept_maps[concept] & ~halo
            assert (m.image[mask] > display[mask]).all()
        assert (m.image[halo] < display[halo]).all()
        assert not (m.concept_maps["normal_tissue"] & changed).any()


def _broken_copies(real: Path, tmp: Path) -> dict[str, Path]:
    """One broken file per failure the builder must survive, made from a real CBIS-DDSM film."""
    raw = real.read_bytes()
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = tmp / name
        out[name].write_bytes(data)

    def edit(name: str, change) -> None:
        ds = pydicom.dcmread(real)
        change(ds)
        out[name] = tmp / name
        ds.save_as(out[name])

    put("truncated.dcm", raw[: len(raw) // 2])
    put("garbled-header.dcm", raw[:132] + b"\xff" * 2000 + raw[2132:])
    put("empty.dcm", b"")
    put("unreadable.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    edit("no-pixels.dcm", lambda ds: ds.__delattr__("PixelData"))
    edit("ct-modality.dcm", lambda ds: setattr(ds, "Modality", "CT"))
    edit("mpeg2-syntax.dcm", lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2.4.100"))
    edit("oversize.dcm", lambda ds: (setattr(ds, "Rows", 60000), setattr(ds, "Columns", 60000)))
    return out


EXPECTED_REASON = {
    "truncated.dcm": "truncated",
    "garbled-header.dcm": "",
    "empty.dcm": "empty",
    "unreadable.png": "PNG",
    "no-pixels.dcm": "no pixel data",
    "ct-modality.dcm": "modality CT",
    "mpeg2-syntax.dcm": "transfer syntax",
    "oversize.dcm": "pixel budget",
}


def test_bad_files_are_skipped_reported_and_never_leak_identifiers(tmp_path, real_dicoms, caplog):
    broken = _broken_copies(real_dicoms[0], tmp_path)
    settings = _settings(tmp_path / "ws")
    with caplog.at_level(logging.WARNING):
        report = build_demo(settings, config=SMALL, sources=[*broken.values(), *real_dicoms[:2]])
    assert not report.reused and report.sources == 2 and report.patches > 0
    skipped = {Path(s.path).name: s.reason for s in report.skipped}
    assert set(skipped) == set(broken)
    for name, fragment in EXPECTED_REASON.items():
        assert fragment in skipped[name], (name, skipped[name])
    info = json.loads((report.path / "dataset.json").read_text())
    assert {Path(s["path"]).name for s in info["skipped"]} == set(broken)
    for name in broken:
        assert name in caplog.text
    # identifiers from the film's header appear in no output and no log line
    ds = pydicom.dcmread(real_dicoms[0], stop_before_pixels=True)
    secrets = {str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)}
    secrets = {s for s in secrets if len(s) >= 4}
    assert secrets
    outputs = caplog.text + "".join(p.read_text() for p in report.path.glob("*.csv")) + json.dumps(info)
    outputs += report.summary() + "".join(p.name for p in report.path.rglob("*"))
    for s in secrets:
        assert s not in outputs


def test_nothing_usable_is_a_clear_error_and_leaves_no_dataset(tmp_path, real_dicoms):
    broken = _broken_copies(real_dicoms[0], tmp_path)
    settings = _settings(tmp_path / "ws")
    with pytest.raises(DataError) as e:
        build_demo(settings, config=SMALL, sources=[broken["truncated.dcm"], broken["ct-modality.dcm"]])
    assert "no usable source image" in str(e.value) and "truncated.dcm" in str(e.value)
    assert "ct-modality.dcm" in str(e.value)
    assert not settings.dataset_dir("demo").exists()
    assert not [p for p in settings.data_dir.iterdir()]  # no half-written temporary directory either
    code = main(["--workspace", str(settings.workspace), "--source", str(broken["empty.dcm"])])
    assert code == 1


def test_reuse_force_and_crash_keep_a_whole_dataset(tmp_path, real_dicoms, monkeypatch, capsys):
    settings = _settings(tmp_path / "ws")
    argv = ["--workspace", str(settings.workspace), "--variants", "1",
            "--source", str(real_dicoms[4]), "--source", str(real_dicoms[5])]
    assert main(argv) == 0
    assert "demo dataset built" in capsys.readouterr().out
    first = _tree_digest(settings.dataset_dir("demo"))
    assert main(argv) == 0
    assert "demo dataset reused" in capsys.readouterr().out
    assert main([*argv, "--force"]) == 0
    assert "demo dataset built" in capsys.readouterr().out
    assert _tree_digest(settings.dataset_dir("demo")) == first
    # a crash half-way through a rebuild leaves the previous dataset untouched and no temporary directory
    import training.demo as demo

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo(settings, config=DemoConfig(variants=1, seed=5), sources=real_dicoms[4:6])
    assert _tree_digest(settings.dataset_dir("demo")) == first
    assert [p.name for p in settings.data_dir.iterdir()] == ["demo"]
    read_manifest(settings.manifest_path("demo"))  # still a valid dataset


@pytest.mark.slow
def test_full_default_build(tmp_path):
    """The dataset `make demo` builds: size, balance and every concept (sizes documented in docs/DATA.md)."""
    report = build_demo(_settings(tmp_path / "ws"))
    manifest = read_manifest(report.manifest)
    assert 2500 <= len(manifest) <= 4000 and report.sources == 64 and not report.skipped
    for split in ("train", "val", "test"):
        labels = [r.label for r in manifest.split(split)]
        assert 0.35 <= np.mean(labels) <= 0.65
    assert all(report.concepts[c] >= 50 for c in CONCEPTS)
    assert (report.path / "contact_sheet.png").stat().st_size > 100_000
    print(report.summary())
