"""store.activations: the reader/writer API on a local directory and on S3 (moto on loopback), integrity guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store.activations import (
    ActivationStore,
    ImageIndexError,
    IncompleteStoreError,
    MissingArrayError,
    StoreLayout,
    create_store,
    info_main,
    open_store,
)
from store.errors import ActivationStoreError, ChunkCorruptionError, MisalignedWriteError, StoreMismatchError
from helpers_store import MotoS3

REPO = Path(__file__).resolve().parents[1]
MODEL = {"model_uri": "models:/tiny/3", "run_id": "run-3", "name": "tiny", "version": "3"}
DATASET = {"manifest": "/data/manifest.csv", "sha256": "a" * 64}
ATTRS = {"model": MODEL, "dataset": DATASET, "transform": {"mean": 0.5, "std": 0.25}, "batch_size": 4}
LAYERS = {"conv.1": (3, 4, 5), "conv.2": (2, 2, 2)}  # (unit, y, x)


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(make_url(name), storage_options) for a local directory or the loopback S3 server."""
    if request.param == "local":
        return (lambda name: str(tmp_path / f"{name}.zarr")), {}
    server = request.getfixturevalue("s3")
    prefix = f"{request.node.name.replace('[', '-').replace(']', '')}"
    return (lambda name: server.url(f"{prefix}/{name}.zarr")), dict(server.options)


def layout(n: int = 10, block: int = 4) -> StoreLayout:
    return StoreLayout(image_ids=tuple(f"img-{i:03d}" for i in range(n)), image_size=(6, 6),
                       classes=("normal", "lesion"), layers=LAYERS, block=block, k=3)


def block_data(lay: StoreLayout, start: int, stop: int, *, zero: bool = False) -> dict:
    """Deterministic data of images start … stop-1 (independent of how the rows are split into blocks)."""
    n = stop - start
    rng = [np.random.default_rng(1000 + i) for i in range(start, stop)]
    layers = {}
    for name, (u, y, x) in lay.layers.items():
        maps = np.stack([r.standard_normal((u, y, x)) for r in rng]).astype(np.float16)  # (image, unit, y, x)
        maps = np.maximum(maps, 0) if name == "conv.2" else maps
        if zero:
            maps[:] = 0
        layers[name] = {"maps": maps, "max": maps.max(axis=(2, 3)).astype(np.float32),
                        "mean": maps.astype(np.float32).mean(axis=(2, 3))}
    images = np.stack([r.integers(0, 256, lay.image_size, dtype=np.uint8) for r in rng])
    probs = np.stack([r.dirichlet([1, 1]) for r in rng]).astype(np.float32)
    return {"images": images, "labels": np.arange(start, stop) % 2, "probs": probs, "layers": layers}


def build(url: str, opts: dict, *, n: int = 10, block: int = 4, zero_block: int | None = None,
          finalize: bool = True, blocks=None) -> ActivationStore:
    lay = layout(n, block)
    s = create_store(url, attrs=ATTRS, layout=lay, storage_options=opts)
    for b in range(s.n_blocks) if blocks is None else blocks:
        start, stop = s.block_range(b)
        s.write_block(b, **block_data(lay, start, stop, zero=(b == zero_block)))
    if finalize:
        s.finalize()
    return s


def expected(n: int = 10) -> dict:
    return block_data(layout(n), 0, n)


