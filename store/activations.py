"""The zarr v3 activation store: one model version's activations over one dataset, written once, read everywhere.

    >>> from store.activations import open_store
    >>> s = open_store(settings.store_url("demo"))                  # read-only; refuses an incomplete store
    >>> s.attrs["model"]["version"], s.attrs["dataset"]["sha256"], s.layers, len(s.image_ids)
    >>> s.maps("features.9", 12).shape                               # float32 (unit, y, x) — one chunk read
    >>> s.pooled("features.9", "max")                                # float32 (image, unit), cached per object
    >>> s.thresholds("features.9", level=0.99)                       # float32 (unit,) from .quantiles(layer)
    >>> idx, val = s.topk("features.9")                              # int32 / float32 (unit, k), best first
    >>> open_store(url, expect_model=loaded.meta, expect_dataset=manifest)   # StoreMismatchError if made from others

Reader API (every shape is named; "image" is an index into `.image_ids`, "unit" a channel of the layer):
    .attrs  .image_ids  .layers  .classes  .n_images  .url  .complete  .layer_shape(layer) -> (unit, y, x)
    .index_of(image_id) -> int
    .images() uint8 (image, y, x)   .image(i) uint8 (y, x)   .labels() int64 (image,)   .probs() float32 (image, class)
    .maps(layer, image) float32 (unit, y, x)        .maps_many(layer, images) float32 (image, unit, y, x)
    .pooled(layer, "max"|"mean") float32 (image, unit)           — also the inputs of the unit and image embeddings
    .quantiles(layer) float32 (unit, level)   .quantile_levels(layer) -> tuple   .thresholds(layer, level=0.99) (unit,)
    .topk(layer) -> (image indices int32 (unit, k), values float32 (unit, k))
    .write_probe(concept, layer, *, scores (image,), maps (image, y, x) | None, run_id, attrs=None)
    .probe(concept, layer) -> Probe(.scores (image,), .maps float32 (image, y, x) | None, .run_id, .attrs)
    .probes() -> [(concept, layer)]   .delete_probe(concept, layer)
    .write_embedding(layer, kind, coords (unit|image, component), *, over=None, attrs=None)
    .embedding(layer, kind) float32 (unit|image, component)   .embedding_attrs(layer, kind)   .embeddings(layer)
images(), labels(), probs(), pooled(), quantiles() and topk() read the array once per store object and return
read-only numpy arrays: keep one store object per process (e.g. per app worker) and call them freely.

Writer API (extraction, store/extract.py): `create_store(url, *, attrs, layout)` makes every array once;
`.write_block(b, …, executor=None)` writes block b's whole, aligned chunks and shards and then records it in
`progress`; `.write_aligned(path, start, rows)` and `.write_many([(path, start, rows), …])` refuse anything but
whole chunks or shards (MisalignedWriteError) and encode them directly (`_ChunkEncoder`); `.completed_blocks()`;
`.finalize(histograms=…, covered=…)` computes exact quantiles (from counts made while writing, the rest read back)
and top-k, then marks the store complete.

Errors (all store.errors.ActivationStoreError): MissingArrayError (also KeyError: unknown layer, probe, embedding,
level, image id), ImageIndexError (IndexError), IncompleteStoreError, StoreMismatchError (ValueError),
ChunkCorruptionError (IOError), StoreUnavailableError (ConnectionError), MisalignedWriteError (ValueError).

Layout (docs/STORE.md has the full description for readers without this code): DESIGN.md §3; format version 2
keeps each layer's maps as one chunk per image inside one shard per block. Every array has `dimension_names`, a
crc32c checksum after compression on every chunk (and on every shard index), and every chunk is written even when it
equals the fill value, so in a complete store a missing chunk is an error (ChunkCorruptionError), never fill values.
Object stores (s3://… through fsspec) get retries with backoff on transient faults, then StoreUnavailableError.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.errors import ContainsArrayError, ContainsGroupError, GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .errors import (
    ActivationStoreError,
    ChunkCorruptionError,
    MisalignedWriteError,
    StoreMismatchError,
)
from .stats import Float16Histogram, Float16Quantiles, TopK

__all__ = [
    "FORMAT_VERSION", "QUANTILE_LEVELS", "StoreLayout", "ActivationStore", "Probe", "create_store", "open_store",
    "store_exists", "info_main", "MissingArrayError", "IncompleteStoreError", "StoreUnavailableError",
    "ImageIndexError",
]

FORMAT_VERSION = 2  # 2: maps in shards of one block (version 1: one file per image and layer), still read
READABLE_VERSIONS = (1, 2)
QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
KIND = "conceptlens-activation-store"
_PROBE_MAP_CHUNK_BYTES = 4 << 20  # raw bytes per chunk of a probe's maps (e.g. 512 images of 64×64 float16)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


# -- errors (subclasses of store.errors.ActivationStoreError) --------------------------------------------------------
class MissingArrayError(ActivationStoreError, KeyError):
    """A layer, probe, embedding or quantile level that the store does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ImageIndexError(ActivationStoreError, IndexError):
    """An image index outside 0 … n_images-1."""


class IncompleteStoreError(ActivationStoreError):
    """The store's extraction has not finished: blocks are missing from its completion record."""


class StoreUnavailableError(ActivationStoreError, ConnectionError):
    """The storage behind the store failed (after retries) or refused access; the message names URL and key."""


# -- layout ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreLayout:
    """Shapes that fix every array of a store: created once from it, checked against it on resume."""

    image_ids: tuple[str, ...]
    image_size: tuple[int, int]  # (y, x) of the network input patches
    classes: tuple[str, ...]
    layers: Mapping[str, tuple[int, int, int]]  # dotted layer name → (unit, y, x) of its output
    block: int = 32  # images per aligned write block (chunk length of the per-image arrays)
    k: int = 16  # top-k images per unit
    levels: tuple[float, ...] = QUANTILE_LEVELS

    def __post_init__(self):
        if self.block < 1 or self.k < 1:
            raise ValueError(f"block and k must be >= 1, got block={self.block}, k={self.k}")
        if not self.image_ids:
            raise ValueError("a store needs at least one image")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("image ids must be unique")
        for name in self.layers:
            if not _NAME.match(name):
                raise ValueError(f"layer name {name!r} cannot be a zarr path component")

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_images // self.block)

    def to_attrs(self) -> dict:
        return {"image_ids": list(self.image_ids), "input_size": list(self.image_size),
                "classes": list(self.classes), "layers": list(self.layers), "block": self.block, "k": self.k,
                "quantile_levels": list(self.levels)}


@dataclass(frozen=True)
class _Spec:
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    fill: Any
    dims: tuple[str, ...]
    attrs: dict = field(default_factory=dict)
    shards: tuple[int, ...] | None = None  # shard shape: the unit a writer writes (chunks inside it are read alone)
    shuffle: bool = True  # blosc byte shuffle (see _codecs)


