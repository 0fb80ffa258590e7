"""Thin glue between the app's callbacks and explain/ and store/: plain methods, keyed by ids, tested directly.

    >>> from vis.services import Workbench
    >>> wb = Workbench(settings, AppConfig())
    >>> wb.status().ok, [s.id for s in wb.sources()][:2]
    >>> fig = wb.mammogram_figure("src-1a2b", level=0.5, width=1.0, overlay=True, image_id=None)
    >>> wb.region_iou("p-000123", "features.13", shapes)        # IoU of every unit with the drawn region

One Workbench per app (attached to the Flask server by `create_app`); callbacks reach it with `current()`. It keeps
per-process, read-only handles (the opened store, the model, the manifest) and small caches keyed by id; every
piece of state a user changes lives in the annotation database, the store or mlflow, so several gunicorn workers
behave as one. Arguments that come from the browser are validated here: a wrong type or an unknown id raises
`InvalidInput` (→ 400, nothing written); what a user can meet (no store yet, a store of another model) raises
`NotReady` or the package's own error, which pages show as a message.
"""

from __future__ import annotations

import csv
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInput, NotReady

__all__ = ["EXTENSION", "current", "Workbench", "Status", "Source", "Flag"]

EXTENSION = "conceptlens"
MAX_ID_LENGTH = 200


def current() -> "Workbench":
    """The Workbench of the app serving this request (or, in a background job process, of the app it runs)."""
    import flask

    try:
        return flask.current_app.extensions[EXTENSION]
    except (RuntimeError, KeyError):  # outside a request: a diskcache job process or a Celery worker
        import dash

        return dash.get_app().server.extensions[EXTENSION]