# -- reading ----------------------------------------------------------------------------------------------------------
def test_round_trip_every_reader(where):
    make, opts = where
    url = make("rt")
    build(url, opts)
    s = open_store(url, storage_options=opts)
    want = expected()
    assert s.complete and s.layers == list(LAYERS) and s.n_images == 10 and s.block == 4
    assert s.image_ids[3] == "img-003" and s.index_of("img-003") == 3
    assert s.attrs["model"] == MODEL and s.attrs["dataset"] == DATASET and s.attrs["format_version"] == 2
    np.testing.assert_array_equal(s.images(), want["images"])
    np.testing.assert_array_equal(s.image(7), want["images"][7])
    np.testing.assert_array_equal(s.labels(), want["labels"])
    np.testing.assert_array_equal(s.probs(), want["probs"])
    for name, (u, y, x) in LAYERS.items():
        maps16 = want["layers"][name]["maps"]
        assert s.layer_shape(name) == (u, y, x)
        m = s.maps(name, 5)
        assert m.dtype == np.float32 and m.shape == (u, y, x)
        np.testing.assert_array_equal(m, maps16[5].astype(np.float32))
        np.testing.assert_array_equal(s.maps_many(name, [9, 2, 9]), maps16[[9, 2, 9]].astype(np.float32))
        order = [9, 3, 2, 4, 0, 9, 1, 7]  # runs 0–4, 7 and 9 (the last), out of order and repeated
        np.testing.assert_array_equal(s.maps_many(name, order), maps16[order].astype(np.float32))
        np.testing.assert_array_equal(s.maps_many(name, range(s.n_images)), maps16.astype(np.float32))
        np.testing.assert_array_equal(s.pooled(name, "max"), want["layers"][name]["max"])
        np.testing.assert_array_equal(s.pooled(name, "mean"), want["layers"][name]["mean"])
        levels = s.quantile_levels(name)
        assert levels == (0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
        rows = np.moveaxis(maps16, 1, 0).reshape(u, -1).astype(np.float64)  # (unit, image·y·x)
        np.testing.assert_array_equal(s.quantiles(name), np.quantile(rows, levels, axis=1).T.astype(np.float32))
        np.testing.assert_array_equal(s.thresholds(name), s.quantiles(name)[:, 4])
        idx, val = s.topk(name)
        pooled = want["layers"][name]["max"]
        for unit in range(u):
            order = sorted(range(10), key=lambda i: (-pooled[i, unit], i))[:3]
            assert idx[unit].tolist() == order
            np.testing.assert_array_equal(val[unit], pooled[order, unit])
    assert s.pooled("conv.1") is s.pooled("conv.1")  # cached per store object
    with pytest.raises(ValueError):
        s.images()[0, 0, 0] = 1  # cached arrays are read-only


def test_unknown_names_and_indices_are_errors_naming_them(where):
    make, opts = where
    url = make("names")
    build(url, opts)
    s = open_store(url, storage_options=opts)
    with pytest.raises(KeyError, match="conv.9") as e:
        s.maps("conv.9", 0)
    assert isinstance(e.value, MissingArrayError) and "conv.1, conv.2" in str(e.value)
    with pytest.raises(IndexError, match="image index 10"):
        s.maps("conv.1", 10)
    assert issubclass(ImageIndexError, ActivationStoreError)
    with pytest.raises(KeyError, match="0.42"):
        s.thresholds("conv.1", level=0.42)
    with pytest.raises(KeyError, match="nope"):
        s.index_of("nope")
    with pytest.raises(ActivationStoreError, match="read-only"):
        s.write_probe("mass", "conv.1", scores=np.zeros(10), maps=None, run_id="r")


def test_maps_of_one_image_is_one_chunk_read(where):
    make, opts = where
    url = make("onechunk")
    build(url, opts)
    s = open_store(url, storage_options=opts)
    s.layer_shape("conv.1")  # metadata read outside the count
    seen = []
    inner = s._zstore._store
    original = inner.get

    async def counting_get(key, prototype, byte_range=None):
        value = await original(key, prototype, byte_range)
        seen.append((key, type(byte_range).__name__, len(value.to_bytes())))
        return value

    inner.get = counting_get
    try:
        s.maps("conv.1", 6)
    finally:
        inner.get = original
    # images 4 … 7 share a shard: its index (4 × 16 bytes + crc32c), then only image 6's chunk
    chunk_bytes = _chunk_nbytes(url, opts, "conv.1", 6)
    assert seen == [("layers/conv.1/maps/c/1/0/0/0", "SuffixByteRequest", 68),
                    ("layers/conv.1/maps/c/1/0/0/0", "RangeByteRequest", chunk_bytes)]


def _chunk_nbytes(url: str, opts: dict, layer: str, image: int, block: int = 4) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    shard = fs.cat_file(f"{root}/layers/{layer}/maps/c/{image // block}/0/0/0")
    return int(np.frombuffer(shard[-(block * 16 + 4):-4], "<u8").reshape(block, 2)[image % block, 1])


def test_store_refused_for_another_model_or_dataset(where, tmp_path):
    make, opts = where
    url = make("mismatch")
    build(url, opts)
    assert open_store(url, expect_model=MODEL, expect_dataset="a" * 64, storage_options=opts).complete
    assert open_store(url, expect_model="models:/tiny/3", storage_options=opts).complete
    with pytest.raises(StoreMismatchError) as e:
        open_store(url, expect_model={**MODEL, "version": "4", "run_id": "run-4"}, storage_options=opts)
    assert "tiny/3" in str(e.value) and "tiny/4" in str(e.value)
    with pytest.raises(StoreMismatchError, match="models:/other/1"):
        open_store(url, expect_model="models:/other/1", storage_options=opts)
    other = tmp_path / "other.csv"
    other.write_text("id,source_id,label,split,image\n")
    with pytest.raises(StoreMismatchError) as e:
        open_store(url, expect_dataset=other, storage_options=opts)
    assert "a" * 64 in str(e.value) and str(e.value).count("sha256") == 2


def test_incomplete_store_is_refused_for_reading_and_cannot_be_finalized(where):
    make, opts = where
    url = make("partial")
    s = build(url, opts, finalize=False, blocks=[0, 2])
    assert s.completed_blocks().tolist() == [True, False, True]
    with pytest.raises(IncompleteStoreError, match="resume"):
        open_store(url, storage_options=opts)
    with pytest.raises(IncompleteStoreError, match=r"\[1\]"):
        s.finalize()
    assert open_store(url, allow_incomplete=True, storage_options=opts).maps("conv.1", 0).shape == (3, 4, 5)


def test_finalize_takes_what_was_counted_while_writing_and_reads_back_only_the_rest(where):
    """Extraction hands finalize the histograms and top-k it fed with the blocks it wrote (`covered`): those blocks'
    maps and maxima are not read back (here their stored maxima are overwritten with 1e30 afterwards, which a read
    would rank first), the other blocks are, and the result equals a store finalized from what is stored."""
    from store.stats import Float16Histogram, TopK

    make, opts = where
    reference = build(make("reference"), opts)
    s = build(make("counted"), opts, finalize=False)
    lay = layout()
    covered = [0, 2]
    histograms = {name: Float16Histogram(u) for name, (u, _, _) in LAYERS.items()}
    tops = {name: TopK(u, 3) for name, (u, _, _) in LAYERS.items()}
    for b in covered:
        start, stop = s.block_range(b)
        data = block_data(lay, start, stop)["layers"]
        for name in LAYERS:
            histograms[name].add(data[name]["maps"])
            tops[name].add(data[name]["max"], start=start)
            s.write_aligned(f"layers/{name}/max", start, np.full_like(data[name]["max"], 1e30))
    s.finalize(histograms=histograms, tops=tops, covered=covered)
    for name in LAYERS:
        np.testing.assert_array_equal(s.quantiles(name), reference.quantiles(name))
        for got, want in zip(s.topk(name), reference.topk(name)):
            np.testing.assert_array_equal(got, want)

    # every block covered: the completion flags are not read back either (the caller wrote them itself)
    t = build(make("all-covered"), opts, finalize=False)
    t.write_many([("progress", 1, np.zeros(1, np.uint8))])  # a flag a read would find missing
    with pytest.raises(IncompleteStoreError, match=r"\[1\]"):
        t.finalize()
    tops = {name: TopK(u, 3) for name, (u, _, _) in LAYERS.items()}
    for name in LAYERS:
        tops[name].add(expected()["layers"][name]["max"], start=0)
    t.finalize(tops=tops, covered=range(t.n_blocks))
    for name in LAYERS:
        np.testing.assert_array_equal(t.quantiles(name), reference.quantiles(name))
        np.testing.assert_array_equal(t.topk(name)[0], reference.topk(name)[0])


def test_zero_block_is_stored_and_counts_as_complete(where):
    make, opts = where
    url = make("zeros")
    s = build(url, opts, zero_block=1)
    assert s.completed_blocks().all()
    r = open_store(url, storage_options=opts)
    assert np.all(r.maps("conv.2", 5) == 0)  # read from a stored chunk: a missing one would be an error
    keys = [k for k in _list_keys(url, opts) if k.startswith("layers/conv.2/maps/c/")]
    assert len(keys) == 3  # one shard per block, the all-zero block included
    index = np.frombuffer(_read_key(url, opts, "layers/conv.2/maps/c/1/0/0/0")[-(4 * 16 + 4):-4], "<u8")
    assert (index.reshape(4, 2)[:, 1] > 4).all()  # and in it, every image's chunk is stored (none left to fill)


def _read_key(url: str, opts: dict, key: str) -> bytes:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    return fs.cat_file(f"{root}/{key}")


# -- writing guards -----------------------------------------------------------------------------------------------
def test_misaligned_writes_are_refused_naming_array_and_rows(where):
    make, opts = where
    url = make("aligned")
    s = build(url, opts, finalize=False, blocks=[])
    rows = np.zeros((4, 6, 6), np.uint8)
    with pytest.raises(MisalignedWriteError, match=r"'images'.*rows 2:6.*chunk 4"):
        s.write_aligned("images", 2, rows)
    with pytest.raises(MisalignedWriteError, match="rows 0:3"):
        s.write_aligned("images", 0, rows[:3])
    with pytest.raises(MisalignedWriteError, match="trailing shape"):
        s.write_aligned("layers/conv.1/maps", 0, np.zeros((1, 2, 4, 5), np.float16))
    with pytest.raises(MisalignedWriteError, match="outside"):
        s.write_aligned("images", 8, rows)
    s.write_aligned("images", 8, rows[:2])  # the last, short block ends at the array's end: aligned
    assert not s.completed_blocks().any()  # raw writes never mark blocks complete
    with pytest.raises(ValueError, match="lacks layers"):
        s.write_block(0, **{**block_data(s_layout := layout(), 0, 4), "layers": {}})
    assert s_layout.n_blocks == 3


def test_arrays_are_created_once_and_never_erased(where):
    make, opts = where
    url = make("once")
    build(url, opts)
    before = _list_keys(url, opts)
    with pytest.raises(ActivationStoreError, match="already exists"):
        create_store(url, attrs=ATTRS, layout=layout(), storage_options=opts)
    with pytest.raises(StoreMismatchError, match="tiny/9"):
        create_store(url, attrs={**ATTRS, "model": {**MODEL, "version": "9", "run_id": "run-9"}}, layout=layout(),
                     exist_ok=True, storage_options=opts)
    with pytest.raises(StoreMismatchError, match="block"):
        create_store(url, attrs=ATTRS, layout=layout(block=5), exist_ok=True, storage_options=opts)
    again = create_store(url, attrs=ATTRS, layout=layout(), exist_ok=True, storage_options=opts)
    assert again.complete and _list_keys(url, opts) == before
    r = open_store(url, storage_options=opts)
    np.testing.assert_array_equal(r.maps("conv.1", 9), expected()["layers"]["conv.1"]["maps"][9].astype(np.float32))


# -- integrity ----------------------------------------------------------------------------------------------------
def _list_keys(url: str, opts: dict) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    fs.invalidate_cache()
    return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(root))


