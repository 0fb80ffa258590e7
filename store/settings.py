"""Workspace settings: every path and service URL of one ConceptLens project, resolved once.

    >>> from store.settings import load_settings
    >>> s = load_settings("/data/my-project")          # or CONCEPTLENS_WORKSPACE, default ./workspace
    >>> s.dataset_dir("demo") / "manifest.csv"
    >>> s.tracking_uri                                  # sqlite:///<workspace>/mlflow.db unless MLFLOW_TRACKING_URI

Nothing here reads the current directory after start-up and nothing calls os.chdir: code asks the settings object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings", "load_settings"]

ENV_WORKSPACE = "CONCEPTLENS_WORKSPACE"


@dataclass(frozen=True)
class Settings:
    """Resolved locations of one workspace (DESIGN.md §2). Team services are chosen by URL, never by code."""

    workspace: Path
    tracking_uri: str
    database_url: str
    store_root: str  # a directory path or an fsspec URL (s3://bucket/prefix)
    cache_url: str  # "diskcache" (embedded) or redis://host:port/db (team)
    secret_key: str = field(repr=False, default="")

    # -- locations --------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.workspace / "data"

    def dataset_dir(self, dataset: str) -> Path:
        """Directory of a patch dataset: manifest.csv, sources.csv, images/, masks/, mammograms/."""
        return self.data_dir / dataset

    def manifest_path(self, dataset: str) -> Path:
        """A dataset name ('demo') or a path to a manifest CSV, resolved to the manifest's path."""
        p = Path(dataset)
        if p.suffix == ".csv":
            return p if p.is_absolute() else (Path.cwd() / p)
        return self.dataset_dir(dataset) / "manifest.csv"

    def store_url(self, name: str) -> str:
        """Location of the activation store `name` ('demo' → <store_root>/demo.zarr); URLs pass through."""
        if "://" in name or name.endswith(".zarr") or os.sep in name:
            return name
        return f"{self.store_root.rstrip('/')}/{name}.zarr"

    @property
    def artifact_root(self) -> Path:
        return self.workspace / "mlartifacts"

    @property
    def checkpoint_dir(self) -> Path:
        return self.workspace / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        return self.workspace / "cache"

    @property
    def bench_dir(self) -> Path:
        return self.workspace / "bench"

    def ensure(self) -> "Settings":
        """Create the workspace directories that embedded defaults write into."""
        for d in (self.workspace, self.data_dir, self.artifact_root, self.checkpoint_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        if "://" not in self.store_root:
            Path(self.store_root).mkdir(parents=True, exist_ok=True)
        return self


def load_settings(workspace: str | os.PathLike | None = None, *, env: dict | None = None) -> Settings:
    """Resolve the workspace from the argument, then CONCEPTLENS_WORKSPACE, then ./workspace (made absolute once).

    Service URLs come from the environment; each has an embedded default inside the workspace:
    MLFLOW_TRACKING_URI (sqlite:///<ws>/mlflow.db — never the plain-file store), CONCEPTLENS_DATABASE_URL
    (sqlite:///<ws>/annotations.db), CONCEPTLENS_STORE_ROOT (<ws>/stores), CONCEPTLENS_CACHE_URL (diskcache),
    CONCEPTLENS_SECRET_KEY (read from <ws>/secret_key, created once, when unset).
    """
    env = os.environ if env is None else env
    ws = Path(workspace or env.get(ENV_WORKSPACE) or "workspace").expanduser()
    ws = ws if ws.is_absolute() else (Path.cwd() / ws)
    ws = ws.resolve()
    tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ws / 'mlflow.db'}"
    if tracking.startswith("file:") or ("://" not in tracking and not tracking.startswith("databricks")):
        raise ValueError(
            f"MLFLOW_TRACKING_URI={tracking!r} selects mlflow's plain-file store; use sqlite:///… or an http(s) server"
        )
    return Settings(
        workspace=ws,
        tracking_uri=tracking,
        database_url=env.get("CONCEPTLENS_DATABASE_URL") or f"sqlite:///{ws / 'annotations.db'}",
        store_root=env.get("CONCEPTLENS_STORE_ROOT") or str(ws / "stores"),
        cache_url=env.get("CONCEPTLENS_CACHE_URL") or "diskcache",
        secret_key=env.get("CONCEPTLENS_SECRET_KEY") or "",
    )