def _specs(layout: StoreLayout) -> list[_Spec]:
    n, b, (h, w) = layout.n_images, layout.block, layout.image_size
    c, k, L = len(layout.classes), layout.k, len(layout.levels)
    specs = [
        _Spec("images", (n, h, w), (b, h, w), "uint8", 0, ("image", "y", "x")),
        _Spec("labels", (n,), (b,), "int64", -1, ("image",)),
        _Spec("probs", (n, c), (b, c), "float32", float("nan"), ("image", "class"), {"classes": list(layout.classes)}),
        _Spec("progress", (layout.n_blocks,), (1,), "uint8", 0, ("block",),
              {"block": b, "meaning": "1 = every chunk of images block*i … block*(i+1)-1 is written"}),
    ]
    for name, (u, y, x) in layout.layers.items():
        p = f"layers/{name}"
        specs += [
            # one chunk per image (a map read is one chunk), one shard per block (one file per write: creating a
            # file costs ~0.1 ms of system time here, and one per image and layer was a third of extraction's cost)
            _Spec(f"{p}/maps", (n, u, y, x), (1, u, y, x), "float16", float("nan"), ("image", "unit", "y", "x"),
                  shards=(b, u, y, x), shuffle=False),
            _Spec(f"{p}/max", (n, u), (b, u), "float32", float("nan"), ("image", "unit")),
            _Spec(f"{p}/mean", (n, u), (b, u), "float32", float("nan"), ("image", "unit")),
            _Spec(f"{p}/quantiles", (u, L), (u, L), "float32", float("nan"), ("unit", "level"),
                  {"levels": list(layout.levels)}),
            _Spec(f"{p}/topk", (u, k), (u, k), "int32", -1, ("unit", "rank")),
            _Spec(f"{p}/topk_values", (u, k), (u, k), "float32", float("nan"), ("unit", "rank")),
        ]
    return specs