def _flip_byte(url: str, opts: dict, key: str, offset: int = 10) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    path = f"{root}/{key}"
    data = bytearray(fs.cat_file(path))
    data[offset % len(data)] ^= 0x40
    fs.pipe_file(path, bytes(data))


def _inner_chunk_offset(url: str, opts: dict, layer: str, image: int, block: int = 4) -> int:
    """Byte offset of image's chunk inside its block's shard of layers/<layer>/maps (from the shard's index)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    shard = fs.cat_file(f"{root}/layers/{layer}/maps/c/{image // block}/0/0/0")
    index = np.frombuffer(shard[-(block * 16 + 4):-4], "<u8").reshape(block, 2)  # (offset, nbytes) per chunk
    return int(index[image % block, 0])


def test_flipped_byte_in_a_chunk_is_reported_naming_array_and_chunk(where):
    make, opts = where
    url = make("corrupt")
    build(url, opts)
    _flip_byte(url, opts, "layers/conv.1/maps/c/1/0/0/0", offset=_inner_chunk_offset(url, opts, "conv.1", 7) + 10)
    _flip_byte(url, opts, "layers/conv.2/max/c/1/0", offset=3)
    s = open_store(url, storage_options=opts)
    np.testing.assert_array_equal(s.maps("conv.1", 6), expected()["layers"]["conv.1"]["maps"][6].astype(np.float32))
    with pytest.raises(ChunkCorruptionError) as e:
        s.maps("conv.1", 7)
    assert "'layers/conv.1/maps'" in str(e.value) and "(7, 0, 0, 0)" in str(e.value) and "crc32c" in str(e.value)
    assert isinstance(e.value, IOError)
    with pytest.raises(ChunkCorruptionError, match=r"'layers/conv.2/max' chunk \(1, 0\)"):
        s.pooled("conv.2", "max")  # a read over many chunks still names the bad one
    with pytest.raises(ChunkCorruptionError, match=r"\(7, 0, 0, 0\)"):
        s.maps_many("conv.1", [1, 7])
    np.testing.assert_array_equal(s.maps("conv.1", 4), expected()["layers"]["conv.1"]["maps"][4].astype(np.float32))
    # the index at the end of a shard has its own checksum: a flipped byte there names the shard's chunks
    _flip_byte(url, opts, "layers/conv.1/maps/c/0/0/0/0", offset=-7)
    with pytest.raises(ChunkCorruptionError, match=r"'layers/conv.1/maps' chunk \(0, 0, 0, 0\)"):
        s.maps("conv.1", 0)
    with pytest.raises(ChunkCorruptionError, match=r"'layers/conv.1/maps' shard \(0, 0, 0, 0\) \(chunks "
                                                   r"\(0, 0, 0, 0\) … \(3, 0, 0, 0\)\) fails its crc32c"):
        s.maps_many("conv.1", [0, 1, 2, 3])  # the whole shard: read at once, its index's checksum checked


def test_missing_chunk_of_a_complete_store_is_an_error_not_fill_values(where):
    make, opts = where
    url = make("missing")
    build(url, opts)
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    fs.rm(f"{root}/layers/conv.1/maps/c/1/0/0/0")  # the shard of images 4 … 7
    fs.rm(f"{root}/probs/c/0/0")
    s = open_store(url, storage_options=opts)
    with pytest.raises(ChunkCorruptionError, match=r"'layers/conv.1/maps' shard \(1, 0, 0, 0\) \(chunks "
                                                   r"\(4, 0, 0, 0\) … \(7, 0, 0, 0\)\) is missing"):
        s.maps("conv.1", 5)
    with pytest.raises(ChunkCorruptionError, match="'probs'"):
        s.probs()


# -- probes and embeddings ----------------------------------------------------------------------------------------
def test_probes_round_trip_overwrite_and_delete(where):
    make, opts = where
    url = make("probes")
    build(url, opts)
    s = open_store(url, read_only=False, storage_options=opts)
    scores = np.linspace(0, 1, 10, dtype=np.float32)
    maps = np.random.default_rng(0).random((10, 4, 5)).astype(np.float32)  # (image, y, x)
    s.write_probe("mass", "conv.1", scores=scores, maps=maps, run_id="run-a", attrs={"auroc": 0.8})
    s.write_probe("skin", "conv.2", scores=scores[::-1], maps=None, run_id="run-b")
    r = open_store(url, storage_options=opts)
    assert r.probes() == [("mass", "conv.1"), ("skin", "conv.2")]
    p = r.probe("mass", "conv.1")
    assert p.run_id == "run-a" and p.attrs["auroc"] == 0.8
    np.testing.assert_array_equal(p.scores, scores)
    np.testing.assert_array_equal(p.maps, maps.astype(np.float16).astype(np.float32))
    assert r.probe("skin", "conv.2").maps is None
    s.write_probe("mass", "conv.1", scores=scores * 2, maps=maps[:, :2], run_id="run-c")  # new version, new shape
    p = open_store(url, storage_options=opts).probe("mass", "conv.1")
    assert p.run_id == "run-c" and p.maps.shape == (10, 2, 5)
    np.testing.assert_array_equal(p.scores, scores * 2)
    s.delete_probe("mass", "conv.1")
    assert open_store(url, storage_options=opts).probes() == [("skin", "conv.2")]
    with pytest.raises(KeyError, match="mass"):
        s.probe("mass", "conv.1")
    with pytest.raises(ValueError, match="scores shape"):
        s.write_probe("mass", "conv.1", scores=np.zeros(3), maps=None, run_id="x")
    with pytest.raises(ValueError, match="concept"):
        s.write_probe("a/b", "conv.1", scores=scores, maps=None, run_id="x")


def test_embeddings_cache(where):
    make, opts = where
    url = make("emb")
    build(url, opts)
    s = open_store(url, read_only=False, storage_options=opts)
    with pytest.raises(KeyError):
        s.embedding("conv.1", "unit_umap")
    units = np.arange(6, dtype=np.float32).reshape(3, 2)
    s.write_embedding("conv.1", "unit_umap", units, attrs={"n_neighbors": 5})
    s.write_embedding("conv.1", "image_pca", np.ones((10, 2)))
    s.write_embedding("conv.2", "pca", np.zeros((2, 3)))  # 2 rows = the layer's units
    r = open_store(url, storage_options=opts)
    np.testing.assert_array_equal(r.embedding("conv.1", "unit_umap"), units)
    assert r.embedding_attrs("conv.1", "unit_umap")["n_neighbors"] == 5
    assert r.embedding_attrs("conv.1", "image_pca")["over"] == "image"
    assert r.embedding_attrs("conv.2", "pca")["over"] == "unit"
    assert r.embeddings("conv.1") == ["image_pca", "unit_umap"]
    with pytest.raises(ValueError, match=r"\(3, component\)"):
        s.write_embedding("conv.1", "unit_pca", np.ones((4, 2)))


# -- outside readers ----------------------------------------------------------------------------------------------
OUTSIDE = r"""
import json, sys, zarr
from zarr.storage import FsspecStore
url, opts = sys.argv[1], json.loads(sys.argv[2])
root = zarr.open_group(FsspecStore.from_url(url, storage_options=opts, read_only=True) if "://" in url else url,
                       mode="r")
