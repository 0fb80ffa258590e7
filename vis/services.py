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
ALL_LAYERS = "*"  # the layer part of a probe option that combines every layer's probe of the concept


def probe_label(concept: str, layer: str) -> str:
    """How menus and overlays name a probe: "mass @ features.23", or "mass @ all layers" for the combined map."""
    from .figures import concept_name

    return f"{concept_name(concept)} @ {'all layers' if layer == ALL_LAYERS else layer}"


def current() -> "Workbench":
    """The Workbench of the app serving this request (or, in a background job process, of the app it runs)."""
    import flask

    try:
        return flask.current_app.extensions[EXTENSION]
    except (RuntimeError, KeyError):  # outside a request: a diskcache job process or a Celery worker
        import dash

        return dash.get_app().server.extensions[EXTENSION]


def _request_cache(name: str) -> dict | None:
    """A dict that lives as long as the current request (flask.g), or None outside a request (a job process)."""
    import flask

    try:
        if not flask.has_request_context():
            return None
        cache = flask.g.get(name)
        if cache is None:
            cache = {}
            setattr(flask.g, name, cache)
        return cache
    except RuntimeError:
        return None


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

    def contains(self, key) -> bool:
        with self._lock:
            return key in self._data

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

    # -- identity and review sessions -----------------------------------------------------------------------------------
    def account(self):
        """The signed-in `store.accounts.UserInfo` (vis.auth: flask.g.user, or the job's signed cookie)."""
        from .auth import current_user

        return current_user()

    def user(self) -> str:
        """Who acts: the signed-in user's login name (labels, regions, marks and comments carry it)."""
        return self.account().name

    def sessions(self) -> list:
        """The review sessions the signed-in user may open (admins: all), as `store.accounts.SessionInfo`."""
        from store.accounts import sessions_for

        return sessions_for(self.db(), self.account())

    def review_session(self, session_id, *, db=None):
        """The review session a request names, after checking on the server that the user is a member.

        A malformed id is InvalidInput (400); a session the user may not open raises `store.errors.AccessDenied`
        (403), which no page turns into a message: a forged request learns nothing and changes nothing.
        """
        from store.accounts import require_member

        if session_id is None:
            raise NotReady("you are not a member of any review session yet: ask an administrator to add you to one")
        sid = check_int(session_id, "session", lo=1, hi=2**31 - 1)
        seen = _request_cache("conceptlens_sessions")  # one check per session and request, however many views ask
        if seen is not None and sid in seen:
            return seen[sid]
        info = require_member(db or self.db(), sid, self.account())
        if seen is not None:
            seen[sid] = info
        return info

    def session_id(self, session_id, *, db=None) -> int:
        """`review_session(...).id`: the checked id that every annotation read or write passes to explain.labels."""
        return int(self.review_session(session_id, db=db).id)

    def session_options(self) -> list[dict]:
        return [{"label": s.name, "value": int(s.id)} for s in self.sessions()]

    def default_session(self) -> int | None:
        """The session a fresh page opens: the first the user may open (the workspace session when a member)."""
        sessions = self.sessions()
        return int(sessions[0].id) if sessions else None

    def session_version(self, session_id) -> list:
        """A cheap stamp of everything reviewers wrote in the session (labels, undos, regions, marks, comments,
        members, probe versions): [session, newest action id, newest region id, region count, mark count, newest
        comment change, comment count, the session row's version (members), probe versions recorded]. Any
        reviewer's write, through any worker, changes it; views that show annotations redraw only then."""
        from sqlalchemy import func, select

        from store.annotations import Comment, ImageMark, LabelAction, ProbeVersion, Region, ReviewSession

        sid = self.session_id(session_id)
        with self.db().read() as s:
            row = s.execute(select(
                select(func.max(LabelAction.id)).where(LabelAction.session_id == sid).scalar_subquery(),
                select(func.max(Region.id)).where(Region.session_id == sid).scalar_subquery(),
                select(func.count(Region.id)).where(Region.session_id == sid).scalar_subquery(),
                select(func.count()).select_from(ImageMark).where(ImageMark.session_id == sid).scalar_subquery(),
                select(func.max(Comment.updated_at)).where(Comment.session_id == sid).scalar_subquery(),
                select(func.count(Comment.id)).where(Comment.session_id == sid).scalar_subquery(),
                select(ReviewSession.version).where(ReviewSession.id == sid).scalar_subquery(),
                # a rollback re-activates a recorded version: its row's version changes, not the count
                select(func.coalesce(func.sum(ProbeVersion.version), 0)).where(ProbeVersion.session_id == sid)
                .scalar_subquery(),
            )).one()
        return [sid, *(v.isoformat() if hasattr(v, "isoformat") else int(v or 0) for v in row)]

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

    # -- sources and mammograms -----------------------------------------------------------------------------------------
    def source_options(self) -> list[dict]:
        return [{"label": s.label, "value": s.id} for s in self.sources()]

    def step_source(self, source, delta: int) -> str:
        """The mammogram `delta` places after `source` in the list (wrapping around)."""
        ids_ = [s.id for s in self.sources()]
        i = ids_.index(self.source(source).id)
        return ids_[(i + delta) % len(ids_)]

    def mammogram(self, source_id) -> np.ndarray:
        """float32 (y, x) in [0, 1]: the display mammogram as stored (its PNG is already display-domain)."""
        src = self.source(source_id)

        def read():
            from store.images import read_image

            img = read_image(src.path)
            data = img.data[:, ::-1] if img.flipped else img.data  # boxes are in the PNG's own pixel grid
            return np.ascontiguousarray(data / np.float32(2 ** min(img.bits_stored or 16, 16) - 1), dtype=np.float32)

        return self._mammograms.get(src.id, read)

    def _source_patches(self) -> dict[str, list[tuple[int, object]]]:
        """source id → [(store row, PatchRecord)] of the patches that are in the store."""

        def build():
            store, out = self.store(), {}
            for rec in self.manifest().records:
                try:
                    row = store.index_of(rec.id)
                except KeyError:
                    continue
                out.setdefault(rec.source_id, []).append((row, rec))
            return out

        return self._handle("source-patches", build)

    def _by_id(self) -> dict:
        return self._handle("by-id", self.manifest().by_id)

    def record(self, image_id):
        """(store row, PatchRecord or None) of a store image id."""
        check_id(image_id, "image")
        try:
            row = self.store().index_of(image_id)
        except KeyError:
            raise InvalidInput("image", f"{image_id!r} is not an image of store {self.config.store!r}") from None
        return row, self._by_id().get(image_id)

    def lesion_prob(self) -> np.ndarray:
        """float32 (image,): P(lesion) of every store image (the class named "lesion", else the last)."""
        store = self.store()
        classes = list(store.classes or [])
        k = classes.index("lesion") if "lesion" in classes else store.probs().shape[1] - 1
        return store.probs()[:, k]

    def flagged(self, source_id) -> list[Flag]:
        """The source's patches with P(lesion) ≥ the flag threshold, most probable first (at most max_flagged)."""
        src = self.source(source_id)
        prob = self.lesion_prob()
        items = [Flag(rec.id, float(prob[row]), tuple(rec.box)) for row, rec in self._source_patches().get(src.id, [])
                 if prob[row] >= self.config.flagged_threshold]
        items.sort(key=lambda f: -f.prob)
        return items[: self.config.max_flagged]

    def default_patch(self, source_id) -> str | None:
        """The patch opened with a mammogram: its most probable flagged patch, if any."""
        flags = self.flagged(source_id)
        return flags[0].image_id if flags else None

    def patch_at(self, state, click) -> str:
        """The store patch under a click on the mammogram: the patch containing the point whose centre is nearest."""
        source = self.source((state or {}).get("source")).id
        try:
            point = click["points"][0]
            x = check_number(point["x"], "click x", lo=-1e6, hi=1e6)
            y = check_number(point["y"], "click y", lo=-1e6, hi=1e6)
        except (TypeError, KeyError, IndexError):
            raise InvalidInput("clickData", "expected {'points': [{'x': …, 'y': …}]}") from None
        best, best_d = None, math.inf
        for _row, rec in self._source_patches().get(source, []):
            x0, y0, x1, y1 = rec.box
            if x0 <= x < x1 and y0 <= y < y1:
                d = (x - (x0 + x1) / 2) ** 2 + (y - (y0 + y1) / 2) ** 2
                if d < best_d:
                    best, best_d = rec.id, d
        if best is None:
            raise NotReady(f"no patch of this mammogram covers the point ({x:.0f}, {y:.0f}): click inside the breast")
        return best

    def _overlay_key(self, source_id):
        """(view-cache key, cache file, window size, step) of a mammogram's P(lesion) overlay for the served model."""
        src = self.source(source_id)
        model = self.model()
        run = str(model.meta.get("run_id") or model.meta.get("version") or "model")
        size = int(model.input_size[0])
        step = max(1, size // 4)
        path = self.settings.cache_dir / "overlays" / run / f"{src.id}-{size}-{step}.npy"
        return ("overlay", src.id, run, size, step), path, size, step

    def overlay_ready(self, source_id) -> bool:
        """Whether the P(lesion) overlay of a mammogram is computed already (in memory or on disk): drawing it then
        costs nothing, so the figure can wait for it."""
        key, path, _, _ = self._overlay_key(source_id)
        return self._views.contains(key) or path.is_file()

    def lesion_overlay(self, source_id):
        """P(lesion) of the served model over the whole mammogram (figures.LesionOverlay), cached on disk.

        Windows of the model's input size slide at a quarter of it; each window is exactly what the model sees
        for a patch (uint8 display pixels through training.preprocess). Cached per model run and mammogram under
        <workspace>/cache/overlays, so every worker and later start reuses it.
        """
        from .figures import LesionOverlay

        src = self.source(source_id)
        key, path, size, step = self._overlay_key(src.id)

        def compute():
            if path.is_file():
                probs = np.load(path, allow_pickle=False)
            else:
                probs = self._slide(self.mammogram(src.id), self.model(), size=size, step=step)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".{threading.get_ident()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, probs, allow_pickle=False)
                tmp.replace(path)  # atomic: a concurrent worker reads the old absence or the whole file
            return LesionOverlay(probs=probs, origin=(0.0, 0.0), step=float(step), size=float(size))

        return self._views.get(key, compute)

    @staticmethod
    def _slide(display: np.ndarray, model, *, size: int, step: int, batch: int = 256) -> np.ndarray:
        """float32 (row, col): P(lesion) of every size×size window at `step` over a display image in [0, 1]."""
        import torch

        from training.transforms import preprocess

        img = (np.clip(display, 0, 1) * 255 + 0.5).astype(np.uint8)  # (y, x), as the demo's patches
        h, w = img.shape
        rows, cols = max(1, (h - size) // step + 1), max(1, (w - size) // step + 1)
        windows = np.lib.stride_tricks.sliding_window_view(img, (size, size))[::step, ::step][:rows, :cols]
        flat = windows.reshape(-1, size, size)  # (window, y, x)
        classes = list(model.meta.get("classes") or [])
        k = classes.index("lesion") if "lesion" in classes else -1
        out = []
        with torch.inference_mode():
            for i in range(0, len(flat), batch):
                x = preprocess(np.ascontiguousarray(flat[i:i + batch]), model.transform)
                out.append(torch.softmax(model.module(x), dim=1)[:, k].float().numpy())
        return np.concatenate(out).reshape(rows, cols).astype(np.float32)

    def _box_of(self, source, state) -> tuple | None:
        image = (state or {}).get("image")
        if not image:
            return None
        _row, rec = self.record(image)
        return tuple(rec.box) if rec is not None and rec.source_id == source else None

    def mammogram_figure(self, source, state, *, level, width, overlay, placeholder: bool = False):
        """The Review page's mammogram: windowed, with the P(lesion) overlay, flagged boxes and the open box.

        placeholder=True: the overlay is not computed (an empty layer holds its place), so the image shows at once;
        `overlay_patch` fills it in (callers pass `not overlay_ready(source)`)."""
        from . import figures

        src = self.source(source)
        level = check_number(level, "level", lo=0.0, hi=1.0)
        width = check_number(width, "width", lo=0.01, hi=1.0)
        if not isinstance(overlay, bool):
            raise InvalidInput("overlay", f"expected true or false, got {repr(overlay)[:40]}")
        img = figures.window_image(self.mammogram(src.id), level, width)
        drawn = None
        if overlay:
            drawn = figures.PENDING_OVERLAY if placeholder else self.lesion_overlay(src.id)
        return figures.mammogram_figure(
            img, overlay=drawn, box=self._box_of(src.id, state),
            flagged=[f.box for f in self.flagged(src.id)], uirevision=src.id, height=720)

    def overlay_patch(self, source):
        """A partial figure update (dash.Patch) that puts the mammogram's P(lesion) overlay (computed here if need be)
        in the place a `placeholder=True` figure kept for it."""
        import dash

        from . import figures

        patch = dash.Patch()
        patch["data"][1] = figures.overlay_trace(self.lesion_overlay(self.source(source).id))
        return patch

    def mammogram_boxes(self, source, state):
        """A partial figure update (dash.Patch) that only moves the open patch's box."""
        import dash

        from . import figures

        src = self.source(source)
        box = self._box_of(src.id, state)
        shapes = [dict(type="rect", x0=b[0], y0=b[1], x1=b[2], y1=b[3], layer="above",
                       line=dict(color=figures.FLAG, width=1.5, dash="dot")) for b in (f.box for f in self.flagged(src.id))]
        if box is not None:
            shapes.append(dict(type="rect", x0=box[0], y0=box[1], x1=box[2], y1=box[3], layer="above",
                               line=dict(color=figures.BOX, width=3)))
        patch = dash.Patch()
        patch["layout"]["shapes"] = shapes
        return patch

    def source_info(self, source) -> str:
        src = self.source(source)
        n = len(self._source_patches().get(src.id, []))
        return f"{src.width}×{src.height} px · {n} patches · {len(self.flagged(src.id))} flagged"

    def flagged_strip(self, source, state):
        """Thumbnails of the flagged patches (buttons with pattern-matching ids)."""
        from . import figures, ids
        from .components import Tile, gallery

        src = self.source(source)
        store = self.store()
        open_id = (state or {}).get("image")
        tiles = []
        for f in self.flagged(src.id):
            row = store.index_of(f.image_id)
            tiles.append(Tile(src=self._thumb(row), caption=f"P {f.prob:.2f}", tile_id=ids.flagged_patch(f.image_id),
                              selected=f.image_id == open_id, title=f"{f.image_id} · P(lesion) {f.prob:.3f}"))
        return gallery(tiles, size=72, empty="No patch of this mammogram reaches the flag threshold "
                                              f"(P(lesion) ≥ {self.config.flagged_threshold:g}).")

    def _thumb(self, row: int, size: int = 72) -> str:
        from . import figures

        return self._views.get(("thumb", row, size), lambda: figures.png_data_uri(self.store().image(row), size=size))

    # -- the open patch ------------------------------------------------------------------------------------------------
    def open_state(self, state, **changes) -> dict:
        """The Review state after a change, validated: {"source", "image", "unit"} (ids and an index only)."""
        state = dict(state) if isinstance(state, dict) else {}
        new = {"source": state.get("source"), "image": state.get("image"), "unit": state.get("unit")}
        new.update(changes)
        if "source" in changes or new["source"] is not None:
            new["source"] = self.source(new["source"]).id
        if new["image"] is not None:
            _row, rec = self.record(new["image"])
            if rec is not None and "source" not in changes:
                new["source"] = rec.source_id
        if "image" in changes and "unit" not in changes:
            new["unit"] = None
        if new["unit"] is not None:
            new["unit"] = check_int(new["unit"], "unit", lo=0, hi=65535)
        return new

    def clicked_unit(self, click) -> int:
        try:
            unit = click["points"][0]["customdata"]
        except (TypeError, KeyError, IndexError):
            raise InvalidInput("clickData", "expected a point with customdata (the unit index)") from None
        if isinstance(unit, list):  # plotly wraps customdata of some traces in a list
            unit = unit[0] if unit else None
        return check_int(unit, "unit", lo=0, hi=65535)

    def selected_points(self, selected, *, what: str, limit: int = 20000) -> list[int] | None:
        """Indices (customdata) of a lasso / box selection; [] when cleared by the user (double click).

        None for the empty event plotly sends when a redrawn figure drops its selection (no lasso, no box): the
        selection the user made stands.
        """
        if not selected:
            return []
        try:
            points = selected["points"]
        except (TypeError, KeyError):
            raise InvalidInput("selectedData", "expected {'points': [...]}") from None
        points = check_list(points, "selectedData.points", max_len=limit)
        if not points and "lassoPoints" not in selected and "range" not in selected:
            return None
        out = set()
        for p in points:
            c = p.get("customdata") if isinstance(p, dict) else None
            if isinstance(c, list):
                c = c[0] if c else None
            out.add(check_int(c, f"selected {what}", lo=0, hi=10**7))
        return sorted(out)

    def label_rule_args(self, layer: str | None = None) -> dict:
        """label_region's `rule` (and `shown`, and with `layer` the rivals `known`) for the configured labeling rule
        (AppConfig.label_rule)."""
        from explain.labels import DatasetLabelRule, LabelRule

        if self.config.label_rule in ("dataset", "assisted"):
            shown = self.images_showing()
            known = {} if layer is None else {"known": self.segmented_rivals(layer)}
            if self.config.label_rule == "dataset":
                return {"rule": DatasetLabelRule(), "shown": shown, **known}
            from explain.probes import FeatureCache

            # its own cache of the read-only store: the probes' maps and the unit masks pulled back, once per process
            cache = self._handle(("label-feature-cache", self.store().url), lambda: FeatureCache(self.store()))
            return {"rule": DatasetLabelRule(probes=True), "shown": shown, "cache": cache, **known}
        return {"rule": LabelRule(threshold=self.config.iou_threshold)}

    def images_showing(self) -> dict:
        """{concept: store rows of the images the manifest lists as showing it} (explain.labelrules.images_showing)."""
        from explain.labelrules import images_showing

        return self._handle("images-showing", lambda: images_showing(self.store(), self.manifest()))

    def suggested_images(self, concept, *, layer, session, limit: int = 10) -> dict:
        """Where to draw `concept` next in a review session: {"concept", "layer", "listed" (images the dataset lists
        as showing it), "drawn" (of those, the ones this user drew it on in the session), "images" (up to `limit` ids,
        best first: explain.labelrules.next_drawings on the layer's pooled activations, the drawings kept most
        representative of every listed image)}. "images" is empty when none is listed or all are drawn."""
        from explain.labelrules import next_drawings
        from explain.labels import regions_for

        sid = self.session_id(session)
        layer = self.layer(layer)
        check_id(concept, "concept")
        limit = check_int(limit, "limit", lo=1, hi=1000)
        out = {"concept": concept, "layer": layer, "listed": 0, "drawn": 0, "images": []}
        shown = self.images_showing().get(concept)
        if shown is None:
            return out
        store = self.store()
        drawn = set()
        for rec in regions_for(self.db(), concept, session=sid, author=self.user()):
            try:
                drawn.add(store.index_of(rec.image_id))
            except KeyError:  # a region on an image this store lacks weighs in no estimate either
                continue
        features = self._handle(f"pooled-max:{layer}", lambda: store.pooled(layer, "max"))
        ranked = next_drawings(features, shown, sorted(drawn))[:limit]
        return {**out, "listed": len(shown), "drawn": len(drawn & set(shown.tolist())),
                "images": [store.image_ids[int(i)] for i in ranked]}

    def suggest_patch(self, state, *, concept, layer, session):
        """(the Review state with the patch to draw `concept` on next, or None, and a message): the first of
        `suggested_images` other than the open patch, so that asking again steps to the next suggestion."""
        from . import figures
        from .components import message

        state = self.open_state(state)
        found = self.suggested_images(concept, layer=layer, session=session, limit=2)
        name = figures.concept_name(concept)
        if not found["listed"]:
            return None, message("No suggestion", f"the dataset lists no image showing {name}: draw it wherever you "
                                                  "find it.", color="info")
        images = [i for i in found["images"] if i != state.get("image")] or found["images"]
        if not images:
            return None, message("No suggestion", f"you have drawn {name} on all {found['listed']} images listed as "
                                                  "showing it.", color="info")
        n, listed, on = found["drawn"], found["listed"], f"{found['layer']}'s activations"
        why = (f"this one is the most typical of them ({on}): a good first drawing" if not n else
               f"this one keeps your {n} drawing{'s' if n != 1 else ''} of it most representative of them all ({on}), "
               f"which steadies the labels estimated from them")
        text = (f"of the {listed} images listed as showing {name}, {why}. Draw it here and label, or ask again for "
                f"the next one.")
        return self.open_state(state, image=images[0]), message(f"Draw {name} on {images[0]}", text, color="info")

    def _unit_iou(self, layer: str):
        from explain.dissection import UnitIoU

        return self._handle(f"unit-iou:{layer}:{self.config.mask_level}",
                            lambda: UnitIoU(self.store(), layer, level=self.config.mask_level))

    def update_regions(self, regions, relayout) -> list[dict]:
        """The drawn shapes after a relayout event, each validated (InvalidInput for what no drawing produces)."""
        from explain.errors import RegionError
        from explain.regions import apply_relayout, parse_plotly_shapes

        regions = check_list(regions, "regions", max_len=200)
        if not isinstance(relayout, dict):
            raise InvalidInput("relayoutData", f"expected an object, got {type(relayout).__name__}")
        if not any(k == "shapes" or k.startswith("shapes[") for k in relayout):
            import dash

            return dash.no_update  # zoom, pan, autosize: the regions are unchanged
        try:
            shapes = apply_relayout(regions, relayout)
            if len(shapes) > 200:
                raise RegionError(f"{len(shapes)} shapes (at most 200)")
            for i, shape in enumerate(shapes):  # structure: types, NaN, vertex counts — what no drawing produces
                if not isinstance(shape, dict):
                    raise RegionError(f"shape {i} is not an object")
                for key in ("path", "type", "name"):
                    if key in shape and not isinstance(shape[key], str):
                        raise RegionError(f"shape {i}: {key} must be text")
            parse_plotly_shapes(shapes) if shapes else None
        except RegionError as e:
            raise InvalidInput("regions", str(e)) from None
        keep = ("type", "path", "x0", "y0", "x1", "y1", "name")
        return [{k: s[k] for k in keep if k in s} for s in shapes if self._has_area(s)]

    def _has_area(self, shape: dict) -> bool:
        """False for a stroke that encloses nothing (a click, a line): it is dropped instead of blocking labeling."""
        from explain.errors import RegionError
        from explain.regions import parse_plotly_shape, rasterize_regions

        try:
            return bool(rasterize_regions(parse_plotly_shape(shape), self.patch_size(), allow_empty=True).any())
        except RegionError:
            return False

    def region_iou(self, image_id, layer: str, regions) -> np.ndarray | None:
        """float32 (unit,): IoU of the drawn regions with every unit's mask on the image; None when none drawn."""
        from explain.regions import parse_plotly_shapes

        regions = check_list(regions, "regions", max_len=200)
        if not regions or not image_id:
            return None
        row, _rec = self.record(image_id)
        return self._unit_iou(layer).compute(row, parse_plotly_shapes(regions))

    def region_mask(self, regions) -> np.ndarray:
        """bool (y, x) of the patch size from the drawn shapes (RegionError when it covers no pixel)."""
        from explain.regions import parse_plotly_shapes, rasterize_regions

        return rasterize_regions(parse_plotly_shapes(check_list(regions, "regions", max_len=200)),
                                 self.patch_size())

    def patch_size(self) -> tuple[int, int]:
        from explain.dissection import patch_size

        return tuple(patch_size(self.store()))

    def unit_mask(self, layer: str, row: int, unit: int) -> np.ndarray:
        """bool (y, x): the unit's Network-Dissection mask on one store image."""
        from explain.dissection import unit_masks

        store = self.store()
        maps = store.maps(layer, row)  # (unit, y, x)
        if not 0 <= unit < maps.shape[0]:
            raise InvalidInput("unit", f"{unit} is outside 0 … {maps.shape[0] - 1} of layer {layer!r}")
        thr = store.thresholds(layer, self.config.mask_level)
        return unit_masks(maps[unit:unit + 1], thr[unit:unit + 1].copy(), self.patch_size())[0]

    def gradcam(self, row: int, layer: str) -> np.ndarray:
        """float32 (y, x) in [0, 1]: Grad-CAM of the predicted class at `layer`, normalized to its maximum."""
        from explain.attribution import grad_cam
        from training.transforms import preprocess

        def compute():
            model = self.model()
            x = preprocess(self.store().image(row)[None], model.transform)
            cam = grad_cam(model.module, x, layer, size=self.patch_size())[0]
            peak = float(cam.max())
            return cam / peak if peak > 0 else cam

        return self._views.get(("gradcam", row, layer), compute)

    def probe_map(self, probe: str, row: int) -> np.ndarray | None:
        """float32 (y, x) in [0, 1] of a stored probe version on one image, upsampled to the patch; for
        'concept@*' every layer's probe of the concept combined (explain.probes.concept_heatmap); None if absent."""
        from explain.errors import ProbeDataError
        from explain.probes import concept_heatmap, probe_heatmap

        concept, layer = self.parse_probe(probe, combined=True)
        try:
            if layer == ALL_LAYERS:
                return concept_heatmap(self.store(), concept, row, size=self.patch_size())
            return probe_heatmap(self.store(), concept, layer, row, size=self.patch_size())
        except ProbeDataError:  # a probe stored without maps
            return None

    def parse_probe(self, probe, *, combined: bool = False) -> tuple[str, str]:
        """'concept@layer' → (concept, layer), both checked against the store; with `combined`, 'concept@*' (every
        layer's probe of the concept, combined) → (concept, '*') too."""
        check_id(probe, "probe")
        concept, sep, layer = probe.rpartition("@")
        stored = set(self.store().probes())
        if combined and sep and layer == ALL_LAYERS and any(c == concept for c, _ in stored):
            return concept, layer
        if not sep or (concept, layer) not in stored:
            raise InvalidInput("probe", f"{probe!r} is not a probe of store {self.config.store!r}")
        return concept, layer

    def probe_options(self, *, combined: bool = False) -> list[dict]:
        """Dropdown options, one per stored probe; with `combined`, each concept probed on several layers first gets
        'concept@*': its probes' maps combined (explain.probes.combine_heatmaps), the best measured map."""
        from collections import Counter

        probes = self.store().probes()
        per_concept = Counter(c for c, _ in probes)  # insertion-ordered: concepts in the store's (sorted) order
        pairs = ([(c, ALL_LAYERS) for c, n in per_concept.items() if n > 1] if combined else []) + probes
        return [{"label": probe_label(c, l), "value": f"{c}@{l}"} for c, l in pairs]

    def saved_regions(self, image_id, session) -> list:
        """The regions reviewers of a session saved on one image (explain.labels.RegionRecord), oldest first."""
        from explain.labels import regions_for

        sid = self.session_id(session)
        return regions_for(self.db(), image=check_id(image_id, "image"), session=sid)

    def patch_view(self, state, *, overlays, probe, regions, layer, session):
        """(patch figure, info) of the open patch with the chosen overlays, the regions every reviewer of the
        session saved on it (outlined, named by author) and this user's drawn, not yet saved regions."""
        from dash import html

        from . import figures
        from .components import stat

        state = self.open_state(state)
        image = state.get("image")
        if not image:
            return (figures.empty_figure("Open a flagged patch or click the breast", dark=True, height=440),
                    html.Div("No patch open.", className="cl-muted"))
        layer = self.layer(layer)
        overlays = check_list(overlays, "overlays", max_len=3)
        for o in overlays:
            check_choice(o, "overlay", ("gradcam", "unit", "probe"))
        regions = check_list(regions, "regions", max_len=200)
        row, rec = self.record(image)
        layers: list = []
        unit_text = ""
        if "gradcam" in overlays:
            layers.append(figures.Overlay("Grad-CAM", self.gradcam(row, layer), kind="heat", color="#ff6b35"))
        if "probe" in overlays and probe:
            pmap = self.probe_map(probe, row)
            if pmap is not None:
                name = probe_label(*probe.rpartition("@")[::2])  # checked by probe_map
                layers.append(figures.Overlay(f"probe {name}", pmap, kind="heat", color="#7048e8"))
        if "unit" in overlays or regions:
            unit, why = self._shown_unit(state, layer, row, regions)
            mask = self.unit_mask(layer, row, unit)
            layers.append(figures.Overlay(f"unit {unit}", mask, kind="mask", color="#ffd43b"))
            unit_text = f"unit {unit} ({why})"
        saved = self.saved_regions(image, session)
        for author in sorted({r.author for r in saved}):
            mask = np.zeros(self.patch_size(), bool)
            concepts = []
            for r in saved:
                if r.author == author:
                    mask |= r.mask()
                    concepts.append(figures.concept_name(r.concept))
            layers.append(figures.Overlay(f"saved by {author}: {', '.join(sorted(set(concepts)))}", mask,
                                          kind="mask", color=SAVED_REGION_COLOR))
        fig = figures.patch_figure(self.store().image(row), overlays=layers, shapes=regions,
                                   uirevision=image, height=440)
        p = float(self.lesion_prob()[row])
        truth = int(self.store().labels()[row])
        classes = list(self.store().classes or ["normal", "lesion"])
        predicted = "lesion" if p >= 0.5 else "normal"
        info = [stat("prediction", predicted, tone="cl-pos" if predicted == "lesion" else "cl-neg"),
                stat("P(lesion)", f"{p:.3f}"),
                stat("ground truth", classes[truth] if 0 <= truth < len(classes) else str(truth))]
        if unit_text:
            info.append(stat("mask shown", unit_text))
        if saved:
            info.append(stat("saved regions", ", ".join(f"{a} {sum(r.author == a for r in saved)}"
                                                       for a in sorted({r.author for r in saved}))))
        shown = [c for c in (rec.concepts if rec is not None else ()) if c != "background"]
        if shown:  # the demo data's ground truth: which concepts the patch really holds
            info.append(html.Div([html.Span("ground-truth concepts ", className="cl-stat-label")] + [
                html.Span(figures.concept_name(c), className="badge cl-concept",
                          style={"background": figures.concept_color(c)}) for c in shown], className="cl-badges"))
        return fig, info

    def _shown_unit(self, state, layer: str, row: int, regions) -> tuple[int, str]:
        """Which unit's mask the patch shows: best IoU with the region, else the clicked unit, else the most active."""
        if regions:
            iou = self.region_iou(state["image"], layer, regions)
            u = int(np.argmax(iou))
            return u, f"best IoU {iou[u]:.2f}"
        if state.get("unit") is not None:
            return int(state["unit"]), "selected"
        return self.most_active_unit(layer, row), "most active"

    def most_active_unit(self, layer: str, row: int) -> int:
        """The unit that exceeds its mask threshold the most on this image (peak / threshold), so its mask shows."""
        store = self.store()
        peak = store.maps(layer, row).reshape(store.layer_shape(layer)[0], -1).max(axis=1)  # (unit,)
        thr = np.asarray(store.thresholds(layer, self.config.mask_level), np.float64)
        ratio = np.where(thr > 0, peak / np.where(thr > 0, thr, 1.0), -np.inf)
        return int(np.argmax(ratio))

    # -- concepts --------------------------------------------------------------------------------------------------------
    def known_concepts(self) -> list[str]:
        """The database's concept vocabulary (the defaults and every concept a user added)."""
        from explain.labels import concepts

        return [c["id"] for c in concepts(self.db())]

    def concept_options(self, user_concepts) -> list[dict]:
        """The default vocabulary first, then every other concept of the database's vocabulary."""
        from .figures import concept_name

        user_concepts = check_list(user_concepts, "concepts", max_len=200)
        known = self.known_concepts()
        seen, out = set(), []
        for c in (*DEFAULT_VOCABULARY, *known, *user_concepts):
            if isinstance(c, str) and c not in seen and c in known:
                seen.add(c)
                out.append({"label": concept_name(c), "value": c})
        return out

    def add_concept(self, concepts, typed) -> tuple[list[str], str]:
        """Add a typed concept ('rim sign' → 'rim_sign') to the shared vocabulary; returns (this user's list, id)."""
        from explain.labels import add_concept

        concepts = [c for c in check_list(concepts, "concepts", max_len=200) if isinstance(c, str)]
        concept = concept_id(typed)
        if concept not in self.known_concepts():
            add_concept(self.db(), concept)
        if concept not in concepts:
            concepts = [*concepts, concept]
        return concepts, concept

    # -- labeling --------------------------------------------------------------------------------------------------------
    def label_units(self, state, *, regions, concept, layer, actions, session):
        """Apply the labeling rule to the drawn region in a review session; returns (this tab's action ids,
        message). The session is checked (member or AccessDenied) before anything is read or written."""
        from explain.labels import label_region
        from explain.regions import parse_plotly_shapes

        from . import figures
        from .components import message

        sid = self.session_id(session)
        state = self.open_state(state)
        layer = self.layer(layer)
        actions = [check_int(a, "action", lo=1, hi=2**62) for a in check_list(actions, "actions", max_len=10000)]
        check_id(concept, "concept")
        regions = check_list(regions, "regions", max_len=200)
        if not state.get("image"):
            return actions, message("No patch open", "open a flagged patch first.", color="info")
        if not regions:
            return actions, message("No region", "draw the concept on the patch first.", color="info")
        result = label_region(self.db(), self.store(), layer=layer, image=state["image"],
                              region=parse_plotly_shapes(regions), concept=concept, author=self.user(),
                              session=sid, level=self.config.mask_level, dissect=self._unit_iou(layer),
                              **self.label_rule_args(layer))
        name = figures.concept_name(concept)
        if self.config.label_rule in ("dataset", "assisted"):
            return [*actions, result.action_id], self._dataset_rule_message(result, layer, concept)
        if not result.changed:
            best = float(result.ious.max()) if result.ious is not None else 0.0
            text = (f"no unit of {layer} has IoU > {self.config.iou_threshold:g} with this region (best {best:.2f}) "
                    "and above its current label's; the region is kept for the probe.")
            return [*actions, result.action_id], message("Nothing relabeled", text, color="info")
        units = sorted(result.changed)
        shown = ", ".join(str(u) for u in units[:12]) + (" …" if len(units) > 12 else "")
        return [*actions, result.action_id], message(f"Labeled {len(units)} unit(s) as {name}",
                                                     f"on {layer}: {shown}. Undo reverts exactly this.",
                                                     color="success")

    def _dataset_rule_message(self, result, layer: str, concept: str):
        from . import figures
        from .components import message

        name = figures.concept_name(concept)
        if not result.changed:
            listed = concept in self.label_rule_args()["shown"]
            text = (f"no unit of {layer} changed: the estimated dataset-level IoUs keep every label; the region "
                    f"is kept for the probe." if listed else
                    f"the dataset lists no image showing {name}, so the dataset rule cannot weigh it; the region is "
                    f"kept for the probe.")
            return message("Nothing relabeled", text, color="info")
        parts = []
        for new in sorted({n for _, n in result.changed.values()}, key=lambda c: (c is None, c or "")):
            units = sorted(u for u, (_, n) in result.changed.items() if n == new)
            listed = ", ".join(str(u) for u in units[:12]) + (" …" if len(units) > 12 else "")
            parts.append(f"{'unlabeled' if new is None else figures.concept_name(new)}: {listed}")
        rivals = ", ".join(figures.concept_name(c) for c in self.segmented_rivals(layer))
        return message(f"Relabeled {len(result.changed)} unit(s) of {layer}",
                       "; ".join(parts) + " (dataset rule: estimated dataset-level IoU > 0.04 with the unit's best "
                       f"drawn concept{f', and above its IoU with {rivals}' if rivals else ''}). Undo reverts exactly "
                       "this.", color="success")

    def undo_last(self, actions, *, session):
        """Undo this tab's last labeling action in a review session; returns (remaining action ids, message).

        The action ids come from the browser, so explain.labels.undo checks them: an action of another session, or
        another reviewer's that this user may not remove (a researcher and a radiologist's), raises AccessDenied.
        """
        from explain.labels import undo

        from .components import message

        sid = self.session_id(session)
        actions = [check_int(a, "action", lo=1, hi=2**62) for a in check_list(actions, "actions", max_len=10000)]
        if not actions:
            return actions, message("Nothing to undo", "you have no labeling action left to undo here.",
                                    color="info")
        user = self.account()
        result = undo(self.db(), actions[-1], author=user.name, session=sid, actor_role=user.role)
        back = ", ".join(f"{u}→{c or 'unlabeled'}" for u, c in sorted(result.restored.items())[:12])
        return actions[:-1], message("Undone", f"action {result.undone}: {back or 'no unit had changed'}.",
                                     color="success")

    # -- units -----------------------------------------------------------------------------------------------------------
    def unit_labels(self, layer: str, session) -> list[str]:
        """(unit,) concept id of each unit of the layer ('' when unlabeled) in a review session, the annotators
        merged (per unit, the concept most of them gave)."""
        n = self.store().layer_shape(layer)[0]
        labels = [""] * n
        for unit, concept in self.labels(session).get(layer, {}).items():
            if 0 <= int(unit) < n:
                labels[int(unit)] = concept
        return labels

    def labels(self, session, *, author: str | None = None) -> dict[str, dict[int, str]]:
        """{layer: {unit: concept}}: every labeled unit of this store in a review session (checked), the annotators
        merged, or one annotator's own labels."""
        from explain.labels import current_labels

        sid, db = self.session_id(session), self.db()
        return {layer: current_labels(db, layer, session=sid, author=author) for layer in self.store().layers}

    def labels_version(self, session) -> int:
        """The session's newest labeling action id: any label change (here or in another worker) makes a new one."""
        from sqlalchemy import func, select

        from store.annotations import LabelAction

        sid = self.session_id(session)
        with self.db().read() as s:
            return int(s.scalar(select(func.max(LabelAction.id)).where(LabelAction.session_id == sid)) or 0)

    def warm(self) -> list[str]:
        """Open now, before the first request, what the Review page's first report needs and every later one reuses:
        the store, the manifest (its 3,000 rows took about 0.3 s), the model, the images showing each concept, the
        stored probes read back from mlflow and each probed concept's verdict threshold (explain.verdict, about 0.1 s
        a concept). The serving entry points call it before they accept requests — never in a thread beside them: a
        background job forked while a thread holds a lock could hang. Returns what could not be opened ("what:
        why"), for the log; the pages still say it properly when asked."""
        from explain.probes import load_probe

        def probes():  # every stored probe's attributes read once, for the probes and for their thresholds
            versions = self.probes_version()
            for _c, _l, run_id in versions:
                load_probe(run_id, settings=self.settings)
            self.presence_thresholds(versions)

        problems = []
        for what, step in (("store", self.store), ("manifest", self.manifest), ("model", self.model),
                           ("images showing each concept", self.images_showing),
                           ("images the model was not fitted on", self.unfitted_images),
                           ("probes and their verdict thresholds", probes)):
            try:
                step()
            except Exception as e:  # noqa: BLE001 — a page asking for it later reports it in its own terms
                problems.append(f"{what}: {e}")
        return problems

    def probes_version(self) -> tuple:
        """(concept, layer, run id) of every stored probe version: a retrain or rollback anywhere changes it."""
        store = self.store()
        return tuple((c, l, store.probe(c, l).run_id) for c, l in store.probes())

    def db(self, *, fresh: bool = False):
        """The annotation database (store.annotations); `fresh` opens a new engine (a forked job process must not
        reuse the parent's connections)."""
        from store.annotations import open_database

        if fresh:
            return open_database(self.settings.database_url)
        return self._handle("db", lambda: open_database(self.settings.database_url))

    def unit_coords(self, layer: str, projection: str = "pca") -> np.ndarray:
        """float32 (unit, 2) of the unit map: the store's cached embedding, else PCA computed here (cheap)."""
        from explain.embeddings import pca_coords, read_maps, unit_profiles

        check_choice(projection, "projection", ("pca", "umap"))
        cached = read_maps(self.store(), layer)
        if f"unit_{projection}" in cached:
            return np.asarray(cached[f"unit_{projection}"])[:, :2]
        if projection == "umap":
            raise NotReady(f"no UMAP of layer {layer!r} yet: run `python -m explain maps --store {self.config.store}`")
        return self._views.get(("unit-pca", layer), lambda: pca_coords(unit_profiles(
            np.asarray(self.store().pooled(layer, "max"))))[0][:, :2])

    def review_unit_map(self, state, *, regions, layer, session):
        """(unit map figure, IoU summary) for the Review page: units above the IoU threshold enlarged."""
        from dash import html

        from . import figures
        from .components import stat

        state = self.open_state(state)
        layer = self.layer(layer)
        iou = self.region_iou(state.get("image"), layer, regions) if state.get("image") else None
        fig = figures.unit_map_figure(self.unit_coords(layer), labels=self.unit_labels(layer, session), iou=iou,
                                      threshold=self.config.iou_threshold, selected=state.get("unit"), layer=layer,
                                      uirevision=layer, height=330)
        if iou is None:
            info = html.Div("Draw a region on the patch to find the units that match it.", className="cl-muted")
        else:
            best = int(np.argmax(iou))
            above = int((iou > self.config.iou_threshold).sum())
            info = html.Div([stat("best unit", f"{best}"), stat("its IoU", f"{iou[best]:.2f}"),
                             stat(f"units with IoU > {self.config.iou_threshold:g}", str(above))],
                            className="cl-stats")
        return fig, info

    def prototype_tiles(self, layer: str, unit: int, *, k: int = 8, size: int = 88):
        """Gallery tiles of a unit's top-k prototypes, each with the unit's mask outlined."""
        from explain.prototypes import render_overlay, unit_prototypes

        from .components import Tile

        def build():
            store = self.store()
            tiles = []
            for p in unit_prototypes(store, layer, unit, k=k, level=self.config.mask_level):
                png = render_overlay(store.image(p.image), p.mask, color=(255, 212, 59), scale=2)
                tiles.append(Tile(src=_png_uri(png), caption=f"{p.value:.2f}",
                                  title=f"{p.image_id} · max activation {p.value:.3f}"))
            return tiles

        return self._views.get(("protos", layer, unit, k), build)

    def review_unit_detail(self, state, *, layer, session):
        """The clicked (or best) unit: its label, top-k prototypes with masks, and its mask on the open patch."""
        from dash import html
        from explain.prototypes import render_overlay

        from . import figures
        from .components import gallery

        state = self.open_state(state)
        layer = self.layer(layer)
        unit = state.get("unit")
        if unit is None:
            return html.Div("Click a unit in the map to see its prototypes and its mask on this patch.",
                            className="cl-muted")
        n = self.store().layer_shape(layer)[0]
        if unit >= n:
            raise InvalidInput("unit", f"{unit} is outside 0 … {n - 1} of layer {layer!r}")
        label = self.unit_labels(layer, session)[unit]
        head = html.Div([html.Strong(f"Unit {unit} of {layer}"),
                         html.Span(f" · {figures.concept_name(label)}" if label else " · unlabeled",
                                   className="cl-muted")])
        children = [head]
        if state.get("image"):
            row, _ = self.record(state["image"])
            mask = self.unit_mask(layer, row, unit)
            png = render_overlay(self.store().image(row), mask, color=(255, 212, 59), scale=2)
            children += [html.Div("On this patch", className="cl-section-title"),
                         html.Img(src=_png_uri(png), width=128, height=128, className="cl-tile",
                                  alt=f"unit {unit} on this patch")]
        children += [html.Div("Top prototypes (mask outlined, max activation)", className="cl-section-title"),
                     gallery(self.prototype_tiles(layer, unit), size=88)]
        return html.Div(children)

    # -- report ----------------------------------------------------------------------------------------------------------
    def report_view(self, state, *, layer, session):
        """The concept report of the open patch: units per concept, activation, area, probe scores, contributions."""
        from dash import html

        state = self.open_state(state)
        if not state.get("image"):
            return html.Div("Open a patch to see its report.", className="cl-muted")
        layer = self.layer(layer)
        # A report changes only with the labels and the probe versions: cache it on those (any worker's change
        # makes a new key), so revisiting a patch costs nothing and a new action recomputes it once.
        sid = self.session_id(session)
        versions = self.probes_version()
        key = ("report", sid, state["image"], layer, self.labels_version(sid), versions)
        return self._views.get(key, lambda: self._report(state["image"], layer, sid, versions))

    def presence(self, concept: str, *, versions: tuple | None = None) -> dict | None:
        """How the report decides that `concept` is present: explain.verdict.calibrate_presence on the images the
        manifest lists as showing it and on others — those the model was not fitted on (`unfitted_images`), or
        every image where they are too few —, once per version of the concept's probes; None where the
        concept has no probe, or the dataset does not annotate it (or there is no manifest, or it is not the one the
        store was extracted from): the report keeps 0.5.
        versions: `probes_version()` when the caller has it already (it reads every probe's attributes)."""
        from explain.errors import LabelError
        from explain.verdict import calibrate_presence

        try:
            shown = self.images_showing()
        except (NotReady, LabelError):  # no manifest, or not the store's: nothing to calibrate on
            return None
        if concept not in shown:
            return None
        versions = tuple(v for v in (self.probes_version() if versions is None else versions) if v[0] == concept)
        if not versions:  # no probe of it: no verdict
            return None
        store = self.store()

        def calibrate():
            # first the images the model was not fitted on: a cut chosen on its training patches differs
            cal = calibrate_presence(store, concept, shown[concept], reference=self.unfitted_images())
            if cal is not None:
                return {**cal, "unfitted": True}
            cal = calibrate_presence(store, concept, shown[concept])
            return None if cal is None else {**cal, "unfitted": False}

        return self._views.get(("presence", concept, versions), calibrate)

    def unfitted_images(self) -> np.ndarray:
        """Store rows of the images outside the manifest's training split (the model was fitted on that one)."""
        from explain.probe_eval import split_images

        store = self.store()
        return self._handle("unfitted-images", lambda: np.setdiff1d(np.arange(store.n_images),
                                                                    split_images(store, self.manifest(), "train")))

    def presence_thresholds(self, versions: tuple | None = None) -> dict[str, float]:
        """{concept: the verdict score from which the report calls it present} for each probed concept the dataset
        annotates (`presence`); the others keep 0.5. versions: `probes_version()` when the caller has it."""
        out, versions = {}, self.probes_version() if versions is None else versions
        for concept in sorted({c for c, _l, _r in versions}):
            cal = self.presence(concept, versions=versions)
            if cal is not None:
                out[concept] = cal["threshold"]
        return out

    def _report(self, image: str, layer: str, session: int, versions: tuple):
        from dash import dcc, html
        from explain.report import image_report

        from . import figures

        rep = image_report(self.store(), image, labels=self.labels(session), model=self.model(), settings=self.settings,
                           level=self.config.mask_level, gradcam_layer=layer, with_maps=False,
                           thresholds=self.presence_thresholds(versions))
        row = self.store().index_of(image)
        rows = []
        for concept, e in sorted(rep["concepts"].items()):
            units = e["units"]
            rows.append({
                "concept": concept,
                "units": float(len(units)),
                "activation": float(max((u["max"] / u["threshold"] if u["threshold"] > 0 else 0.0) for u in units))
                if units else 0.0,
                "area": self._union_area(row, [(u["layer"], u["unit"]) for u in units if u["fires"]]),
                "probe": float(e["probe"]["score"]) if "probe" in e else 0.0,  # the concept's verdict
                "contribution": float(sum(c["logit_change"] for c in e["contributions"])),
            })
        pred = rep["prediction"]
        head = html.Div([html.Strong(f"{pred['class']} ({pred['probability']:.2f})"),
                         html.Span(f" · ground truth {rep.get('label')}", className="cl-muted")])
        if not rows:
            return html.Div([head, html.P("No concept yet: draw a region and label units, or mark images on the "
                                          "Images page to train a probe.", className="cl-muted mt-2")])
        measures = [("units", "labeled units"), ("activation", "peak activation / threshold"),
                    ("area", "activated area (share of patch)", (0, 1)),
                    ("probe", "probe score (present from the dash)", (0, 1)),
                    ("contribution", "contribution (logit change)")]
        # each concept's verdict threshold: calibrated where the dataset annotates the concept, else PRESENT
        marks = [rep["concepts"][r["concept"]].get("probe", {}).get("threshold") for r in rows]
        fig = figures.report_figure(rows, measures=measures, marks={"probe": marks})
        return html.Div([head, dcc.Graph(figure=fig, config={"displayModeBar": False, "staticPlot": False})])

    def _union_area(self, row: int, units: list[tuple[str, int]]) -> float:
        """Share of the patch covered by the union of these units' masks on one image."""
        from explain.dissection import unit_masks

        if not units:
            return 0.0
        store, union = self.store(), np.zeros(self.patch_size(), bool)
        for layer in sorted({layer for layer, _ in units}):
            us = [int(u) for l, u in units if l == layer]
            thr = np.asarray(store.thresholds(layer, self.config.mask_level), np.float32)[us]
            union |= unit_masks(store.maps(layer, row)[us], thr, self.patch_size()).any(axis=0)
        return float(union.mean())

    # -- units page ------------------------------------------------------------------------------------------------------
    def unit_color_options(self) -> list[dict]:
        opts = [{"label": "concept", "value": "concept"}, {"label": "cluster", "value": "cluster"}]
        if self.has_ground_truth():
            opts.append({"label": "ground-truth IoU", "value": "gt_iou"})
        return opts

    def has_ground_truth(self) -> bool:
        """True when the dataset carries concept masks (the demo does), so units can be scored against them."""
        try:
            return any(r.masks for r in self.manifest().records[:50])
        except NotReady:
            return False

    def unit_clusters(self, layer: str) -> np.ndarray:
        """int64 (unit,): groups of units that fire together (cached in the store, else computed here)."""
        from explain.embeddings import read_maps, unit_groups, unit_profiles

        cached = read_maps(self.store(), layer)
        if "unit_groups" in cached:
            return np.asarray(cached["unit_groups"])
        return self._views.get(("unit-groups", layer), lambda: unit_groups(unit_profiles(
            np.asarray(self.store().pooled(layer, "max")))))

    def _dataset_cached(self, kind: str, layer: str, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
        """{name: array} that `compute` derives from the store's model, the dataset and `layer` at the mask level:
        computed once, kept in the workspace cache (shared by every worker and later starts) and per process."""
        store = self.store()
        run = str((store.attrs.get("model") or {}).get("run_id") or "model")
        path = (self.settings.cache_dir / kind /
                f"{self.config.store}-{run}-{self.manifest().sha256[:12]}-{layer}-{self.config.mask_level}.npz")

        def load():
            if path.is_file():
                with np.load(path, allow_pickle=False) as z:
                    return {name: z[name] for name in z.files}
            out = {name: np.asarray(v) for name, v in compute().items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{threading.get_ident()}.tmp.npz")
            np.savez(tmp, **out)
            tmp.replace(path)
            return out

        return self._handle(f"{kind}:{layer}:{self.config.mask_level}", load)

    def unit_gt_iou(self, layer: str) -> tuple[np.ndarray, list[str]]:
        """(best ground-truth IoU float32 (unit,), that concept per unit): Network Dissection of the layer against
        the dataset's concept masks (train and val patches), computed once (about a second)."""
        def compute():
            from explain.groundtruth import dataset_concept_iou

            res = dataset_concept_iou(self.store(), self.manifest(), [layer], level=self.config.mask_level)[layer]
            idx, best = res.best()
            return {"iou": np.asarray(best, np.float32), "concept": np.asarray([res.concepts[i] for i in idx], str)}

        z = self._dataset_cached("gt-iou", layer, compute)
        return z["iou"], [str(c) for c in z["concept"]]

    def segmented_rivals(self, layer: str) -> dict[str, np.ndarray]:
        """{concept: float64 (unit,)}: the dataset rules' rivals on `layer` (explain.groundtruth.segmented_rivals: each
        unit's IoU over every patch with the film labels, background, skin and pectoral muscle the app segments),
        computed once (a few seconds on the demo store)."""
        from explain.groundtruth import segmented_rivals

        return self._dataset_cached("rivals", layer, lambda: segmented_rivals(
            self.store(), self.manifest(), layer, level=self.config.mask_level))

    def unit_map(self, layer, *, projection, color_by, state, session):
        """The Units page's map: one point per unit, lasso-selectable."""
        from . import figures

        layer = self.layer(layer)
        color_by = check_choice(color_by, "color", ("concept", "cluster", "gt_iou"))
        state = state if isinstance(state, dict) else {}
        selected = state.get("unit")
        if selected is not None:
            selected = check_int(selected, "unit", lo=0, hi=65535)
        values = None
        labels = self.unit_labels(layer, session)
        if color_by == "cluster":
            values = self.unit_clusters(layer)
        elif color_by == "gt_iou":
            values, _best = self.unit_gt_iou(layer)
        return figures.unit_map_figure(self.unit_coords(layer, projection), labels=labels, color_by=color_by,
                                       values=values, selected=selected, layer=layer, dragmode="lasso",
                                       uirevision=f"{layer}-{projection}", height=600)

    def prototype_gallery(self, layer, state, *, session, max_units: int = 12, per_unit: int = 4):
        """Prototypes of the lasso-selected units: a row of top patches (mask outlined) per unit."""
        from dash import html

        from . import figures
        from .components import gallery

        layer = self.layer(layer)
        state = state if isinstance(state, dict) else {}
        units = [check_int(u, "unit", lo=0, hi=65535) for u in check_list(state.get("selected"), "selected",
                                                                           max_len=20000)]
        if not units:
            return html.Div("Lasso units on the map to see what they respond to.", className="cl-muted")
        n = self.store().layer_shape(layer)[0]
        labels = self.unit_labels(layer, session)
        rows = []
        for u in units[:max_units]:
            if u >= n:
                raise InvalidInput("selected", f"unit {u} is outside 0 … {n - 1} of layer {layer!r}")
            name = figures.concept_name(labels[u]) if labels[u] else "unlabeled"
            rows.append(html.Div([html.Div(f"unit {u} · {name}", className="cl-section-title"),
                                  gallery(self.prototype_tiles(layer, u, k=per_unit), size=72)]))
        more = len(units) - max_units
        if more > 0:
            rows.append(html.Div(f"… and {more} more units (select fewer to see them).", className="cl-muted cl-more"))
        return html.Div([html.Div(f"{len(units)} unit(s) selected", className="cl-muted"),
                         html.Div(rows, className="cl-unit-grid")])

    def unit_detail(self, layer, state, *, session):
        """One unit: activation histogram with its threshold, top-k prototypes, label history."""
        from dash import dcc, html

        from . import figures
        from .components import gallery

        layer = self.layer(layer)
        state = state if isinstance(state, dict) else {}
        unit = state.get("unit")
        if unit is None:
            return html.Div("Click a unit on the map.", className="cl-muted")
        unit = check_int(unit, "unit", lo=0, hi=65535)
        store = self.store()
        n = store.layer_shape(layer)[0]
        if unit >= n:
            raise InvalidInput("unit", f"{unit} is outside 0 … {n - 1} of layer {layer!r}")
        values = np.asarray(store.pooled(layer, "max"))[:, unit]
        threshold = float(store.thresholds(layer, self.config.mask_level)[unit])
        label = self.unit_labels(layer, session)[unit]
        hist = figures.histogram_figure(values, threshold=threshold, height=220,
                                        title=f"max activation per image · threshold (q{self.config.mask_level:g})")
        return html.Div([
            html.Div([html.Strong(f"Unit {unit} of {layer}"),
                      html.Span(f" · {figures.concept_name(label)}" if label else " · unlabeled", className="cl-muted")]),
            dcc.Graph(figure=hist, config={"displayModeBar": False}),
            html.Div("Top-k prototypes (mask outlined)", className="cl-section-title"),
            gallery(self.prototype_tiles(layer, unit, k=12), size=80),
            html.Div("Label history", className="cl-section-title"),
            self.label_history_table(layer, unit, session=session),
        ])

    def label_history_table(self, layer: str, unit: int, *, session):
        from dash import html

        rows = self.label_history(layer, unit, session=session)
        if not rows:
            return html.Div("Never labeled.", className="cl-muted")
        head = html.Thead(html.Tr([html.Th(h) for h in ("when", "who", "concept", "IoU", "image", "state")]))
        body = html.Tbody([html.Tr([html.Td(r.get("when", "")), html.Td(r.get("who", "")),
                                    html.Td(r.get("concept", "")), html.Td(f"{r['iou']:.2f}" if r.get("iou") is not None else ""),
                                    html.Td(r.get("image", "")), html.Td(r.get("state", ""))]) for r in rows])
        return html.Table([head, body], className="table table-sm")

    def label_history(self, layer: str, unit: int, *, session) -> list[dict]:
        """The unit's label changes in a review session, newest first: when, who, concept after, IoU, image, and
        whether undone."""
        from explain.labels import label_history

        rows = []
        sid = self.session_id(session)
        for item in label_history(self.db(), layer=layer, unit=unit, session=sid)[:50]:
            a = item["action"]
            for ch in item["changes"]:
                after = ch["after"] or {}
                when = a["created_at"]
                rows.append({"when": when.strftime("%Y-%m-%d %H:%M") if hasattr(when, "strftime") else str(when),
                             "who": a["author"], "concept": (after.get("concept") or "unlabeled").replace("_", " "),
                             "iou": after.get("iou"), "image": a["image_id"] or "",
                             "state": "undo" if a["kind"] == "undo" else ("undone" if a["undone_by"] else "")})
        return rows

    # -- images page -----------------------------------------------------------------------------------------------------
    def image_coords(self, layer: str) -> np.ndarray:
        """float32 (image, 2) of the image map: the store's cached embedding, else PCA computed here."""
        from explain.embeddings import image_features, pca_coords, read_maps

        cached = read_maps(self.store(), layer)
        for kind in ("image_umap", "image_pca"):
            if kind in cached:
                return np.asarray(cached[kind])[:, :2]
        return self._views.get(("image-pca", layer), lambda: pca_coords(image_features(
            np.asarray(self.store().pooled(layer, "max"))))[0][:, :2])

    def image_map(self, layer, *, color_by, concept, state):
        from . import figures

        layer = self.layer(layer)
        color_by = check_choice(color_by, "color", ("class", "prediction", "correct", "probe"))
        state = state if isinstance(state, dict) else {}
        store = self.store()
        selected = self._selected_rows(state)
        classes = list(store.classes or ["normal", "lesion"])
        labels = np.asarray(store.labels())
        pred = np.asarray(store.probs()).argmax(axis=1)
        if color_by == "class":
            values = [classes[i] for i in labels]
        elif color_by == "prediction":
            values = [classes[i] for i in pred]
        elif color_by == "correct":
            values = np.where(pred == labels, "correct", "wrong").tolist()
        else:
            concept = check_id(concept, "concept")
            if (concept, layer) not in set(store.probes()):
                raise NotReady(f"no probe for {concept.replace('_', ' ')!r} on layer {layer} yet: lasso images "
                               "and mark them as showing or not showing it")
            values = store.probe(concept, layer).scores
        return figures.image_map_figure(self.image_coords(layer), values=values, color_by=color_by,
                                        ids=store.image_ids, selected=selected, uirevision=layer, height=640)

    def _selected_rows(self, state) -> list[int]:
        rows = check_list((state or {}).get("selected"), "selected", max_len=20000)
        n = self.store().n_images
        out = [check_int(r, "selected image", lo=0, hi=n - 1) for r in rows]
        return out

    def selection_view(self, state, *, concept, layer):
        """(summary, gallery) of the lasso-selected images, with each one's current probe score when there is one."""
        from dash import html

        from .components import Tile, gallery

        rows = self._selected_rows(state)
        if not rows:
            return (html.Div("Lasso images on the map, then mark them.", className="cl-muted"),
                    html.Div("No selection.", className="cl-muted"))
        store = self.store()
        scores = None
        if isinstance(concept, str) and isinstance(layer, str) and (concept, layer) in set(store.probes()):
            scores = store.probe(concept, layer).scores
        prob = self.lesion_prob()
        tiles = [Tile(src=self._thumb(r, 72), caption=(f"score {scores[r]:.2f}" if scores is not None
                                                       else f"P {prob[r]:.2f}"), title=store.image_ids[r])
                 for r in rows[:24]]
        summary = html.Div([html.Strong(f"{len(rows)} image(s) selected"),
                            html.Span(" (first 24 shown)" if len(rows) > 24 else "", className="cl-muted")])
        return summary, gallery(tiles, size=72)

    # -- probes page -----------------------------------------------------------------------------------------------------
    def probe_view(self, probe, *, session=None):
        """(versions figure, which version is active + versions table, rollback options, maps gallery) of one probe.

        "current" marks the version the store serves to every session; "this session" the one last fitted or
        rolled back in `session` (when given: checked, AccessDenied for a non-member)."""
        from dash import html
        from explain.labels import recorded_probe_versions
        from explain.probes import probe_versions
        from explain.prototypes import probe_prototypes, render_overlay

        from . import figures
        from .components import Tile, gallery

        if not probe:
            empty = html.Div("No probe yet: label units on Review or mark images on Images.", className="cl-muted")
            return figures.empty_figure("no probe", height=300), empty, [], empty
        sid = self.session_id(session) if session is not None else None
        concept, layer = self.parse_probe(probe)
        versions = probe_versions(concept, layer, settings=self.settings)  # newest first
        current = self.store().probe(concept, layer).run_id
        mine = None
        if sid is not None:
            mine = next((p for p in recorded_probe_versions(self.db(), session=sid, concept=concept, layer=layer)
                         if p.active), None)
        number = {v["run_id"]: f"v{n} · {v['run_id'][:8]}" for n, v in zip(range(len(versions), 0, -1), versions)}
        fig = figures.probe_versions_figure(list(reversed(versions)), current=current)
        head = html.Thead(html.Tr([html.Th(h) for h in ("version", "annotations", "AUROC", "AP", "examples +/−",
                                                          "active")]))
        body = []
        for n, v in zip(range(len(versions), 0, -1), versions):
            marks = (["current"] if v["run_id"] == current else []) + \
                (["this session"] if mine is not None and v["run_id"] == mine.run_id else [])
            body.append(html.Tr([html.Td(number[v["run_id"]]), html.Td(v["n_annotations"]),
                                 html.Td(_fmt(v["auroc"])), html.Td(_fmt(v["ap"])),
                                 html.Td(f"{v['n_positive']} / {v['n_negative']}"), html.Td(" · ".join(marks))],
                                className="cl-row-current" if v["run_id"] == current else None))
        active = [html.Div([html.Strong("Active for the store: "),
                            html.Span(number.get(current, current[:8])),
                            html.Span(" (current) — every review session of this store sees this version.",
                                      className="cl-muted")])]
        if mine is None:
            active.append(html.Div("No version was fitted or rolled back in this session yet.", className="cl-muted"))
        elif mine.run_id != current:
            active.append(html.Div([html.Strong("This session: "), html.Span(number.get(mine.run_id, mine.run_id[:8])),
                                    html.Span(f" (by {mine.author}). The store's version was changed since, in "
                                              "another session or by a retrain elsewhere; roll back to "
                                              f"{number.get(mine.run_id, mine.run_id[:8]).split(' ·')[0]} to serve "
                                              "this session's version again.")], className="cl-warning-text"))
        else:
            active.append(html.Div(f"This session's active version (by {mine.author}) is the store's.",
                                   className="cl-muted"))
        active.append(self._presence_line(concept))
        table = html.Div([html.Div(active, className="cl-probe-active mb-2"),
                          html.Table([head, html.Tbody(body)], className="table table-sm table-hover")])
        options = [{"label": f"v{n} · {v['run_id'][:8]} · AUROC {_fmt(v['auroc'])}", "value": v["run_id"]}
                   for n, v in zip(range(len(versions), 0, -1), versions) if v["run_id"] != current]
        store = self.store()
        tiles = []
        for p in probe_prototypes(store, concept, layer, k=8):
            png = render_overlay(store.image(p.image), p.heatmap, alpha=0.6, scale=2)
            tiles.append(Tile(src=_png_uri(png), caption=f"score {p.value:.2f}", title=p.image_id))
        rng = np.random.default_rng(0)  # a fixed sample, so versions are compared on the same images
        sample = rng.choice(store.n_images, size=min(8, store.n_images), replace=False)
        stored = store.probe(concept, layer)
        for i in sample:
            heat = self.probe_map(probe, int(i))
            png = render_overlay(store.image(int(i)), heat, alpha=0.6, scale=2)
            tiles.append(Tile(src=_png_uri(png), caption=f"score {stored.scores[i]:.2f}", title=store.image_ids[i]))
        maps = html.Div([html.Div("Highest scores, then a fixed sample of images", className="cl-muted mb-2"),
                         gallery(tiles, size=88)])
        return fig, table, options, maps

    def annotations(self, concept: str, *, session: int, db=None):
        """Everything the reviewers of a session said about a concept, for its probes
        (explain.probes.ProbeAnnotations). `session` must already be checked (`session_id`)."""
        from explain.labels import image_marks, regions_for, units_for
        from explain.probes import ProbeAnnotations

        db = db or self.db()
        return ProbeAnnotations(concept, regions=[(r.image_id, r.mask())
                                                  for r in regions_for(db, concept, session=session)],
                                marks=list(image_marks(db, concept, session=session).items()),
                                units=units_for(db, concept, session=session))

    def mark_and_retrain(self, state, *, concept, layer, present, progress, session):
        """Background job: record the selected images as showing (or not) the concept, then retrain its probe.

        Returns (the new probe version's run id, message, the map's colouring); progress((value, label)) drives the
        progress bar.
        """
        import dash

        from explain.labels import mark_image

        from .components import message, user_errors

        layer = self.layer(layer)
        check_id(concept, "concept")
        rows = self._selected_rows(state)
        if present is not None and not rows:
            return dash.no_update, message("No selection", "lasso images on the map first.", color="info"), \
                dash.no_update
        progress = progress or (lambda _v: None)
        db = self.db(fresh=True)  # this runs in a job process: its own connections
        try:
            sid = self.session_id(session, db=db)  # AccessDenied: the job ends with that message, nothing written
            if present is not None:
                progress((5, f"recording {len(rows)} mark(s)"))
                store = self.store()
                for r in rows:
                    mark_image(db, store, image=int(r), concept=concept, present=bool(present), author=self.user(),
                               session=sid)
            run_id, text = self._retrain(concept, layer, db=db, progress=progress, session=sid)
        except user_errors() as e:
            progress((100, "stopped"))
            return dash.no_update, message("Probe not retrained", str(e), color="warning"), dash.no_update
        return run_id, message("Probe retrained", text, color="success"), "probe"

    def retrain_probe(self, probe, *, progress, session):
        """Background job for the Probes page: refit a probe from every annotation of its concept."""
        import dash

        from .components import message, user_errors

        concept, layer = self.parse_probe(probe)
        db = self.db(fresh=True)
        try:
            sid = self.session_id(session, db=db)
            run_id, text = self._retrain(concept, layer, db=db, progress=progress, session=sid)
        except user_errors() as e:
            progress((100, "stopped"))
            return dash.no_update, message("Probe not retrained", str(e), color="warning")
        return run_id, message("Probe retrained", text, color="success")

    def _retrain(self, concept: str, layer: str, *, db, progress, session: int) -> tuple[str, str]:
        import datetime

        from explain.probes import FeatureCache, retrain

        progress((20, "collecting examples"))
        ann = self.annotations(concept, db=db, session=session)
        store = self.writable_store()
        progress((40, "fitting the probe"))
        # the mlflow parent run that groups this reviewer's probe fits of the day in this review session
        run_group = f"{self.user()}-s{session}-{datetime.date.today().isoformat()}"
        # one cache per process and store: a Celery worker (or the server process a diskcache job forks from) loads a
        # layer's maps once, and the served model gives every version its TCAV scores
        cache = self._handle(("feature-cache", store.url),
                             lambda: FeatureCache(store, model=self.model(), settings=self.settings))
        results = retrain(store, ann, settings=self.settings, session=run_group, layers=[layer],
                          cache=cache, store_name=self.config.store)
        self._views.clear()
        r = results[0]
        metrics = r.fit.metrics
        from explain.labels import record_probe_version

        # the session keeps which probe versions its reviewers fitted (the report lists them with their metrics)
        record_probe_version(db, session=session, concept=concept, layer=layer, run_id=r.run_id, author=self.user(),
                             metrics={k: metrics.get(k) for k in ("auroc", "ap", "cv_auroc", "n_positive",
                                                                  "n_negative") if k in metrics})
        progress((100, "done"))
        return r.run_id, (f"{concept.replace('_', ' ')} @ {layer}: version {r.run_id[:8]} from "
                          f"{ann.n_annotations} annotation(s), held-out AUROC {_fmt(metrics.get('auroc'))}, "
                          f"AP {_fmt(metrics.get('ap'))}.")

    def writable_store(self):
        from store.activations import open_store

        return open_store(self.store().url, read_only=False)

    def rollback_probe(self, probe, run_id, *, session):
        """Make an earlier version current; returns (new version id for the views, message).

        The store holds one current version per probe, shared by every review session that reviews it (the pages,
        reports and overlays of all of them read it). So a rollback is checked against the session it is made in
        (membership; AccessDenied → 403, nothing changed) and recorded there as that session's active version
        (explain.labels.record_probe_version: audited, listed in the session report), like a retrain; the Probes
        page shows which version the store serves and which one each session last chose.
        """
        from explain.labels import record_probe_version
        from explain.probes import probe_versions, rollback

        from .components import message

        sid = self.session_id(session)
        concept, layer = self.parse_probe(probe)
        check_id(run_id, "version")
        versions = {v["run_id"]: v for v in probe_versions(concept, layer, settings=self.settings)}
        if run_id not in versions:
            raise InvalidInput("version", f"{run_id!r} is not a version of probe {probe!r}")
        rollback(self.writable_store(), concept, layer, run_id, settings=self.settings)
        self._views.clear()
        v = versions[run_id]
        record_probe_version(self.db(), session=sid, concept=concept, layer=layer, run_id=run_id, author=self.user(),
                             metrics={k: v.get(k) for k in ("auroc", "ap", "cv_auroc", "n_positive", "n_negative")
                                      if v.get(k) is not None})
        return run_id, message("Rolled back", f"probe {probe} now uses version {run_id[:8]} for the store, in every "
                                              f"session that reviews it; recorded in this session.",
                               color="success")

    def _presence_line(self, concept: str):
        """One line on how the image report decides that the concept is present (`presence`)."""
        from dash import html

        from explain.probes import PRESENT

        from .figures import concept_name

        cal = self.presence(concept)
        if cal is None:
            return html.Div(f"The image report calls {concept_name(concept)} present from a probe score of "
                            f"{PRESENT:g}: the dataset does not say which images show it, so nothing to calibrate "
                            f"on.", className="cl-muted")
        where = "its map across " + ", ".join(cal["layers"]) if len(cal["layers"]) > 1 else cal["layers"][0]
        return html.Div([html.Strong("Image report: "),
                         html.Span(f"{concept_name(concept)} present from a score of {cal['threshold']:.2f} on "
                                   f"{where}, calibrated on {cal['n_with']} images the dataset lists as showing it "
                                   f"and {cal['n_without']} others"
                                   + (" the model was not trained on" if cal["unfitted"] else "")
                                   + f" (there: sensitivity {cal['sensitivity']:.2f}, "
                                   f"specificity {cal['specificity']:.2f}).")])

    # -- experiments page ------------------------------------------------------------------------------------------------
    def _mlflow(self):
        from mlflow.tracking import MlflowClient

        return self._handle("mlflow", lambda: MlflowClient(tracking_uri=self.settings.tracking_uri))

    def run_options(self) -> list[dict]:
        """Finished training and probe runs of the tracking store, newest first."""
        client = self._mlflow()
        exps = client.search_experiments()
        if not exps:
            return []
        runs = client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time DESC"],
                                  max_results=200)
        names = {e.experiment_id: e.name for e in exps}
        out = []
        for r in runs:
            if r.data.tags.get("conceptlens.kind") == "session":
                continue  # a review session's parent run holds no metrics of its own
            when = __import__("datetime").datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
            out.append({"label": f"{names.get(r.info.experiment_id, '?')} · {r.info.run_name} · {when}",
                        "value": r.info.run_id})
        return out

    def _runs(self, run_ids) -> list:
        from mlflow.exceptions import MlflowException

        run_ids = check_list(run_ids, "runs", max_len=12)
        out = []
        for rid in run_ids:
            check_id(rid, "run")
            try:
                out.append(self._mlflow().get_run(rid))
            except MlflowException:
                raise InvalidInput("runs", f"{rid!r} is not a run of the tracking store") from None
        return out

    def runs_view(self, run_ids, metric):
        """(parameter-difference table, metric options, chosen metric, ROC view, message) of the chosen runs."""
        from dash import html

        runs = self._runs(run_ids)
        if not runs:
            return html.Div("Choose runs above.", className="cl-muted"), [], None, html.Div(), None
        keys = sorted({k for r in runs for k in r.data.params})
        differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1] if len(runs) > 1 else keys
        head = html.Thead(html.Tr([html.Th("parameter")] + [html.Th(r.info.run_name or r.info.run_id[:8],
                                                                     title=r.info.run_id) for r in runs]))
        body = [html.Tr([html.Td(k)] + [_param_cell(r.data.params.get(k, "—")) for r in runs]) for k in differ]
        final = sorted({k for r in runs for k in r.data.metrics})
        body += [html.Tr([html.Td(html.Strong(k))] + [html.Td(_fmt(r.data.metrics.get(k))) for r in runs])
                 for k in final if k.startswith(("test/", "best/", "auroc", "ap"))]
        table = html.Table([head, html.Tbody(body)], className="table table-sm cl-params") if body else \
            html.Div("These runs have the same parameters.", className="cl-muted")
        # the panel is titled "Parameters that differ": with one run there is nothing to differ from
        caption = (f"One run: all {len(keys)} of its parameters. Choose more runs to see only those that differ."
                   if len(runs) == 1 else f"{len(runs)} runs: the {len(differ)} of {len(keys)} parameters that "
                                          "differ, then their final metrics.")
        table = html.Div([html.P(caption, className="cl-muted small mb-2"), table])
        options = [{"label": k, "value": k} for k in final]
        if metric not in final:
            metric = next((k for k in ("val/auroc", "val/loss", "auroc") if k in final), final[0] if final else None)
        return table, options, metric, self.roc_view(runs), None

    def metric_curves(self, run_ids, metric):
        from . import figures

        runs = self._runs(run_ids)
        if not runs or not metric:
            return figures.empty_figure("choose runs and a metric", height=340)
        check_id(metric, "metric")
        curves = {}
        for r in runs:
            hist = self._mlflow().get_metric_history(r.info.run_id, metric)
            if hist:
                curves[r.info.run_name or r.info.run_id[:8]] = sorted((m.step, m.value) for m in hist)
        return figures.metric_curves_figure(curves, metric=metric, height=340)

    def roc_view(self, runs):
        """ROC curves of the runs: interactive from a logged figures/test_roc.json, else the logged PNG."""
        from dash import dcc, html

        from . import figures

        curves, marks, images = {}, set(), []
        for r in runs:
            name = r.info.run_name or r.info.run_id[:8]
            kind, value = self._roc(r) or (None, None)
            if kind == "curve":
                *curves[name], mark = value
                marks.add(mark)
            elif kind == "png":
                images.append((name, value))
        children = []
        if curves:  # the operating point is marked when every run logged the same one
            mark = marks.pop() if len(marks) == 1 else None
            children.append(dcc.Graph(figure=figures.roc_figure(curves, specificity=mark, height=360),
                                      config={"displaylogo": False}))
        for name, uri in images:
            children.append(html.Figure([html.Img(src=uri, style={"maxWidth": "100%", "maxHeight": "340px"}),
                                         html.Figcaption(name, className="cl-muted")], className="cl-roc"))
        return html.Div(children or html.Div("No ROC logged for these runs (probe runs log AUROC and AP only).",
                                             className="cl-muted"), className="cl-gallery")

    def _roc(self, run) -> tuple | None:
        """A run's logged ROC: ("curve", (fpr, tpr, auroc, specificity)) from figures/test_roc.json (`_roc_curve`),
        else ("png", data URI) from figures/test_roc.png, else None. The artifact store is asked once which figures the run has (a run without
        them costs one listing, not two failed downloads), and a finished run's answer is kept: what it logged no
        longer changes, and choosing the same runs again redraws at once."""
        from mlflow.exceptions import MlflowException

        rid = run.info.run_id
        try:
            if run.info.status == "FINISHED":
                return self._views.get(("roc", rid), lambda: self._read_roc(rid))
            return self._read_roc(rid)
        except (MlflowException, OSError):
            return None  # the artifact store could not be read: nothing kept, asked again next time

    def _read_roc(self, run_id: str) -> tuple | None:
        import tempfile

        client = self._mlflow()
        logged = {a.path for a in client.list_artifacts(run_id, "figures")}
        for artifact in ("figures/test_roc.json", "figures/test_roc.png"):
            if artifact not in logged:
                continue
            with tempfile.TemporaryDirectory(prefix="conceptlens-roc-") as tmp:
                local = Path(client.download_artifacts(run_id, artifact, tmp))
                if artifact.endswith(".png"):
                    return "png", _png_uri(local.read_bytes())
                curve = _roc_curve(local.read_bytes())
                if curve is not None:
                    return "curve", curve
        return None


def _roc_curve(text: bytes | str) -> tuple | None:
    """(fpr, tpr, auroc or None, specificity or None) from a logged figures/test_roc.json, or None when it is not
    that: an artifact store holds what anyone logged, and one bad file must not break the page."""
    import json
    import math

    def number(v) -> bool:  # a rate or a probability
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1

    try:
        d = json.loads(text)
    except ValueError:
        return None
    if not isinstance(d, dict):
        return None
    fpr, tpr, auroc, spec = d.get("fpr"), d.get("tpr"), d.get("auroc"), d.get("specificity")
    if not (isinstance(fpr, list) and isinstance(tpr, list) and 2 <= len(fpr) == len(tpr) <= 100_000
            and all(map(number, fpr)) and all(map(number, tpr))):
        return None
    return fpr, tpr, (auroc if number(auroc) else None), (spec if number(spec) else None)


SAVED_REGION_COLOR = "#f783ac"  # regions reviewers saved (labeled) in the session: outlined, never editable here

# The default vocabulary (docs/CONTRACTS.md), in the BI-RADS spirit; users add their own.
DEFAULT_VOCABULARY = ("mass", "calcification", "spiculated_margin", "circumscribed_margin",
                      "architectural_distortion", "skin", "film_label", "normal_tissue")
_CONCEPT_ID = __import__("re").compile(r"[a-z][a-z0-9_]{0,39}")


def concept_id(typed) -> str:
    """A typed concept name → its id: lower case, spaces to '_'; UserInputError for anything else."""
    from .errors import UserInputError

    if not isinstance(typed, str):
        raise InvalidInput("concept", f"expected text, got {type(typed).__name__}")
    cid = "_".join(typed.strip().lower().replace("-", " ").split())
    if not _CONCEPT_ID.fullmatch(cid):
        raise UserInputError(f"concept {typed[:60]!r}: start with a letter; use letters, digits, spaces, '-' or "
                             "'_' (at most 40)")
    return cid


def _png_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


PARAM_SHOWN = 60  # characters of a parameter value the Experiments table shows; the whole value is its tooltip


def _param_cell(value):
    """A parameter value's table cell: cut to PARAM_SHOWN characters with an ellipsis, the whole value in its
    tooltip (mlflow keeps values up to 6,000 characters: a data digest or the per-split counts as JSON)."""
    from dash import html

    text = str(value)
    if len(text) <= PARAM_SHOWN:
        return html.Td(text)
    return html.Td(text[:PARAM_SHOWN - 1] + "…", title=text)


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
