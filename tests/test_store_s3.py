"""The activation store on object storage: extraction into S3 (moto on loopback) and faults of the object store.

Every fault ends in a retry that succeeds or in a hard error naming the URL and key — never in fill values.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import s3fs
import torch

from helpers_store import MotoS3, assert_same_arrays, make_patch_manifest, store_arrays, tiny_model
from store.activations import StoreUnavailableError, open_store
from store.errors import ChunkCorruptionError
from store.extract import ExtractConfig, extract

torch.set_num_threads(1)
CONFIG = dict(batch_size=4, block=4, k=3, progress_bar=False, threads=1)


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def stores(s3, real_dicoms, tmp_path_factory):
    """The same extraction into a local directory and into S3."""
    root = tmp_path_factory.mktemp("s3data")
    manifest = make_patch_manifest(root, real_dicoms, n=10, size=32)
    net, meta = tiny_model()
    local = str(root / "local.zarr")
    extract(net, meta=meta, manifest=manifest, url=local, config=ExtractConfig(**CONFIG))
    remote = s3.url("extract/demo.zarr")
    extract(net, meta=meta, manifest=manifest, url=remote,
            config=ExtractConfig(storage_options=dict(s3.options), **CONFIG))
    return {"local": local, "s3": remote, "manifest": manifest, "net": net, "meta": meta}


def test_extraction_into_s3_equals_local_and_reruns_as_a_no_op(s3, stores):
    assert_same_arrays(store_arrays(stores["s3"], s3.options), store_arrays(stores["local"]))
    s = open_store(stores["s3"], expect_model=stores["meta"], expect_dataset=stores["manifest"],
                   storage_options=s3.options)
    np.testing.assert_array_equal(s.maps("features.4", 3), open_store(stores["local"]).maps("features.4", 3))
    again = extract(stores["net"], meta=stores["meta"], manifest=stores["manifest"], url=stores["s3"],
                    config=ExtractConfig(storage_options=dict(s3.options), **CONFIG))
    assert again.reused


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_refused_connection_is_a_clear_error(s3):
    url = s3.url("extract/demo.zarr")
    opts = {**s3.options, "endpoint_url": f"http://127.0.0.1:{_closed_port()}",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError) as e:
        open_store(url, storage_options=opts, retries=1)
    assert url in str(e.value) and "zarr.json" in str(e.value) and "2 attempts" in str(e.value)
    assert isinstance(e.value, ConnectionError)
    assert time.monotonic() - t0 < 60


class Faults:
    """Injects faults into s3fs reads of chunk keys that match `match` (below zarr and our store wrapper)."""

    def __init__(self, monkeypatch, *, match: str, error, times: int | None):
        self.match, self.error, self.left, self.calls = match, error, times, 0
        original = s3fs.S3FileSystem._cat_file

        async def cat_file(fs, path, *args, **kwargs):
            if self.match in path and (self.left is None or self.left > 0):
                self.calls += 1
                if self.left is not None:
                    self.left -= 1
                raise self.error
            return await original(fs, path, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", cat_file)


def test_transient_5xx_faults_are_retried(s3, stores, monkeypatch):
    s = open_store(stores["s3"], storage_options=s3.options)
    # image 2's chunk is in the shard of block 0 (images 0 … 3)
    faults = Faults(monkeypatch, match="features.4/maps/c/0/", error=OSError(503, "SlowDown: please reduce rate"),
                    times=2)
    np.testing.assert_array_equal(s.maps("features.4", 2), open_store(stores["local"]).maps("features.4", 2))
    assert faults.calls == 2


def test_persistent_5xx_is_a_hard_error_naming_the_key(s3, stores, monkeypatch):
    s = open_store(stores["s3"], storage_options=s3.options, retries=2)
    faults = Faults(monkeypatch, match="features.1/max/c/", error=OSError(500, "InternalError"), times=None)
    with pytest.raises(StoreUnavailableError, match=r"read 'layers/features.1/max/c/\d/0' failed after 3 attempts"):
        s.pooled("features.1", "max")
    assert faults.calls >= 3


def test_access_denied_is_a_hard_error_not_a_missing_chunk(s3, stores, monkeypatch):
    s = open_store(stores["s3"], storage_options=s3.options)
    Faults(monkeypatch, match="probs/c/", error=PermissionError("403 AccessDenied"), times=None)
    with pytest.raises(StoreUnavailableError, match="access denied"):
        s.probs()


def test_a_chunk_that_reads_as_missing_is_an_error_not_fill_values(s3, stores, monkeypatch):
    s = open_store(stores["s3"], storage_options=s3.options)
    Faults(monkeypatch, match="features.4/maps/c/1/", error=FileNotFoundError("NoSuchKey"), times=None)
    with pytest.raises(ChunkCorruptionError, match=r"shard \(1, 0, 0, 0\) \(chunks \(4, 0, 0, 0\) … \(7, 0, 0, 0\)\) "
                                                   r"is missing"):
        s.maps("features.4", 5)
    np.testing.assert_array_equal(s.maps("features.4", 8), open_store(stores["local"]).maps("features.4", 8))


def test_transient_write_faults_are_retried(s3, stores, monkeypatch):
    calls = {"n": 0}
    original = s3fs.S3FileSystem._pipe_file

    async def pipe_file(fs, path, *args, **kwargs):
        if "probes/" in path and "/c/" in path and calls["n"] < 2:
            calls["n"] += 1
            raise ConnectionResetError("connection reset by peer")
        return await original(fs, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", pipe_file)
    w = open_store(stores["s3"], read_only=False, storage_options=s3.options)
    scores = np.arange(10, dtype=np.float32)
    w.write_probe("mass", "features.4", scores=scores, maps=None, run_id="run-s3")
    assert calls["n"] == 2
    np.testing.assert_array_equal(open_store(stores["s3"], storage_options=s3.options)
                                  .probe("mass", "features.4").scores, scores)