out = {"attrs": dict(root.attrs), "arrays": {}}
def walk(g, prefix):
    for name, m in g.members():
        if isinstance(m, zarr.Array):
            data = m[...]
            out["arrays"][prefix + name] = {"dims": list(m.metadata.dimension_names or []), "ndim": m.ndim,
                                            "dtype": str(m.dtype), "attrs": dict(m.attrs), "sum": float(data.sum())}
        else:
            walk(m, prefix + name + "/")
walk(root, "")
print(json.dumps(out))
"""


def test_plain_zarr_in_another_process_sees_dimensions_and_attributes(where):
    make, opts = where
    url = make("outside")
    s = build(url, opts)
    s.write_probe("mass", "conv.1", scores=np.ones(10), maps=np.ones((10, 4, 5)), run_id="run-a")
    proc = subprocess.run([sys.executable, "-c", OUTSIDE, url, json.dumps(opts)], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["attrs"]["kind"] == "conceptlens-activation-store"
    assert seen["attrs"]["model"] == MODEL and seen["attrs"]["layers"] == list(LAYERS)
    arrays = seen["arrays"]
    assert {"images", "labels", "probs", "progress", "layers/conv.1/maps", "layers/conv.2/quantiles",
            "layers/conv.2/topk", "probes/mass@conv.1/maps"} <= set(arrays)
    for path, a in arrays.items():
        assert len(a["dims"]) == a["ndim"] and all(a["dims"]), path
    assert arrays["layers/conv.1/maps"]["dims"] == ["image", "unit", "y", "x"]
    assert arrays["layers/conv.1/maps"]["dtype"] == "float16"
    assert arrays["layers/conv.1/quantiles"]["attrs"]["levels"][4] == 0.99
    assert arrays["probes/mass@conv.1/scores"]["sum"] == 10.0


def test_xarray_reads_a_layer_group_with_named_dimensions(tmp_path):
    xr = pytest.importorskip("xarray")
    url = str(tmp_path / "xr.zarr")
    build(url, {})
    ds = xr.open_zarr(url, group="layers/conv.1", consolidated=False)
    assert ds["maps"].dims == ("image", "unit", "y", "x")
    assert dict(ds.sizes) == {"image": 10, "unit": 3, "y": 4, "x": 5, "level": 7, "rank": 3}
    np.testing.assert_array_equal(ds["max"].values, expected()["layers"]["conv.1"]["max"])
    root = xr.open_zarr(url, consolidated=False)
    assert root["images"].dims == ("image", "y", "x") and root.attrs["model"] == MODEL


def test_info_command_prints_attributes_and_arrays(tmp_path, capsys):
    url = str(tmp_path / "info.zarr")
    build(url, {})
    assert info_main([url]) == 0
    out = capsys.readouterr().out
    assert "images: 10" in out and '"version": "3"' in out
    assert "layers/conv.1/maps" in out and "(image, unit, y, x)" in out and "float16" in out
    assert info_main([str(tmp_path / "nothing.zarr")]) == 1
    assert "no activation store" in capsys.readouterr().err


def test_python_dash_m_store_info(tmp_path):
    url = str(tmp_path / "cli.zarr")
    build(url, {})
    proc = subprocess.run([sys.executable, "-m", "store", "info", url], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "conceptlens-activation-store" in proc.stdout and "layers/conv.2/topk" in proc.stdout


def test_probe_reads_follow_versions_written_by_another_process(where):
    make, opts = where
    url = make("versions")
    build(url, opts)
    writer = open_store(url, read_only=False, storage_options=opts)  # e.g. a background job
    reader = open_store(url, storage_options=opts)  # e.g. an app worker
    writer.write_probe("mass", "conv.1", scores=np.zeros(10), maps=np.zeros((10, 4, 5)), run_id="v1")
    first = reader.probe("mass", "conv.1")
    assert reader.probe("mass", "conv.1") is first  # unchanged version: arrays not read again
    writer.write_probe("mass", "conv.1", scores=np.ones(10), maps=np.ones((10, 2, 2)), run_id="v2")
    second = reader.probe("mass", "conv.1")
    assert second.run_id == "v2" and second.maps.shape == (10, 2, 2) and np.all(second.scores == 1)
    writer.write_probe("mass", "conv.1", scores=np.full(10, 2.0), maps=None, run_id="v2")  # same run, new write
    assert np.all(reader.probe("mass", "conv.1").scores == 2) and reader.probe("mass", "conv.1").maps is None
    writer.write_embedding("conv.1", "unit_pca", np.zeros((3, 2)))
    assert reader.embedding("conv.1", "unit_pca").shape == (3, 2)
    writer.write_embedding("conv.1", "unit_pca", np.zeros((3, 5)))
    assert reader.embedding("conv.1", "unit_pca").shape == (3, 5)
