"""store.activations' direct chunk writer: the bytes it stores are zarr's own encoding of the same data, file by file.

    .venv/bin/python -m pytest tests/test_store_chunks.py -q

Extraction and probe writes encode whole chunks themselves (blosc + crc32c, see `_ChunkEncoder`) instead of going
through `zarr.Array.__setitem__`. These tests write the same real data both ways and compare every stored file, so a
reader (zarr, xarray, or our own) cannot tell which path wrote a store; they also cover the short last chunk (padded
with the fill value, as zarr pads it), the short last shard of the maps, all-zero chunks, and the write guard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ShardingCodec

from store.activations import StoreLayout, _ChunkEncoder, _codecs, create_store, open_store
from store.errors import ActivationStoreError, MisalignedWriteError
from store.images import read_image

ATTRS = {"model": {"model_uri": "models:/tiny/1", "run_id": "r1", "name": "tiny", "version": "1"},
         "dataset": {"manifest": "/data/manifest.csv", "sha256": "b" * 64}, "transform": {"mean": 0.5, "std": 0.25}}
LAYERS = {"conv.1": (4, 8, 8), "conv.2": (3, 4, 4)}  # (unit, y, x)


@pytest.fixture(scope="module")
def film(real_dicoms) -> np.ndarray:
    """float32 (y, x) display of a real CBIS-DDSM mammogram at 1/16 scale."""
    return read_image(real_dicoms[0]).display(scale=1 / 16)


def real_block(film: np.ndarray, start: int, stop: int) -> dict:
    """Data of images start … stop-1 cut from the real film: patches, 'maps' as ReLU'd differences of the film."""
    h, w = film.shape
    images, layers = [], {name: {"maps": [], "max": [], "mean": []} for name in LAYERS}
    for i in range(start, stop):
        y, x = (37 * i) % (h - 16), (53 * i) % (w - 16)
        patch = film[y:y + 16, x:x + 16]
        images.append((patch * 255).round().astype(np.uint8))
        for name, (u, yy, xx) in LAYERS.items():
            step = 16 // yy
            base = patch[::step, ::step][:yy, :xx]
            maps = np.stack([np.maximum(base - k / u, 0) * (k + 1) for k in range(u)]).astype(np.float16)
            if i == 5:
                maps[:] = 0  # a chunk equal to zero (not the fill value, NaN): stored like any other
            layers[name]["maps"].append(maps)
            layers[name]["max"].append(maps.max(axis=(1, 2)).astype(np.float32))
            layers[name]["mean"].append(maps.astype(np.float32).mean(axis=(1, 2)))
    n = stop - start
    probs = np.stack([np.array([1 - m.mean(), m.mean()]) for m in images]).astype(np.float32) / 255
    return {"images": np.stack(images), "labels": np.arange(start, stop) % 2, "probs": probs,
            "layers": {k: {s: np.stack(v) for s, v in d.items()} for k, d in layers.items()} if n else {}}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(root)}"}


def test_extraction_chunks_are_byte_identical_to_zarrs_encoding(film, tmp_path):
    n, block = 11, 4  # the last block is short: 3 images in a 4-image chunk
    lay = StoreLayout(image_ids=tuple(f"i{j}" for j in range(n)), image_size=(16, 16), classes=("a", "b"),
                      layers=LAYERS, block=block, k=2)
    s = create_store(str(tmp_path / "direct.zarr"), attrs=ATTRS, layout=lay)
    for b in range(s.n_blocks):
        s.write_block(b, **real_block(film, *s.block_range(b)))
    s.finalize()

    # the same arrays, written by zarr itself
    ref = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="w", zarr_format=3)
    direct = zarr.open_group(str(tmp_path / "direct.zarr"), mode="r", zarr_format=3)
    whole = real_block(film, 0, n)
    data = {"images": whole["images"], "labels": whole["labels"], "probs": whole["probs"]}
    for name in LAYERS:
        for stat in ("maps", "max", "mean"):
            data[f"layers/{name}/{stat}"] = whole["layers"][name][stat]
    for path, values in data.items():
        src = direct[path]
        codecs = src.metadata.codecs  # the same codecs, taken from the array (maps: unshuffled, in shards)
        inner = codecs[0].codecs if isinstance(codecs[0], ShardingCodec) else codecs
        arr = ref.create_array(path, shape=src.shape, chunks=src.chunks, shards=src.shards, dtype=src.dtype,
                               fill_value=src.metadata.fill_value, serializer=inner[0], compressors=list(inner[1:]),
                               config={"write_empty_chunks": True})
        arr[...] = values
        np.testing.assert_array_equal(src[...], values.astype(src.dtype))
    ours, theirs = _files(tmp_path / "direct.zarr"), _files(tmp_path / "zarr.zarr")
    compared = [k for k in theirs if not k.startswith(("progress", "layers/conv.1/quantiles"))]
    assert len(compared) == 3 * 3 + 2 * 3 * 3  # 3 blocks of images/labels/probs, and of maps (shards), max, mean
    for key in compared:
        assert ours[key] == theirs[key], key
    # maps: one shard per block, one chunk per image inside; the short last shard indexes 3 chunks and one empty slot
    assert direct["layers/conv.1/maps"].chunks == (1, 4, 8, 8) and direct["layers/conv.1/maps"].shards == (4, 4, 8, 8)
    assert direct["layers/conv.1/maps"].metadata.codecs[0].codecs[1].shuffle.value == "noshuffle"
    assert direct["layers/conv.1/max"].metadata.codecs[1].shuffle.value == "shuffle"
    last = ours["layers/conv.1/maps/c/2/0/0/0"]
    index = np.frombuffer(last[-(4 * 16 + 4):-4], "<u8").reshape(4, 2)
    assert index[3].tolist() == [2 ** 64 - 1] * 2 and index[:3, 1].min() > 4
    reopened = open_store(str(tmp_path / "direct.zarr"))
    np.testing.assert_array_equal(reopened.maps("conv.2", 5), np.zeros((3, 4, 4), np.float32))
    np.testing.assert_array_equal(reopened.maps("conv.2", 10), whole["layers"]["conv.2"]["maps"][10])