# -- argument checks (browser input) ---------------------------------------------------------------------------------
def check_id(value, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        shown = repr(value)[:80]
        raise InvalidInput(what, f"expected an id (a non-empty string of at most {MAX_ID_LENGTH} chars), got {shown}")
    return value


def check_number(value, what: str, *, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(what, f"expected a finite number, got {repr(value)[:80]}")
    if not lo <= value <= hi:
        raise InvalidInput(what, f"{value} is outside [{lo}, {hi}]")
    return float(value)


def check_int(value, what: str, *, lo: int = 0, hi: int = 2**31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(what, f"expected an integer in [{lo}, {hi}], got {repr(value)[:80]}")
    return value


def check_list(value, what: str, *, max_len: int) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > max_len:
        raise InvalidInput(what, f"expected a list of at most {max_len} items, got {type(value).__name__}"
                                 + (f" of {len(value)}" if isinstance(value, list) else ""))
    return value


def check_choice(value, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidInput(what, f"{repr(value)[:80]} is not one of {', '.join(map(str, choices))}")
    return value


# -- small value objects -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    """Whether the workspace can be shown; when not, what is missing and the command that makes it."""

    ok: bool
    title: str = ""
    text: str = ""
    command: str | None = None


@dataclass(frozen=True)
class Source:
    """One source mammogram of the dataset (a row of sources.csv)."""

    id: str
    view: str
    laterality: str
    split: str
    width: int
    height: int
    path: Path  # the oriented display PNG

    @property
    def label(self) -> str:
        side = {"L": "left", "R": "right"}.get(self.laterality, "")
        return " · ".join(p for p in (self.id, f"{side} {self.view}".strip(), self.split) if p)


@dataclass(frozen=True)
class Flag:
    """A flagged patch: its store id, P(lesion) and box on the mammogram."""

    image_id: str
    prob: float
    box: tuple[int, int, int, int]


class _Lru:
    """A small thread-safe LRU cache of derived, read-only values (per process, bounded)."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make: Callable):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class Workbench:
    """Everything the pages ask for, by id. See the module docstring."""

    def __init__(self, settings, config):
        self.settings = settings
        self.config = config
        self._lock = threading.Lock()
        self._handles: dict[str, object] = {}  # opened once per process: manifest, sources, model, store
        self._mammograms = _Lru(4)  # display arrays of the last few mammograms
        self._views = _Lru(64)  # small derived arrays (overlays, masks) by key

    # -- identity -----------------------------------------------------------------------------------------------------
    def user(self) -> str:
        """Who acts: the login layer (a later issue) sets flask.g.user; until then the configured local user."""
        try:
            import flask

            return str(flask.g.get("user") or self.config.user)
        except RuntimeError:  # no request (background job): the job passes the user explicitly
            return self.config.user

    # -- handles ------------------------------------------------------------------------------------------------------
    def _handle(self, key: str, make: Callable):
        with self._lock:
            if key in self._handles:
                return self._handles[key]
        value = make()  # outside the lock: loading a model takes a while and must not block other readers
        with self._lock:
            return self._handles.setdefault(key, value)

    @property
    def dataset_dir(self) -> Path:
        return self.settings.dataset_dir(self.config.dataset)

    def manifest(self):
        from store.manifest import read_manifest

        path = self.settings.manifest_path(self.config.dataset)
        if not path.is_file():
            raise NotReady(f"no dataset {self.config.dataset!r} in {self.settings.workspace} ({path} is missing); "
                           f"build it with `python -m training build-demo`")
        return self._handle("manifest", lambda: read_manifest(path, check_files=False))

    def sources(self) -> list[Source]:
        """Every source mammogram of the dataset, in sources.csv order."""
        return self._handle("sources", self._read_sources)

    def _read_sources(self) -> list[Source]:
        path = self.dataset_dir / "sources.csv"
        if not path.is_file():
            raise NotReady(f"dataset {self.config.dataset!r} has no sources.csv ({path}); rebuild it with "
                           f"`python -m training build-demo`")
        out = []
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out.append(Source(id=row["source_id"], view=row.get("view", ""), laterality=row.get("laterality", ""),
                                  split=row.get("split", ""), width=int(float(row.get("width") or 0)),
                                  height=int(float(row.get("height") or 0)),
                                  path=(path.parent / row["mammogram"]).resolve()))
        return out

    def source(self, source_id) -> Source:
        check_id(source_id, "source")
        for s in self.sources():
            if s.id == source_id:
                return s
        raise InvalidInput("source", f"unknown mammogram {source_id!r}")

    def model(self):
        """The served model (training.load_model), loaded once per process."""
        from training import load_model

        ref = self.config.model or self._store_raw().attrs.get("model", {}).get("model_uri")
        if not ref:
            raise NotReady("the store does not name its model; start the app with --model <ref>")
        return self._handle("model", lambda: load_model(ref, settings=self.settings))

    def _store_raw(self):
        from store.activations import open_store, store_exists

        url = self.settings.store_url(self.config.store)
        if not store_exists(url):
            raise NotReady(f"no activation store {self.config.store!r} at {url}; extract it with "
                           f"`python -m store extract --data {self.config.dataset} --out {self.config.store}`")
        return self._handle("store-raw", lambda: open_store(url))

    def store(self):
        """The activation store, checked once against the served model (StoreMismatchError when another's)."""

        def check():
            from store.activations import open_store

            raw = self._store_raw()
            if self.config.model:
                open_store(raw.url, expect_model=self.model().meta)  # raises StoreMismatchError
            return raw

        return self._handle("store", check)

    def status(self) -> Status:
        """Dataset, store, model: the first that is missing or mismatched, with the command that fixes it."""
        from .components import user_errors

        try:
            self.manifest()
            self.sources()
            self.store()
        except user_errors() as e:
            name = type(e).__name__
            title = {"StoreMismatchError": "The store was extracted from another model",
                     "IncompleteStoreError": "The activation store is incomplete"}.get(name, "Workspace not ready")
            return Status(ok=False, title=title, text=str(e))
        return Status(ok=True)

    def layer(self, layer=None) -> str:
        """A layer of the store (the configured default, else the deepest); InvalidInput for an unknown name."""
        layers = self.store().layers
        if layer is None:
            layer = self.config.layer or layers[-1]
        if not isinstance(layer, str) or layer not in layers:
            raise InvalidInput("layer", f"{repr(layer)[:80]} is not a layer of the store ({', '.join(layers)})")
        return layer