def _codecs(dtype: str, *, shuffle: bool = True) -> dict:
    """bytes → blosc (lz4, byte shuffle) → crc32c: every chunk carries a checksum of its stored bytes.

    shuffle=False for the layers' maps: about half of a ReLU map is exact zeros, which lz4 finds as long runs in the
    unshuffled bytes — smaller (0.66× of raw against 0.70× with shuffle, demo model) and 30 % faster to compress."""
    size = np.dtype(dtype).itemsize
    mode = ("shuffle" if size > 1 else "bitshuffle") if shuffle else "noshuffle"
    return {"serializer": BytesCodec(endian="little" if size > 1 else None),
            "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle=mode, typesize=size), Crc32cCodec()]}


class _ChunkEncoder:
    """Encodes whole chunks (or whole shards) of one array into the bytes zarr would store, without zarr's per-chunk work.

        >>> enc = _ChunkEncoder.of(array)            # None unless the codecs are bytes → blosc → crc32c (maybe sharded)
        >>> enc.key(3), enc.encode(rows)             # 'layers/f.9/maps/c/3/0/0/0', b'...<crc32c>'

    Extraction writes a few hundred chunks per block; through `array[a:b] = data` each one costs zarr a trip through
    its async codec pipeline with the GIL held, which starved the forward passes (0.2× of their throughput). Here a
    chunk is one blosc call and one crc32c call (both C code that releases the GIL), and a whole shard (the inner
    chunks one after another, then the index of (offset, length) pairs and its crc32c, as the zarr v3 sharding codec
    lays it out with its index at the end) is one store `set`. The bytes are the same as zarr's own encoding of the
    same data (tests compare them file by file), so readers cannot tell. Only chunking and sharding along the first
    axis is handled (every array the writer fills: (block, …) chunks, or (1, …) chunks in (block, …) shards).
    """

    _SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
    _EMPTY = np.uint64(2 ** 64 - 1)  # index entry of an inner chunk that is not stored

    def __init__(self, array: zarr.Array, blosc: BloscCodec, endian: str):
        import numcodecs

        self.path = array.path
        self.metadata = array.metadata
        self.inner = tuple(int(c) for c in array.chunks)  # (rows, …) of one encoded chunk
        self.sharded = array.shards is not None
        self.rows = int((array.shards or array.chunks)[0])  # rows of one stored object (a shard or a chunk)
        self.dtype = array.dtype.newbyteorder("<" if endian == "little" else ">") if array.dtype.itemsize > 1 \
            else array.dtype
        self.fill = array.metadata.fill_value
        self.blosc = numcodecs.Blosc(cname=blosc.cname.value, clevel=blosc.clevel,
                                     shuffle=self._SHUFFLE[blosc.shuffle.value], blocksize=blosc.blocksize,
                                     typesize=blosc.typesize)

    @classmethod
    def of(cls, array: zarr.Array) -> "_ChunkEncoder | None":
        codecs = tuple(array.metadata.codecs) if array.metadata.zarr_format == 3 else ()
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            shard = codecs[0]
            index = tuple(shard.index_codecs)
            if getattr(shard.index_location, "value", shard.index_location) != "end" or len(index) != 2 \
                    or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec) \
                    or getattr(index[0].endian, "value", index[0].endian) not in ("little", None):
                return None
            codecs = tuple(shard.codecs)
        if len(codecs) != 3 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec) \
                or not isinstance(codecs[2], Crc32cCodec):
            return None
        outer = array.shards or array.chunks
        if tuple(array.chunks[1:]) != tuple(array.shape[1:]) or tuple(outer[1:]) != tuple(array.shape[1:]):
            return None
        endian = getattr(codecs[0].endian, "value", codecs[0].endian) or "little"
        return cls(array, codecs[1], endian)

    def key(self, index: int) -> str:
        """Store key of stored object `index` along the first axis (a shard of a sharded array, else a chunk)."""
        return f"{self.path}/{self.metadata.encode_chunk_key((index,) + (0,) * (len(self.inner) - 1))}"

    def _packed(self, rows: np.ndarray) -> tuple[bytes, bytes]:
        """(compressed bytes, their crc32c as 4 little-endian bytes) of one chunk of rows."""
        if rows.shape[0] != self.inner[0]:  # a short last chunk is padded with the fill value, as zarr pads it
            full = np.full(self.inner, self.fill, self.dtype)
            full[:rows.shape[0]] = rows
            rows = full
        raw = np.ascontiguousarray(rows, dtype=self.dtype)
        packed = self.blosc.encode(raw.reshape(-1).view(np.uint8))
        return packed, google_crc32c.value(packed).to_bytes(4, "little")

    def encode(self, rows: np.ndarray) -> bytes:
        """Stored bytes of one chunk, or of one shard: rows (m, …), m ≤ self.rows; fewer only at the array's end.

        A shard's pieces are joined once at the end (joining each chunk with its checksum, then the chunks, then the
        index, copied the shard three times: 15 % of its encoding time)."""
        if not self.sharded:
            return b"".join(self._packed(rows))
        step = self.inner[0]
        parts, index, offset = [], np.full((self.rows // step, 2), self._EMPTY, "<u8"), 0
        for k, first in enumerate(range(0, rows.shape[0], step)):  # inner chunks past the array's end stay empty
            packed, crc = self._packed(rows[first:first + step])
            parts += (packed, crc)
            index[k] = (offset, len(packed) + 4)
            offset += len(packed) + 4
        table = index.tobytes()
        parts += (table, google_crc32c.value(table).to_bytes(4, "little"))
        return b"".join(parts)

    def index_nbytes(self) -> int:
        """Bytes of a shard's index with its checksum (at the end of every shard)."""
        return (self.rows // self.inner[0]) * 16 + 4


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the guarded zarr store: retries, checksums with names, missing chunks as errors ---------------------------------
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


def _is_chunk_key(key: str) -> bool:
    return not key.endswith("zarr.json") and ("/c/" in f"/{key}" or key == "c")


def _chunk_name(key: str) -> tuple[str, str]:
    """'layers/f.3/maps/c/5/0/0/0' → ('layers/f.3/maps', '(5, 0, 0, 0)')."""
    array, _, coords = f"/{key}".rpartition("/c")
    coords = coords.strip("/")
    return array.strip("/"), "(" + ", ".join(coords.split("/")) + ")" if coords else "()"


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    # botocore / aiohttp errors that s3fs does not map to OSError: connection and 5xx failures
    name = type(exc).__name__
    return any(s in name for s in ("Connection", "Timeout", "ServerError", "ServiceUnavailable", "Throttl",
                                   "ClientOSError", "ClientPayloadError", "IncompleteRead", "EndpointConnection"))


class GuardedStore(WrapperStore):
    """A zarr store wrapper: retries transient faults, verifies each chunk's crc32c, refuses missing chunks.

        >>> GuardedStore(LocalStore(path), url=str(path), strict=True)

    strict: a missing chunk key raises ChunkCorruptionError instead of reading as fill values (set once the
    completion record says every chunk was written; all chunks are written, also those equal to the fill value).
    """

    def __init__(self, store, *, url: str, retries: int = 3, backoff: float = 0.2, strict: bool = False):
        super().__init__(store)
        self.url, self.retries, self.backoff, self.strict = url, retries, backoff, strict
        # sharded arrays (path → (index bytes, shard rows, chunk rows)), registered as they are opened: a whole shard
        # ends with its index's crc32c, not one over all its bytes; its chunks carry their own (checked by zarr)
        self.shards: dict[str, tuple[int, int, int]] = {}

    def _with_store(self, store):
        other = type(self)(store, url=self.url, retries=self.retries, backoff=self.backoff, strict=self.strict)
        other.shards = self.shards
        return other

    def __repr__(self) -> str:
        return f"GuardedStore({self.url!r}, strict={self.strict})"

    async def _retry(self, op: str, key: str, call):
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except PermissionError as e:
                raise StoreUnavailableError(f"{self.url}: {op} {key!r} refused: access denied ({e})") from e
            except _PERMANENT:
                raise
            except Exception as e:  # noqa: BLE001 — classified just below; anything else is re-raised
                if isinstance(e, (ActivationStoreError, ValueError)) or not _transient(e):
                    raise
                last = e
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * (2 ** attempt))
        raise StoreUnavailableError(
            f"{self.url}: {op} {key!r} failed after {self.retries + 1} attempts: {type(last).__name__}: {last}"
        ) from last

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._retry("read", key, lambda: self._store.get(key, prototype, byte_range))
        if _is_chunk_key(key):
            if value is None:
                if self.strict:
                    array, chunk = _chunk_name(key)
                    raise ChunkCorruptionError(
                        f"{self.url}: array {array!r} {self._describe(array, chunk)} is missing although the store is "
                        f"complete (key {key!r})")
            elif byte_range is None:
                self._verify(key, value)
        return value

    def _describe(self, array: str, chunk: str) -> str:
        """'chunk (5, 0)', or for a sharded array 'shard (1, 0, 0, 0) (chunks (4, 0, 0, 0) … (7, 0, 0, 0))'."""
        if array not in self.shards:
            return f"chunk {chunk}"
        _, shard_rows, chunk_rows = self.shards[array]
        coords = [int(c) for c in chunk.strip("()").split(",")]
        first, rest = coords[0] * shard_rows // chunk_rows, ", ".join(str(c) for c in coords[1:])
        last = first + shard_rows // chunk_rows - 1
        return f"shard {chunk} (chunks ({first}, {rest}) … ({last}, {rest}))"

    def _verify(self, key: str, value: Buffer) -> None:
        data = value.as_numpy_array()
        array, chunk = _chunk_name(key)
        covered = self.shards[array][0] if array in self.shards else data.size  # a shard: its index's checksum
        tail = data[-covered:] if 4 <= covered <= data.size else data
        stored = bytes(tail[-4:])
        computed = np.uint32(google_crc32c.value(tail[:-4].tobytes())).tobytes() if tail.size >= 4 else b""
        if tail.size < 4 or stored != computed:
            raise ChunkCorruptionError(
                f"{self.url}: array {array!r} {self._describe(array, chunk)} fails its crc32c checksum (key {key!r}, "
                f"{data.size} bytes): the stored data is corrupted")

    async def _get_many(self, requests) -> AsyncGenerator:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        return await self._retry("check", key, lambda: self._store.exists(key))

    async def set(self, key: str, value: Buffer) -> None:
        await self._retry("write", key, lambda: self._store.set(key, value))

    async def _set_many(self, values) -> None:
        for key, value in values:
            await self.set(key, value)

    def put_many(self, items: Sequence[tuple[str, bytes]], *, concurrency: int = 32, atomic: bool = True) -> None:
        """Store whole encoded values under their keys, from the calling thread.

        A local directory is written right here (through zarr's event loop every put cost a thread hop and a mkdir,
        about 5× more): with `atomic`, each file is written aside and renamed into place as LocalStore does, so a
        concurrent reader never sees half a file; without, it is written in place (one system call less per file —
        extraction's blocks count only once their completion flag is written after them, so nobody reads them
        earlier, and a block cut short by a crash is written again). Any other store gets concurrent `set`s (at
        most `concurrency` in flight; an object store's put is atomic), retried like every write.
        """
        if isinstance(self._store, LocalStore):
            made: set[Path] = set()
            for key, data in items:
                self._put_file(key, data, made, atomic)
            return
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        make = default_buffer_prototype().buffer.from_bytes

        async def put_all():
            gate = asyncio.Semaphore(concurrency)

            async def put(key, data):
                async with gate:
                    await self.set(key, make(data))

            await asyncio.gather(*(put(k, d) for k, d in items))

        sync(put_all())

    def _put_file(self, key: str, data: bytes, made: set[Path], atomic: bool) -> None:
        path = Path(self._store.root) / key
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial") if atomic else path
            try:
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                with open(tmp, "wb") as f:
                    f.write(data)
                if atomic:
                    os.replace(tmp, path)
                return
            except PermissionError as e:
                if atomic:
                    tmp.unlink(missing_ok=True)
                raise StoreUnavailableError(f"{self.url}: write {key!r} refused: access denied ({e})") from e
            except OSError as e:  # a full or flaky disk: retried, then reported naming the key
                if atomic:
                    tmp.unlink(missing_ok=True)
                made.discard(path.parent)
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff * (2 ** attempt))
        raise StoreUnavailableError(
            f"{self.url}: write {key!r} failed after {self.retries + 1} attempts: {type(last).__name__}: {last}"
        ) from last


def _zarr_store(url: str, *, read_only: bool, storage_options: Mapping | None, retries: int) -> GuardedStore:
    url = str(url)
    if "://" in url and not url.startswith("file://"):
        opts = dict(storage_options or {})
        if url.startswith(("s3://", "s3a://")):
            # GuardedStore retries with backoff itself; s3fs's and botocore's own retry loops would multiply it
            opts.setdefault("config_kwargs", {"retries": {"max_attempts": 2, "mode": "standard"},
                                              "connect_timeout": 5, "read_timeout": 30})
        try:
            inner = FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
        except Exception as e:
            raise StoreUnavailableError(f"{url}: cannot reach the object store ({type(e).__name__}: {e})") from e
        if getattr(inner.fs, "retries", None) == 5:  # s3fs's default loop (~2 s per call), under ours
            inner.fs.retries = 2
    else:
        path = Path(url.removeprefix("file://")).expanduser()
        if read_only and not path.exists():
            raise ActivationStoreError(f"{url}: no activation store there (path does not exist)")
        inner = LocalStore(path, read_only=read_only)
    return GuardedStore(inner, url=url, retries=retries)


# -- the store object ------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """One concept probe's current version as stored: scores (image,), maps (image, y, x) or None, its mlflow run."""

    concept: str
    layer: str
    scores: np.ndarray
    maps: np.ndarray | None
    run_id: str
    attrs: dict


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class ActivationStore:
    """An opened activation store (use `open_store` / `create_store`, not this constructor)."""

    def __init__(self, group: zarr.Group, *, url: str, zstore: GuardedStore, read_only: bool):
        self._group = group
        self._zstore = zstore
        self.url = url
        self.read_only = read_only
        self._arrays: dict[str, zarr.Array] = {}
        self._memo: dict[tuple, np.ndarray] = {}
        self._probes: dict[str, tuple[tuple, Probe]] = {}  # probe path → (version, arrays), see probe()
        self._encoders: dict[str, tuple] = {}  # array path → (its metadata, _ChunkEncoder or None), see write_many
        self.attrs: dict = dict(group.attrs)
        self.image_ids: list[str] = list(self.attrs.get("image_ids", []))
        self.layers: list[str] = list(self.attrs.get("layers", []))
        self.classes: list[str] = list(self.attrs.get("classes", []))
        self._index: dict[str, int] | None = None

    def __repr__(self) -> str:
        return (f"ActivationStore({self.url!r}, images={self.n_images}, layers={self.layers}, "
                f"complete={self.complete}, read_only={self.read_only})")

    # -- basic facts --------------------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def block(self) -> int:
        return int(self.attrs["block"])

    @property
    def n_blocks(self) -> int:
        return -(-self.n_images // self.block)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def index_of(self, image_id: str) -> int:
        if self._index is None:
            self._index = {i: n for n, i in enumerate(self.image_ids)}
        try:
            return self._index[image_id]
        except KeyError:
            raise MissingArrayError(f"{self.url}: no image {image_id!r} in this store") from None

    def layer_shape(self, layer: str) -> tuple[int, int, int]:
        """(unit, y, x) of a layer's maps."""
        return tuple(self._array(f"layers/{self._layer(layer)}/maps").shape[1:])

    def _layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise MissingArrayError(f"{self.url}: no layer {layer!r} (layers: {', '.join(self.layers)})")
        return layer

    def _image(self, image: int) -> int:
        i = int(image)
        if not 0 <= i < self.n_images:
            raise ImageIndexError(f"{self.url}: image index {image} outside 0 … {self.n_images - 1}")
        return i

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            try:
                arr = self._group[path]
            except (KeyError, FileNotFoundError):
                raise MissingArrayError(f"{self.url}: no array {path!r}") from None
            if not isinstance(arr, zarr.Array):
                raise MissingArrayError(f"{self.url}: {path!r} is a group, not an array")
            if not self.read_only:
                arr = arr.with_config({"write_empty_chunks": True})
            if arr.shards is not None:
                inner = int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks)]))
                self._zstore.shards[path] = (inner * 16 + 4, int(arr.shards[0]), int(arr.chunks[0]))
            self._arrays[path] = arr
        return arr

    def _fresh_array(self, path: str) -> zarr.Array:
        """The array as stored now: probes and embeddings can be replaced by another process (new shape)."""
        self._arrays.pop(path, None)
        return self._array(path)

    def _memoized(self, key: tuple, read) -> np.ndarray:
        if key not in self._memo:
            self._memo[key] = _readonly(np.asarray(read()))
        return self._memo[key]

    def derived(self, key: tuple, compute) -> np.ndarray:
        """A statistic computed from this store (explain.labelrules.unit_mask_areas), kept read-only with the
        store's own cached arrays: once per store object, forgotten when the store is finalized again."""
        return self._memoized(("derived", *key), compute)

    # -- reading ------------------------------------------------------------------------------------------------------
    def images(self) -> np.ndarray:
        """uint8 (image, y, x): the network-input patches (cached per store object)."""
        return self._memoized(("images",), lambda: self._array("images")[:])

    def image(self, image: int) -> np.ndarray:
        """uint8 (y, x) of one image (reads its block's chunk unless images() is cached)."""
        i = self._image(image)
        if ("images",) in self._memo:
            return self._memo[("images",)][i]
        return self._array("images")[i]

    def labels(self) -> np.ndarray:
        """int64 (image,): ground-truth class index."""
        return self._memoized(("labels",), lambda: self._array("labels")[:])

    def probs(self) -> np.ndarray:
        """float32 (image, class): the model's output probabilities (classes in `.classes`)."""
        return self._memoized(("probs",), lambda: self._array("probs")[:])

    def maps(self, layer: str, image: int) -> np.ndarray:
        """float32 (unit, y, x): one image's maps for every unit of a layer — a single chunk read."""
        path = f"layers/{self._layer(layer)}/maps"
        arr, i = self._array(path), self._image(image)
        return self._checked(path, lambda: arr[i], [i]).astype(np.float32)

    def _checked(self, path: str, read, images: Iterable[int]):
        """read(), with a checksum failure that zarr's codecs find inside a shard (they raise ValueError) reported as
        ChunkCorruptionError naming the array and the first failing chunk among `images`."""
        try:
            return read()
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            arr, bad = self._array(path), None
            for i in images:
                try:
                    arr[int(i)]
                except ValueError:
                    bad = int(i)
                    break
            where = "a chunk" if bad is None else f"chunk ({bad}{', 0' * (arr.ndim - 1)})"
            raise ChunkCorruptionError(f"{self.url}: array {path!r} {where} fails its crc32c checksum (or the index "
                                       f"of its shard does): the stored data is corrupted") from None

    def maps_many(self, layer: str, images: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (image, unit, y, x) for the given image indices, in the order given.

        Each run of consecutive images is one plain slice of the array: zarr reads a run of chunks about three times
        as fast as the same chunks picked by an index array (the demo store's 3276 images: 2.8 s against 8.9 s; the
        935 showing a mass, in 358 runs: 1.7 s against 3.5 s), and an index array is never faster."""
        arr = self._array(f"layers/{self._layer(layer)}/maps")
        idx = np.asarray([self._image(i) for i in np.asarray(images).ravel()], dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0, *arr.shape[1:]), np.float32)
        uniq, inverse = np.unique(idx, return_inverse=True)
        starts = np.flatnonzero(np.diff(uniq, prepend=-2) != 1)  # where each run begins, in uniq
        ends = np.append(starts[1:], len(uniq))

        def read() -> np.ndarray:
            data = np.empty((len(uniq), *arr.shape[1:]), arr.dtype)
            for a, b in zip(starts.tolist(), ends.tolist()):
                data[a:b] = arr[int(uniq[a]):int(uniq[b - 1]) + 1]
            return data

        return self._checked(arr.path, read, uniq.tolist())[inverse].astype(np.float32)

    def pooled(self, layer: str, stat: str = "max") -> np.ndarray:
        """float32 (image, unit): spatial max or mean of each unit's map per image (cached per store object)."""
        if stat not in ("max", "mean"):
            raise ValueError(f"pooled: stat must be 'max' or 'mean', got {stat!r}")
        path = f"layers/{self._layer(layer)}/{stat}"
        return self._memoized((path,), lambda: self._array(path)[:])

    def quantile_levels(self, layer: str) -> tuple[float, ...]:
        return tuple(float(q) for q in self._array(f"layers/{self._layer(layer)}/quantiles").attrs["levels"])

    def quantiles(self, layer: str) -> np.ndarray:
        """float32 (unit, level): per-unit quantiles over all positions of all images (levels: quantile_levels)."""
        path = f"layers/{self._layer(layer)}/quantiles"
        return self._memoized((path,), lambda: self._array(path)[:])

    def thresholds(self, layer: str, level: float = 0.99) -> np.ndarray:
        """float32 (unit,): each unit's activation quantile at `level` (the Network Dissection threshold)."""
        levels = self.quantile_levels(layer)
        match = [j for j, q in enumerate(levels) if abs(q - float(level)) < 1e-12]
        if not match:
            raise MissingArrayError(f"{self.url}: layer {layer!r} has no quantile level {level} (levels: {levels})")
        return self.quantiles(layer)[:, match[0]]

    def topk(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(image indices int32 (unit, k), values float32 (unit, k)): each unit's images with the largest max."""
        p = f"layers/{self._layer(layer)}"
        return (self._memoized((f"{p}/topk",), lambda: self._array(f"{p}/topk")[:]),
                self._memoized((f"{p}/topk_values",), lambda: self._array(f"{p}/topk_values")[:]))

    # -- probes -------------------------------------------------------------------------------------------------------
    def _probe_path(self, concept: str, layer: str) -> str:
        if not _NAME.match(str(concept)):
            raise ValueError(f"concept {concept!r}: use letters, digits, '_', '.', '-'")
        return f"probes/{concept}@{self._layer(layer)}"

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ActivationStoreError(f"{self.url}: opened read-only; open_store(..., read_only=False) to {what}")

    def _put_whole(self, path: str, data: np.ndarray, *, chunks: tuple[int, ...], fill, dims, attrs=None) -> None:
        """Write a whole array, creating it if absent; an array of another shape or dtype is replaced."""
        try:
            arr = self._fresh_array(path)
            if arr.shape != data.shape or arr.dtype != data.dtype:
                del self._group[path]
                self._arrays.pop(path, None)
                arr = None
        except MissingArrayError:
            arr = None
        if arr is None:
            self._group.create_array(path, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=fill,
                                     dimension_names=dims, overwrite=False, **_codecs(data.dtype.str))
            arr = self._array(path)
        self.write_many([(path, 0, data)])
        if attrs:
            arr.attrs.update(attrs)

    def write_probe(self, concept: str, layer: str, *, scores: np.ndarray, maps: np.ndarray | None, run_id: str,
                    attrs: Mapping | None = None) -> None:
        """Store a probe version's scores float32 (image,) and maps (image, y, x) as float16, tagged with run_id."""
        self._writable("write probes")
        path = self._probe_path(concept, layer)
        scores = np.asarray(scores, np.float32)
        if scores.shape != (self.n_images,):
            raise ValueError(f"{self.url}/{path}: scores shape {scores.shape} != ({self.n_images},)")
        if maps is not None:
            maps = np.asarray(maps, np.float16)
            if maps.ndim != 3 or maps.shape[0] != self.n_images:
                raise ValueError(f"{self.url}/{path}: maps shape {maps.shape} is not ({self.n_images}, y, x)")
        group = self._group.require_group(path)
        # few, large chunks: a probe version is always written and read whole (retraining writes one per annotation)
        self._put_whole(f"{path}/scores", scores, chunks=scores.shape, fill=float("nan"), dims=("image",))
        if maps is not None:
            rows = max(1, min(self.n_images, _PROBE_MAP_CHUNK_BYTES // max(1, maps[0].nbytes)))
            self._put_whole(f"{path}/maps", maps, chunks=(rows, *maps.shape[1:]), fill=float("nan"),
                            dims=("image", "y", "x"))
        elif "maps" in group:
            del group["maps"]
            self._arrays.pop(f"{path}/maps", None)
        # the run id goes last: it names the version whose data is now in place
        group.attrs.update({**dict(attrs or {}), "concept": concept, "layer": layer, "run_id": str(run_id),
                            "updated": _now(), "write_id": uuid.uuid4().hex})

    def probe(self, concept: str, layer: str) -> Probe:
        """The probe version in place now. Its arrays are read once per write (run id, write id) per store object:
        each call reads only the probe's attributes, so calling it per image is cheap."""
        path = self._probe_path(concept, layer)
        try:
            group = self._group[path]  # metadata read now: another worker may have written a new version
        except KeyError:
            raise MissingArrayError(f"{self.url}: no probe {concept!r} on layer {layer!r}") from None
        attrs = dict(group.attrs)
        version = (attrs.get("run_id"), attrs.get("write_id"))
        cached = self._probes.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        scores = _readonly(self._fresh_array(f"{path}/scores")[:])
        maps = _readonly(self._fresh_array(f"{path}/maps")[:].astype(np.float32)) if "maps" in group else None
        probe = Probe(concept=concept, layer=layer, scores=scores, maps=maps, run_id=str(attrs.get("run_id", "")),
                      attrs=attrs)
        self._probes[path] = (version, probe)
        return probe

    def probes(self) -> list[tuple[str, str]]:
        """(concept, layer) of every stored probe, sorted."""
        if "probes" not in self._group:
            return []
        return sorted(tuple(name.rsplit("@", 1)) for name in self._group["probes"].group_keys() if "@" in name)

    def delete_probe(self, concept: str, layer: str) -> None:
        self._writable("delete probes")
        path = self._probe_path(concept, layer)
        if path not in self._group:
            raise MissingArrayError(f"{self.url}: no probe {concept!r} on layer {layer!r}")
        del self._group[path]
        self._probes.pop(path, None)
        for key in [k for k in self._arrays if k.startswith(path + "/")]:
            del self._arrays[key]

    # -- embeddings ---------------------------------------------------------------------------------------------------
    def _embedding_path(self, layer: str, kind: str) -> str:
        if not _NAME.match(str(kind)):
            raise ValueError(f"embedding kind {kind!r}: use letters, digits, '_', '.', '-'")
        return f"layers/{self._layer(layer)}/embedding/{kind}"

    def write_embedding(self, layer: str, kind: str, coords: np.ndarray, *, over: str | None = None,
                        attrs: Mapping | None = None) -> None:
        """Cache coordinates float32 (unit|image, component) under layers/<layer>/embedding/<kind>.

        `over` is "unit" or "image"; by default it comes from the kind's prefix (unit_umap, image_pca) or the row
        count (units of the layer, or images).
        """
        self._writable("write embeddings")
        path = self._embedding_path(layer, kind)
        coords = np.asarray(coords, np.float32)
        units = self.layer_shape(layer)[0]
        if over is None:
            over = next((p for p in ("unit", "image") if kind.startswith(p)), None)
        if over is None:
            matches = [p for p, n in (("unit", units), ("image", self.n_images)) if coords.shape[0] == n]
            if len(matches) != 1:
                raise ValueError(f"{self.url}/{path}: say over='unit' or over='image' for {coords.shape[0]} rows")
            over = matches[0]
        expected = units if over == "unit" else self.n_images
        if over not in ("unit", "image") or coords.ndim != 2 or coords.shape[0] != expected:
            raise ValueError(f"{self.url}/{path}: coords shape {coords.shape} is not ({expected}, component) "
                             f"for over={over!r}")
        self._put_whole(path, coords, chunks=coords.shape, fill=float("nan"), dims=(over, "component"),
                        attrs={**dict(attrs or {}), "kind": kind, "over": over, "updated": _now()})

    def embedding(self, layer: str, kind: str) -> np.ndarray:
        """float32 (unit|image, component); MissingArrayError (a KeyError) when it was never computed."""
        return self._fresh_array(self._embedding_path(layer, kind))[:]

    def embedding_attrs(self, layer: str, kind: str) -> dict:
        return dict(self._fresh_array(self._embedding_path(layer, kind)).attrs)

    def embeddings(self, layer: str) -> list[str]:
        p = f"layers/{self._layer(layer)}/embedding"
        return sorted(self._group[p].array_keys()) if p in self._group else []

    # -- unit mask areas ----------------------------------------------------------------------------------------------
    def _mask_area_path(self, layer: str, level: float) -> str:
        return f"layers/{self._layer(layer)}/mask_area/{float(level)!r}"

    def write_mask_areas(self, layer: str, level: float, areas: np.ndarray) -> None:
        """Cache int32 (image, unit): the pixels of each unit's mask (its map upsampled to the patch, above its `level`
        quantile) on every image, under layers/<layer>/mask_area/<level> (explain.labelrules.unit_mask_areas)."""
        self._writable("write mask areas")
        if float(level) not in self.quantile_levels(layer):
            raise ValueError(f"{self.url}: level {level} is not one of the store's quantile levels "
                             f"{list(self.quantile_levels(layer))}")
        areas = np.asarray(areas)
        expected = (self.n_images, self.layer_shape(layer)[0])
        h, w = self.attrs["input_size"]
        if areas.shape != expected or not np.issubdtype(areas.dtype, np.integer) or areas.size and (
                areas.min() < 0 or areas.max() > h * w):
            raise ValueError(f"{self.url}: mask areas of {layer!r} must be integer pixel counts 0 … {h * w} shaped "
                             f"{expected} (image, unit), got {areas.dtype} {areas.shape}")
        rows = min(expected[0], max(1, (16 << 20) // (4 * max(1, expected[1]))))  # chunks of at most 16 MiB
        self._put_whole(self._mask_area_path(layer, level), areas.astype(np.int32), chunks=(rows, expected[1]),
                        fill=-1, dims=("image", "unit"), attrs={"level": float(level), "updated": _now()})

    def mask_areas(self, layer: str, level: float) -> np.ndarray | None:
        """The cached int32 (image, unit) mask areas at `level` (read-only), or None when they were never written."""
        try:
            return _readonly(self._fresh_array(self._mask_area_path(layer, level))[:])
        except MissingArrayError:
            return None

    # -- writing (extraction) -----------------------------------------------------------------------------------------
    def block_range(self, block: int) -> tuple[int, int]:
        """Image rows [start, stop) of a write block."""
        if not 0 <= block < self.n_blocks:
            raise ValueError(f"{self.url}: block {block} outside 0 … {self.n_blocks - 1}")
        return block * self.block, min((block + 1) * self.block, self.n_images)

    def completed_blocks(self) -> np.ndarray:
        """bool (block,): blocks whose every chunk is written (the completion record; missing chunks read 0)."""
        return self._array("progress")[:] == 1

    def write_aligned(self, path: str, start: int, data: np.ndarray) -> None:
        """Write rows start … start+len(data) of an array; MisalignedWriteError unless they are whole chunks."""
        self._writable("write")
        self.write_many([(path, start, data)])

    def _aligned(self, path: str, start: int, data: np.ndarray) -> np.ndarray:
        """data as the array's dtype; MisalignedWriteError unless rows start … start+len(data) are whole chunks."""
        arr = self._array(path)
        data = np.asarray(data)
        if data.ndim == 0:
            raise MisalignedWriteError(f"{self.url}: write to {path!r} refused: a scalar is not rows")
        stop = start + data.shape[0]
        chunk = (arr.shards or arr.chunks)[0]  # a writer writes whole shards of a sharded array
        problems = []
        if data.shape[1:] != arr.shape[1:]:
            problems.append(f"trailing shape {data.shape[1:]} != {arr.shape[1:]}")
        if start < 0 or stop > arr.shape[0] or stop <= start:
            problems.append(f"rows {start}:{stop} outside 0:{arr.shape[0]}")
        if start % chunk or (stop % chunk and stop != arr.shape[0]):
            unit = "shard" if arr.shards else "chunk"
            problems.append(f"rows {start}:{stop} do not start and end on {unit} boundaries ({unit} {chunk})")
        if problems:
            raise MisalignedWriteError(f"{self.url}: write to {path!r} refused: {'; '.join(problems)}")
        return data.astype(arr.dtype, copy=False)

    def write_block(self, block: int, *, images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                    layers: Mapping[str, Mapping[str, np.ndarray]], executor=None) -> None:
        """Write every per-image array of one block, then record the block in `progress`.

        images uint8 (n, y, x), labels (n,), probs (n, class), layers[name] = {"maps": (n, unit, y, x),
        "max": (n, unit), "mean": (n, unit)} with n the block's length; every layer of the store must be given.
        executor: a concurrent.futures executor that compresses the chunks in parallel (see write_many).
        """
        start, stop = self.block_range(block)
        missing = set(self.layers) - set(layers)
        if missing:
            raise ValueError(f"{self.url}: block {block} lacks layers {sorted(missing)}")
        writes = [("images", images), ("labels", labels), ("probs", probs)]
        writes += [(f"layers/{name}/{stat}", layers[name][stat]) for name in self.layers
                   for stat in ("maps", "max", "mean")]
        # not atomic: a block counts only once `progress` says so, after all of its chunks are in place
        self.write_many([(path, start, data) for path, data in writes], executor=executor, atomic=False)
        self.write_many([("progress", block, np.ones(1, np.uint8))])  # after the data: a recorded block is a written block

    def write_many(self, writes: Sequence[tuple[str, int, np.ndarray]], *, executor=None,
                   concurrency: int = 32, atomic: bool = True) -> None:
        """Several `write_aligned(path, start, rows)` at once: every write is checked before any is made, chunks are
        encoded here (blosc and crc32c release the GIL; with `executor`, by its threads in parallel) and stored with
        up to `concurrency` puts in flight on an object store (`atomic`: see GuardedStore.put_many)."""
        self._writable("write")
        checked = [(path, start, self._aligned(path, start, data)) for path, start, data in writes]
        todo, slow = [], []  # (encoder, chunk index, rows)
        for path, start, data in checked:
            enc = self._encoder(path)
            if enc is None:
                slow.append((path, start, data))
                continue
            todo += [(enc, (start + first) // enc.rows, data[first:first + enc.rows])
                     for first in range(0, data.shape[0], enc.rows)]

        def store(part):  # each part's chunks are stored by the thread that encoded them
            puts = [(enc.key(c), enc.encode(rows)) for enc, c, rows in part]
            if puts:
                self._zstore.put_many(puts, concurrency=concurrency, atomic=atomic)

        if executor is None or len(todo) < 2:
            store(todo)
        else:
            parts = [todo[i::4] for i in range(4)]  # interleaved: large and small chunks spread evenly
            list(executor.map(store, parts))
        for path, start, data in slow:  # arrays with other codecs (none that create_store makes): zarr writes them
            self._array(path)[start:start + data.shape[0]] = data

    def _encoder(self, path: str) -> "_ChunkEncoder | None":
        arr = self._array(path)
        cached = self._encoders.get(path)
        if cached is None or cached[0] is not arr.metadata:  # a probe or embedding array may have been replaced
            cached = self._encoders[path] = (arr.metadata, _ChunkEncoder.of(arr))
        return cached[1]

    def finalize(self, *, histograms: Mapping[str, Float16Histogram] | None = None,
                 tops: Mapping[str, TopK] | None = None, covered: Iterable[int] = (), progress=None) -> None:
        """Compute per-unit quantiles and top-k, then mark the store complete.

        Quantiles are exact over the stored float16 maps. `histograms[layer]` may already hold the counts of the
        blocks in `covered` (extraction counts the maps it writes, so they need not be read back); every other block
        is read from the store. A layer without a histogram is done by a two-pass radix select over the store
        (Float16Quantiles: same numbers, less memory). Top-k comes from the stored `max` array, or, for the blocks in
        `covered`, from `tops[layer]` fed with the same values while they were written (ties go to the lower image
        index either way, so the result does not depend on the order). `covered` are blocks whose completion flag was
        written by the caller: when they are all the blocks, the flags are not read back.
        `progress(done, total)` is called after each block read.
        """
        self._writable("finalize")
        histograms, tops, covered = dict(histograms or {}), dict(tops or {}), set(int(b) for b in covered)
        if not covered >= set(range(self.n_blocks)):
            done = self.completed_blocks()
            if not done.all():
                missing = np.flatnonzero(~done)
                raise IncompleteStoreError(f"{self.url}: cannot finalize, {missing.size} block(s) not written "
                                           f"(first: {missing[:8].tolist()})")
        self._zstore.strict = True  # every chunk must exist from here on
        levels = tuple(float(q) for q in self.attrs["quantile_levels"])
        k = int(self.attrs["k"])
        reads = {name: ([b for b in range(self.n_blocks) if b not in covered], 1) if name in histograms
                 else (list(range(self.n_blocks)), Float16Quantiles.passes) for name in self.layers}
        total, step = sum(len(blocks) * passes for blocks, passes in reads.values()), 0
        for name in self.layers:
            p = f"layers/{name}"
            maps = self._array(f"{p}/maps")
            units = maps.shape[1]
            sketch = histograms[name] if name in histograms else Float16Quantiles(units, levels)
            blocks, passes = reads[name]
            for _ in range(passes):
                for b in blocks:
                    start, stop = self.block_range(b)
                    sketch.add(self._checked(maps.path, lambda: maps[start:stop], range(start, stop)))
                    step += 1
                    if progress:
                        progress(step, total)
                if passes > 1:
                    sketch.end_pass()
            top = TopK(units, k)
            if name in tops:
                top.merge(tops[name])
            maxima = self._array(f"{p}/max")
            for start, stop in self._row_runs([b for b in range(self.n_blocks) if b not in covered or
                                               name not in tops]):
                top.add(maxima[start:stop], start=start)  # (image, unit) float32: small
            idx, val = top.result()
            q = sketch.quantiles(levels) if name in histograms else sketch.quantiles()
            self._array(f"{p}/quantiles")[...] = q
            self._array(f"{p}/topk")[...] = idx
            self._array(f"{p}/topk_values")[...] = val
        self._set_attrs({"complete": True, "finished": _now()})
        self._memo.clear()

    def _row_runs(self, blocks: Sequence[int]) -> list[tuple[int, int]]:
        """(start, stop) image rows of each run of consecutive blocks (sorted block indices): one read per run."""
        runs: list[tuple[int, int]] = []
        for b in blocks:
            start, stop = self.block_range(b)
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        return runs

    def _set_attrs(self, values: Mapping) -> None:
        self._group.attrs.update(dict(values))
        self.attrs.update(dict(values))

    # -- whole-store views --------------------------------------------------------------------------------------------
    def arrays(self) -> list[tuple[str, zarr.Array]]:
        """(path, array) of every array in the store, sorted by path."""
        out = []

        def walk(group: zarr.Group, prefix: str):
            for name, member in group.members():
                path = f"{prefix}{name}"
                if isinstance(member, zarr.Array):
                    out.append((path, member))
                else:
                    walk(member, path + "/")

        walk(self._group, "")
        return sorted(out, key=lambda t: t[0])


# -- opening and creating ---------------------------------------------------------------------------------------------
def _model_id(m: Mapping) -> str:
    parts = [f"{m.get('name')}/{m.get('version')}" if m.get("version") not in (None, "") else "",
             f"run {m['run_id']}" if m.get("run_id") else "", str(m.get("model_uri") or "")]
    return " ".join(p for p in parts if p) or "<unknown model>"


def _check_model(url: str, stored: Mapping, expected) -> None:
    if hasattr(expected, "meta"):
        expected = expected.meta
    if isinstance(expected, Mapping):
        pairs = [(k, stored.get(k), expected.get(k)) for k in ("run_id", "name", "version")]
        pairs = [(k, a, b) for k, a, b in pairs if a not in (None, "") and b not in (None, "")]
        if not pairs:
            pairs = [("model_uri", stored.get("model_uri"), expected.get("model_uri"))]
        ok = all(str(a) == str(b) for _, a, b in pairs)
        shown = _model_id(expected)
    else:
        e = str(expected)
        ok = e in {str(stored.get("model_uri")), str(stored.get("run_id")),
                   f"models:/{stored.get('name')}/{stored.get('version')}"}
        shown = e
    if not ok:
        raise StoreMismatchError(f"{url}: store was made from model {_model_id(stored)}, not {shown}; "
                                 f"re-extract it for this model (python -m store extract)")


def _dataset_sha(expected) -> str:
    if hasattr(expected, "sha256"):
        return str(expected.sha256)
    e = str(expected)
    if re.fullmatch(r"[0-9a-f]{64}", e):
        return e
    from .manifest import file_sha256

    if not Path(e).is_file():
        raise ValueError(f"expect_dataset={expected!r} is neither a sha256, a Manifest nor a manifest file")
    return file_sha256(e)


def _check_dataset(url: str, stored: Mapping, expected) -> None:
    sha = _dataset_sha(expected)
    if stored.get("sha256") != sha:
        raise StoreMismatchError(f"{url}: store was made from dataset {stored.get('manifest')!r} "
                                 f"(sha256 {stored.get('sha256')}), not sha256 {sha}; re-extract it for this dataset")


def _open_group(url: str, *, read_only: bool, storage_options, retries: int) -> tuple[zarr.Group, GuardedStore]:
    zstore = _zarr_store(url, read_only=read_only, storage_options=storage_options, retries=retries)
    try:
        group = zarr.open_group(zstore, mode="r" if read_only else "r+", zarr_format=3)
    except (GroupNotFoundError, FileNotFoundError, KeyError) as e:
        raise ActivationStoreError(f"{url}: no activation store there ({type(e).__name__})") from None
    if group.attrs.get("kind") != KIND:
        raise ActivationStoreError(f"{url}: a zarr group, but not a ConceptLens activation store (no kind={KIND!r})")
    version = group.attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ActivationStoreError(f"{url}: format version {version} is not one this ConceptLens reads "
                                   f"({', '.join(map(str, READABLE_VERSIONS))}); re-extract the store")
    return group, zstore


def store_exists(url: str, *, storage_options: Mapping | None = None) -> bool:
    """True when a zarr group exists at url (complete or not); an unreachable object store raises, never False."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://")).expanduser()
        if not (path / "zarr.json").is_file():
            return False
    zstore = _zarr_store(url, read_only=True, storage_options=storage_options, retries=3)
    try:
        zarr.open_group(zstore, mode="r", zarr_format=3)
        return True
    except (GroupNotFoundError, FileNotFoundError, KeyError):
        return False


def open_store(url: str, *, read_only: bool = True, expect_model=None, expect_dataset=None,
               allow_incomplete: bool = False, storage_options: Mapping | None = None,
               retries: int = 3) -> ActivationStore:
    """Open a store by path or fsspec URL.

        >>> s = open_store("s3://bucket/demo.zarr", storage_options={"endpoint_url": "http://127.0.0.1:9000"})

    expect_model: a LoadedModel, its meta dict, a model URI or a run id; expect_dataset: a Manifest, a manifest path
    or its sha256 — StoreMismatchError names both sides when the store was made from others.
    An incomplete store (extraction unfinished) raises IncompleteStoreError unless allow_incomplete (or writable).
    """
    url = str(url)
    group, zstore = _open_group(url, read_only=read_only, storage_options=storage_options, retries=retries)
    store = ActivationStore(group, url=url, zstore=zstore, read_only=read_only)
    if read_only and not store.complete and not allow_incomplete:
        raise IncompleteStoreError(f"{url}: extraction has not finished; rerun `python -m store extract` to resume")
    zstore.strict = store.complete
    if expect_model is not None:
        _check_model(url, store.attrs.get("model", {}), expect_model)
    if expect_dataset is not None:
        _check_dataset(url, store.attrs.get("dataset", {}), expect_dataset)
    return store


def _identity(attrs: Mapping) -> dict:
    """What must match for an existing store to be resumed instead of refused."""
    keys = ("kind", "format_version", "model", "dataset", "transform", "image_ids", "input_size", "classes",
            "layers", "block", "k", "quantile_levels")
    return {k: attrs.get(k) for k in keys}


def create_store(url: str, *, attrs: Mapping, layout: StoreLayout, exist_ok: bool = False,
                 storage_options: Mapping | None = None, retries: int = 3) -> ActivationStore:
    """Create a writable store with every array of `layout` (each created once, never overwritten).

        >>> create_store(url, attrs={"model": meta_subset, "dataset": {"manifest": p, "sha256": h},
        ...                          "transform": {"mean": .5, "std": .25}}, layout=StoreLayout(...))

    attrs must hold "model" (model_uri, run_id, name, version), "dataset" (manifest, sha256) and "transform".
    With exist_ok, an existing store made for the same model, dataset and layout is opened for resuming (arrays that a
    killed creation left out are added); one made for others raises StoreMismatchError. Without it, an existing
    store raises ActivationStoreError.
    """
    url = str(url)
    for key in ("model", "dataset", "transform"):
        if key not in attrs:
            raise ValueError(f"create_store: attrs lack {key!r}")
    root_attrs = {**dict(attrs), **layout.to_attrs(), "kind": KIND, "format_version": FORMAT_VERSION,
                  "created": _now(), "complete": False, "finished": None,
                  "dimension_note": "every array names its dimensions (zarr v3 dimension_names)"}
    root_attrs = json.loads(json.dumps(root_attrs))  # plain JSON types only (tuples → lists)
    zstore = _zarr_store(url, read_only=False, storage_options=storage_options, retries=retries)
    try:
        group = zarr.create_group(zstore, attributes=root_attrs, overwrite=False, zarr_format=3)
    except (ContainsGroupError, ContainsArrayError, FileExistsError):
        if not exist_ok:
            raise ActivationStoreError(f"{url}: a store already exists there; open_store it or choose another name")
        group, zstore = _open_group(url, read_only=False, storage_options=storage_options, retries=retries)
        have, want = _identity(group.attrs), _identity(root_attrs)
        if have != want:
            diff = [k for k in want if have.get(k) != want.get(k)]
            if "model" in diff:
                _check_model(url, have.get("model") or {}, want["model"])
            if "dataset" in diff:
                _check_dataset(url, have.get("dataset") or {}, want["dataset"]["sha256"])
            raise StoreMismatchError(f"{url}: existing store differs in {', '.join(diff)}; "
                                     f"remove it or extract into another store")
    for spec in _specs(layout):
        _ensure_array(group, spec, url)
    store = ActivationStore(group, url=url, zstore=zstore, read_only=False)
    zstore.strict = store.complete
    return store


def _ensure_array(group: zarr.Group, spec: _Spec, url: str) -> None:
    """Create the array unless it exists; an existing one must match the spec (it is never recreated)."""
    try:
        group.create_array(spec.path, shape=spec.shape, chunks=spec.chunks, shards=spec.shards, dtype=spec.dtype,
                           fill_value=spec.fill, dimension_names=spec.dims, attributes=spec.attrs or None,
                           overwrite=False, **_codecs(spec.dtype, shuffle=spec.shuffle))
        return
    except (ContainsArrayError, ContainsGroupError, FileExistsError):
        pass
    arr = group[spec.path]
    if not isinstance(arr, zarr.Array) or arr.shape != spec.shape or arr.chunks != spec.chunks \
            or arr.shards != spec.shards or arr.dtype != np.dtype(spec.dtype):
        raise StoreMismatchError(f"{url}: existing array {spec.path!r} does not match the layout "
                                 f"(shape {getattr(arr, 'shape', None)} vs {spec.shape})")


# -- `python -m store info` -------------------------------------------------------------------------------------------
def describe(store: ActivationStore) -> str:
    """Human-readable attributes and arrays of a store."""
    attrs = dict(store.attrs)
    ids = attrs.pop("image_ids", [])
    first = ", ".join(ids[:3]) + (" …" if len(ids) > 3 else "")
    lines = [f"store {store.url}", f"  images: {len(ids)} (first ids: {first})"]
    for key in sorted(attrs):
        lines.append(f"  {key}: {json.dumps(attrs[key], sort_keys=True)}")
    lines.append("arrays:")
    for path, arr in store.arrays():
        dims = ", ".join(arr.metadata.dimension_names or ())
        shards = f" shards {arr.shards}" if arr.shards else ""
        lines.append(f"  {path:<44} {str(arr.dtype):<8} ({dims}) shape {arr.shape} chunks {arr.chunks}{shards}")
    return "\n".join(lines)


def info_main(argv: list[str] | None = None) -> int:
    """`python -m store info <store>`: print a store's attributes and arrays (name, path or URL)."""
    from .settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m store info", description=info_main.__doc__)
    ap.add_argument("store", help="store name (demo → <workspace>/stores/demo.zarr), path or fsspec URL")
    ap.add_argument("--workspace", default=None)
    args = ap.parse_args(argv)
    url = load_settings(args.workspace).store_url(args.store)
    try:
        store = open_store(url, allow_incomplete=True)
    except ActivationStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(store))
    return 0