def test_probe_arrays_are_few_chunks_and_read_back(film, tmp_path):
    n = 700
    lay = StoreLayout(image_ids=tuple(f"i{j}" for j in range(n)), image_size=(16, 16), classes=("a", "b"),
                      layers=LAYERS, block=32, k=2)
    s = create_store(str(tmp_path / "p.zarr"), attrs=ATTRS, layout=lay)
    maps = np.stack([np.resize(film[j % 40:j % 40 + 64, :64], (64, 64)) for j in range(n)]).astype(np.float16)
    scores = maps.mean(axis=(1, 2)).astype(np.float32)
    s.write_probe("mass", "conv.1", scores=scores, maps=maps, run_id="run-a")
    root = tmp_path / "p.zarr" / "probes" / "mass@conv.1"
    assert len(list((root / "scores").rglob("c/*"))) == 1  # one chunk for all scores
    assert len([p for p in (root / "maps").rglob("*") if p.is_file() and p.name != "zarr.json"]) == 2  # 512 + 188
    p = s.probe("mass", "conv.1")
    np.testing.assert_array_equal(p.scores, scores)
    np.testing.assert_array_equal(p.maps, maps.astype(np.float32))
    # a new version of another shape replaces the arrays; the encoder follows the new array
    s.write_probe("mass", "conv.1", scores=-scores, maps=maps[:, :32, :32], run_id="run-b")
    p = s.probe("mass", "conv.1")
    assert p.run_id == "run-b" and p.maps.shape == (n, 32, 32)
    np.testing.assert_array_equal(p.scores, -scores)
    np.testing.assert_array_equal(p.maps, maps[:, :32, :32].astype(np.float32))


def test_encoder_refuses_arrays_it_cannot_write_and_the_guard_holds(tmp_path):
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    plain = g.create_array("zstd", shape=(8, 3), chunks=(4, 3), dtype="float32")  # zarr's default codecs
    split = g.create_array("split", shape=(8, 4), chunks=(4, 2), dtype="float32", **_codecs("float32"))
    assert _ChunkEncoder.of(plain) is None and _ChunkEncoder.of(split) is None
    lay = StoreLayout(image_ids=tuple(f"i{j}" for j in range(8)), image_size=(4, 4), classes=("a", "b"),
                      layers={"c": (2, 2, 2)}, block=4, k=2)
    s = create_store(str(tmp_path / "g.zarr"), attrs=ATTRS, layout=lay)
    rows = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(MisalignedWriteError, match="'images'"):
        s.write_many([("labels", 0, np.zeros(4, np.int64)), ("images", 2, rows)])
    assert not any((tmp_path / "g.zarr" / "labels").rglob("c/*"))  # nothing written when any write is refused


def test_version_1_stores_are_still_read_and_unknown_versions_refused(film, tmp_path, monkeypatch):
    """Version 1 kept one file per image and layer (no shards): a complete one is read as it is."""
    import store.activations as activations

    plain = activations._specs

    def unsharded(layout):
        return [activations._Spec(**{**sp.__dict__, "shards": None}) for sp in plain(layout)]

    monkeypatch.setattr(activations, "_specs", unsharded)
    monkeypatch.setattr(activations, "FORMAT_VERSION", 1)
    n = 6
    lay = StoreLayout(image_ids=tuple(f"i{j}" for j in range(n)), image_size=(16, 16), classes=("a", "b"),
                      layers=LAYERS, block=4, k=2)
    s = create_store(str(tmp_path / "v1.zarr"), attrs=ATTRS, layout=lay)
    for b in range(s.n_blocks):
        s.write_block(b, **real_block(film, *s.block_range(b)))
    s.finalize()
    monkeypatch.undo()
    assert (tmp_path / "v1.zarr" / "layers" / "conv.1" / "maps" / "c" / "5" / "0" / "0" / "0").is_file()
    old = open_store(str(tmp_path / "v1.zarr"))
    assert old.attrs["format_version"] == 1 and old._array("layers/conv.1/maps").shards is None
    want = real_block(film, 0, n)["layers"]["conv.1"]["maps"]
    np.testing.assert_array_equal(old.maps("conv.1", 4), want[4].astype(np.float32))
    np.testing.assert_array_equal(old.maps_many("conv.1", [5, 0]), want[[5, 0]].astype(np.float32))
    g = zarr.open_group(str(tmp_path / "v1.zarr"), mode="r+", zarr_format=3)
    g.attrs["format_version"] = 3
    with pytest.raises(ActivationStoreError, match=r"format version 3 is not one this ConceptLens reads \(1, 2\)"):
        open_store(str(tmp_path / "v1.zarr"))
