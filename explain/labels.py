"""Unit labels: the labeling rule applied to a drawn region, provenance, undo, and the queries probes and views use.

    >>> from explain.labels import label_region, undo, current_labels, LabelRule
    >>> db = open_database(settings.database_url); store = open_store(settings.store_url("demo"))
    >>> r = label_region(db, store, layer="features.9", image="p0012", region=[Polygon(pts)], concept="mass",
    ...                  author="ana")                       # IoU of the region with every unit, then the rule
    >>> r.changed                                             # {unit: (old concept | None, "mass")}
    >>> current_labels(db, "features.9")                      # {unit: concept}
    >>> undo(db, r.action_id, author="ana")                   # every unit back to exactly its previous label

The rule (DESIGN.md §4, the published default): after a region is drawn on an image and a concept chosen, every unit
whose IoU with the region exceeds `threshold` (0.2) and exceeds the IoU behind its current label takes the new
concept (same concept: its evidence becomes the higher IoU). A label given by name (`name_unit`) has no IoU and the
rule never overrides it. Every label keeps its provenance — who, when, which image, which region (its shapes), the IoU
and the action — and every action can be undone as long as no later action changed the same units.

Bad input (an unknown layer, unit, image or concept, an empty or malformed region, IoUs of the wrong length) raises
before anything is written, and each action is one write transaction: on any error nothing stored changes.

Probes read: `regions_for(db, concept)` (drawn regions, with masks), `image_marks(db, concept)` (images marked as
showing or not showing it) and `units_for(db, concept)` / `current_labels(db, layer)` (labeled units).

Review sessions (schema v2, docs/CONTRACTS.md): every function takes `session` (default 1, the built-in
"Workspace" session, so callers that never name one keep working) and sees only that session's rows. Labels are
kept per annotator: the rule runs against the author's own labels, and `current_labels` / `units_for` /
`unit_labels` with `author=None` merge the annotators (per unit, the concept most annotators gave; ties go to the
most recent label). Rights are the caller's job (store.accounts.require_member); what is enforced here:
- `undo` of another author's action needs `can_remove` (a researcher never undoes a radiologist's work);
- `label_region(request_id=…)`: a repeated (session, author, request_id) returns the first result with
  `replayed=True` and writes nothing — also under concurrent retries (a unique constraint backs the check); the same
  key reused for a different request (layer, image or concept) is refused with LabelError;
- items changed in place take `expected_version` (`name_unit`, `mark_image`, `edit_comment`, `delete_comment`):
  a stale one raises store.errors.ConflictError naming who changed it and when; nothing is written;
- writes to an unknown or archived session raise LabelError; every author becomes a user (store.accounts
  .ensure_author: a name never seen gets a password-less radiologist account, as the migration does for v1 authors);
- every write appends to the audit log in the same transaction.
On PostgreSQL, label writes of one (session, author, layer) are serialized by an advisory transaction lock (SQLite
serializes every write with BEGIN IMMEDIATE), so concurrent requests of one annotator never interleave.

Probe versions: `record_probe_version(db, session=…, concept, layer, run_id, author, metrics)` records a fitted
probe (the mlflow run) as the active version of (session, concept, layer); `recorded_probe_versions` lists them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from store.accounts import UserInfo, audit, can_remove, ensure_author, role_of
from store.annotations import (
    WORKSPACE_SESSION,
    Comment,
    Concept,
    Database,
    ImageMark,
    LabelAction,
    LabelChange,
    ProbeVersion,
    Region,
    ReviewSession,
    UnitLabel,
    parse_time,
    utcnow,
)
from store.errors import AccessDenied, ConflictError

from .dissection import DEFAULT_LEVEL, UnitIoU, patch_size, resolve_image
from .errors import (
    LabelError,
    RegionError,
    UnknownActionError,
    UnknownConceptError,
    UnknownLayerError,
    UnknownUnitError,
)
from .regions import MaskRegion, RegionSpec, rasterize_regions, regions_from_json, regions_to_json

__all__ = [
    "DatasetLabelRule",
    "LabelRule",
    "LabelResult",
    "UndoResult",
    "UnitLabelInfo",
    "RegionRecord",
    "CommentInfo",
    "ProbeVersionInfo",
    "decide_labels",
    "label_region",
    "apply_ious",
    "name_unit",
    "undo",
    "current_labels",
    "unit_labels",
    "units_for",
    "annotators",
    "label_history",
    "regions_for",
    "mark_image",
    "unmark_image",
    "image_marks",
    "concepts",
    "add_concept",
    "add_comment",
    "edit_comment",
    "delete_comment",
    "comments",
    "record_probe_version",
    "recorded_probe_versions",
]


@dataclass(frozen=True)
class LabelRule:
    """The labeling rule. Defaults are the published ones."""

    threshold: float = 0.2  # a unit's IoU with the region must exceed this …
    above_current: bool = True  # … and exceed the IoU behind its current label (False: any IoU above threshold)

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) < 1.0:
            raise LabelError(f"rule threshold must be in [0, 1), got {self.threshold!r}")


@dataclass(frozen=True)
class DatasetLabelRule:
    """The alternative rule measured against ground truth (explain.labelrules.DatasetRule): after each drawing, every
    unit takes the drawn concept whose dataset-level IoU, estimated from all of the author's drawings in the session,
    is its highest and above `threshold` (0.04, Network Dissection's detector criterion); a unit whose estimate no
    longer clears it for any drawn concept loses its label. Labels named by hand are never touched. With rivals
    (label_region's `known`) the estimate must also beat the unit's IoU with each of them.
    probes=True: the estimate of explain.labelrules.ProbeAssistedRule (a probe of each drawn concept, fitted from the
    same drawings, carries them over to every image showing the concept; it measures better against ground truth, and
    costs a probe fit of the concept drawn, done before the write transaction)."""

    threshold: float = 0.04
    probes: bool = False

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) < 1.0:
            raise LabelError(f"rule threshold must be in [0, 1), got {self.threshold!r}")


@dataclass(frozen=True)
class LabelResult:
    action_id: int
    region_id: int | None
    layer: str
    concept: str
    image_id: str | None
    changed: dict[int, tuple[str | None, str | None]]  # unit → (previous concept or None, new concept or None)
    ious: np.ndarray | None = field(default=None, repr=False)  # float32 (unit,) when computed (None on a replay)
    replayed: bool = False  # True: this request_id was stored before; nothing was written now
    session: int = WORKSPACE_SESSION


@dataclass(frozen=True)
class UndoResult:
    action_id: int  # the undo's own action id
    undone: int  # the action it undid
    restored: dict[int, str | None]  # unit → concept of the action's author after the undo (None: unlabeled again)


@dataclass(frozen=True)
class UnitLabelInfo:
    layer: str
    unit: int
    concept: str
    iou: float | None
    author: str
    created_at: object
    image_id: str | None
    region_id: int | None
    action_id: int
    version: int
    session: int = WORKSPACE_SESSION
    n_annotators: int = 1  # merged view: how many annotators gave this concept (of `n_labeled` who labeled it)
    n_labeled: int = 1


@dataclass(frozen=True)
class RegionRecord:
    """A stored region: `specs` in patch coordinates on image `image_id`, drawn on a (height, width) patch."""

    id: int
    image_id: str
    concept: str
    specs: list[RegionSpec]
    shape: tuple[int, int]
    area: int
    author: str
    created_at: object
    session: int = WORKSPACE_SESSION
    version: int = 1

    def mask(self) -> np.ndarray:
        """bool (y, x) of the patch size."""
        return rasterize_regions(self.specs, self.shape)


@dataclass(frozen=True)
class CommentInfo:
    id: int
    session: int
    image_id: str
    author: str
    text: str
    created_at: object
    updated_at: object
    deleted_at: object
    version: int


@dataclass(frozen=True)
class ProbeVersionInfo:
    id: int
    session: int
    concept: str
    layer: str
    run_id: str
    author: str
    created_at: object
    metrics: dict
    active: bool


# -- the rule (pure) ---------------------------------------------------------------------------------------------------
def decide_labels(ious: np.ndarray, current_iou: np.ndarray, rule: LabelRule = LabelRule()) -> np.ndarray:
    """bool (unit,): which units take the new concept.

        >>> decide_labels(np.array([.5, .3, .1]), np.array([0, .4, 0]))      # → [True, False, False]

    current_iou (unit,): the IoU behind each unit's current label, 0 for unlabeled units and +inf for units named
    by hand (never overridden).
    """
    ious = np.asarray(ious, dtype=np.float64)
    take = ious > rule.threshold
    if rule.above_current:
        take &= ious > np.asarray(current_iou, dtype=np.float64)
    else:
        take &= ~np.isinf(current_iou)
    return take


# -- validation --------------------------------------------------------------------------------------------------------
def _check_layer(store, layer: str) -> int:
    if layer not in store.layers:
        raise UnknownLayerError(layer, known=store.layers, where=str(store.url))
    return int(store.layer_shape(layer)[0])


def _check_author(author) -> str:
    if not isinstance(author, str) or not author.strip() or len(author) > 200:
        raise LabelError(f"author must be a non-empty name of at most 200 characters, got {author!r}")
    return author.strip()


def _check_session_id(session) -> int:
    if isinstance(session, bool) or not isinstance(session, (int, np.integer)) or not 0 < int(session) < 2**62:
        raise LabelError(f"session must be a review session id (a positive integer), got {session!r}")
    return int(session)


def _open_session(s, session: int, *, write: bool) -> ReviewSession:
    rs = s.get(ReviewSession, session)
    if rs is None:
        raise LabelError(f"no review session {session}")
    if write and rs.archived_at is not None:
        raise LabelError(f"review session {session} ({rs.name!r}) is archived: it can be read, not changed")
    return rs


def _check_request_id(request_id) -> str | None:
    if request_id is None:
        return None
    if not isinstance(request_id, str) or not re.fullmatch(r"[\x21-\x7e]{1,128}", request_id):
        raise LabelError(f"request_id must be 1 to 128 printable ASCII characters without spaces, got "
                         f"{str(request_id)[:40]!r}")
    return request_id


def _check_version_arg(expected_version, what: str, *, required: str | None = None) -> int | None:
    """The version an editor saw (None: no check), or LabelError; `required` names the writer that needs one."""
    if expected_version is None:
        if required:
            raise LabelError(f"{required} needs expected_version (the version the editor saw)")
        return None
    if isinstance(expected_version, bool) or not isinstance(expected_version, (int, np.integer)) \
            or expected_version < 0:
        raise LabelError(f"expected_version of {what} must be a non-negative integer, got {expected_version!r}")
    return int(expected_version)


def _check_concept(session, concept) -> str:
    if not isinstance(concept, str) or session.get(Concept, concept) is None:
        known = session.scalars(select(Concept.id).order_by(Concept.id)).all()
        raise UnknownConceptError(concept, known=known)
    return concept


def _region_specs(region, shape: tuple[int, int]) -> tuple[list[RegionSpec], np.ndarray]:
    """A mask or specs (or their JSON) → (specs to store, bool mask of `shape`)."""
    if isinstance(region, np.ndarray) and region.dtype != object:
        mask = np.asarray(region, dtype=bool)
        if mask.shape != shape:
            raise RegionError(f"region mask of shape {mask.shape} does not match the patch size {shape}")
        specs: list[RegionSpec] = [MaskRegion.from_mask(mask)]
    elif isinstance(region, list) and region and isinstance(region[0], dict):
        specs = regions_from_json(region)
    else:
        specs = list(region) if isinstance(region, (list, tuple)) else [region]
    mask = rasterize_regions(specs, shape)
    return specs, mask


def _serialize(s, *parts) -> None:
    """PostgreSQL: hold a transaction-scoped advisory lock on `parts` (SQLite's BEGIN IMMEDIATE already serializes
    every writer), so two requests of one annotator on one layer never read the same labels and both write."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                  {"k": "conceptlens:" + ":".join(map(str, parts))})


def _current(session, sid: int, author: str, layer: str) -> dict[int, UnitLabel]:
    q = select(UnitLabel).where(UnitLabel.session_id == sid, UnitLabel.author == author, UnitLabel.layer == layer)
    return {lab.unit: lab for lab in session.scalars(q)}


def _set_label(session, action: LabelAction, layer: str, unit: int, existing: UnitLabel | None, *, concept: str,
               iou: float | None, author: str, image_id: str | None, region_id: int | None, now) -> None:
    before = existing.snapshot() if existing is not None else None
    if existing is None:
        existing = UnitLabel(session_id=action.session_id, author=author, layer=layer, unit=unit, version=0)
        session.add(existing)
    existing.concept, existing.iou, existing.created_at = concept, iou, now
    existing.image_id, existing.region_id, existing.action_id = image_id, region_id, action.id
    existing.version = (existing.version or 0) + 1
    session.add(LabelChange(session_id=action.session_id, action_id=action.id, layer=layer, unit=unit,
                            before=before, after=existing.snapshot()))


def _remove_label(session, action: LabelAction, layer: str, unit: int, existing: UnitLabel) -> None:
    session.add(LabelChange(session_id=action.session_id, action_id=action.id, layer=layer, unit=unit,
                            before=existing.snapshot(), after=None))
    session.delete(existing)


def _apply_dataset_rule(s, store, action: LabelAction, current: dict[int, UnitLabel], *, rule: DatasetLabelRule,
                        level: float, shown, now, cache=None,
                        known=None) -> dict[int, tuple[str | None, str | None]]:
    """The dataset rule over every drawing of the action's author in its session (the new one included, flushed):
    units whose estimated best concept changed take it (or lose their label); hand-named labels stay. `known`: the
    rivals (label_region); a concept the author drew is estimated from the drawings instead."""
    from .labelrules import DatasetRule, ProbeAssistedRule

    q = select(Region).where(Region.session_id == action.session_id, Region.author == action.author,
                             Region.deleted_at.is_(None)).order_by(Region.id)
    records = _region_records(s, q)
    drawn = {r.concept for r in records if r.concept in shown}
    rivals = {c: v for c, v in (known or {}).items() if c not in drawn}
    kind, extra = (ProbeAssistedRule, {"cache": cache}) if rule.probes else (DatasetRule, {})
    est = kind.from_regions(store, action.layer, records, concepts=list(shown), shown=shown,
                            threshold=rule.threshold, level=level, known=rivals, **extra)
    targets, iou = est.labels(), est.iou()
    changed: dict[int, tuple[str | None, str | None]] = {}
    for unit in sorted(set(targets) | set(current)):
        old, new = current.get(unit), targets.get(unit)
        if old is not None and old.iou is None:
            continue  # named by hand: never overridden
        if new is None and old is not None:
            changed[unit] = (old.concept, None)
            _remove_label(s, action, action.layer, unit, old)
        elif new is not None and (old is None or old.concept != new):
            changed[unit] = (old.concept if old is not None else None, new)
            _set_label(s, action, action.layer, unit, old, concept=new, iou=float(iou[est.concepts.index(new), unit]),
                       author=action.author, image_id=action.image_id, region_id=action.region_id, now=now)
    return changed


def _warm_probe_fits(db, store, *, layer: str, regions: list[RegionRecord], shown, rule: DatasetLabelRule,
                     level: float, cache) -> None:
    """Fit, before the write transaction, the probes its estimate will need (the author's stored drawings and the
    new one), so the transaction finds them in `cache` (FeatureCache.drawing_fits, with the unit masks pulled back)
    and holds the database's write lock for the estimate alone, not for probe fits. A drawing stored meanwhile by
    the same author only means one fit inside."""
    from .labelrules import ProbeAssistedRule

    ProbeAssistedRule.from_regions(store, layer, regions, concepts=list(shown), shown=shown,
                                   threshold=rule.threshold, level=level, cache=cache).prepare()


def _last_writer(s, sid: int, layer: str, unit: int, author: str) -> tuple[str | None, object]:
    """(who, when) of the latest action that changed `author`'s label of a unit (for conflict messages)."""
    q = (select(LabelChange, LabelAction).join(LabelAction, LabelAction.id == LabelChange.action_id)
         .where(LabelChange.session_id == sid, LabelChange.layer == layer, LabelChange.unit == unit)
         .order_by(LabelChange.id.desc()).limit(50))
    for ch, act in s.execute(q):
        if author in ((ch.after or {}).get("author"), (ch.before or {}).get("author")):
            return act.author, act.created_at
    return None, None


# -- labeling ----------------------------------------------------------------------------------------------------------
def label_region(db: Database, store, *, layer: str, image, region, concept: str, author: str,
                 rule: LabelRule | DatasetLabelRule = LabelRule(), level: float = DEFAULT_LEVEL,
                 dissect: UnitIoU | None = None, session: int = WORKSPACE_SESSION,
                 request_id: str | None = None, shown=None, cache=None, known=None) -> LabelResult:
    """Store a drawn region, compute its IoU with every unit of `layer` on `image`, and apply the rule to the
    author's own labels in `session`.

    image: id or index in `store`; region: bool mask (y, x), region specs, or their JSON, in patch coordinates.
    `dissect` (a UnitIoU for this store and layer) avoids rebuilding thresholds and geometry per call.
    `request_id`: a client-chosen key; repeating it returns the first result (`replayed=True`), writing nothing.
    `shown` ({concept: store indices of the images showing it}, explain.labelrules.images_showing): needed by
    DatasetLabelRule; drawings of concepts it does not list are stored but weigh in no unit's label. `cache` (an
    explain.probes.FeatureCache of the store, kept by the caller) spares DatasetLabelRule(probes=True) reading the
    layer's maps and pulling back its unit masks at every drawing. `known` ({concept: float (unit,)}): the rivals
    of DatasetLabelRule, each unit's dataset-level IoU on `layer` with concepts the app segments on every film by
    itself (film labels, background, skin, pectoral muscle; explain.groundtruth.segmented_rivals): a unit takes a
    drawn concept only where its estimate beats them too (explain.labelrules.DatasetRule). A concept the author drew
    in the session is no rival: its drawings are estimated like any other's.
    """
    n_units = _check_layer(store, layer)
    index = resolve_image(store, image)
    author = _check_author(author)
    sid = _check_session_id(session)
    request_id = _check_request_id(request_id)
    if request_id is not None:  # a retry skips the IoU work (checked again inside the write transaction)
        replay = _replay(db, sid, author, request_id, layer=layer, image_id=store.image_ids[index], concept=concept)
        if replay is not None:
            return replay
    specs, mask = _region_specs(region, patch_size(store))
    if dissect is None or dissect.layer != layer or dissect.store is not store or dissect.level != float(level):
        dissect = UnitIoU(store, layer, level=level)
    ious = dissect.compute(index, mask)
    assert ious.shape == (n_units,)
    return apply_ious(db, store, layer=layer, image=store.image_ids[index], concept=concept, author=author,
                      ious=ious, specs=specs, mask=mask, rule=rule, rule_extra={"level": float(level)},
                      session=sid, request_id=request_id, shown=shown, cache=cache, known=known)


def _replay(db: Database, sid: int, author: str, request_id: str, *, layer: str, image_id: str | None,
            concept: str) -> LabelResult | None:
    with db.read() as s:
        return _replay_in(s, sid, author, request_id, layer=layer, image_id=image_id, concept=concept)


def _replay_in(s, sid: int, author: str, request_id: str, *, layer: str, image_id: str | None,
               concept: str) -> LabelResult | None:
    action = s.scalar(select(LabelAction).where(LabelAction.session_id == sid, LabelAction.author == author,
                                                LabelAction.request_id == request_id))
    if action is None:
        return None
    if (action.layer, action.image_id, action.concept) != (layer, image_id, concept):
        raise LabelError(f"request_id {request_id!r} of {author} was already used for another request (action "
                         f"{action.id}: {action.concept} on image {action.image_id}, layer {action.layer}); "
                         f"use a new request_id for a new request")
    changes = s.scalars(select(LabelChange).where(LabelChange.action_id == action.id).order_by(LabelChange.unit))
    changed = {c.unit: ((c.before or {}).get("concept"), (c.after or {}).get("concept")) for c in changes}
    return LabelResult(action_id=action.id, region_id=action.region_id, layer=action.layer, concept=action.concept,
                       image_id=action.image_id, changed=changed, ious=None, replayed=True, session=sid)


def apply_ious(db: Database, store, *, layer: str, image, concept: str, author: str, ious: np.ndarray,
               specs: Sequence[RegionSpec], mask: np.ndarray | None = None,
               rule: LabelRule | DatasetLabelRule = LabelRule(), rule_extra: dict | None = None,
               session: int = WORKSPACE_SESSION, request_id: str | None = None, shown=None,
               cache=None, known=None) -> LabelResult:
    """Store the region `specs` and apply the rule to precomputed IoUs (unit,) — one transaction.

    For callers that computed the IoUs themselves (label_region, the simulated reviewer). DatasetLabelRule reads
    the author's drawings of the session instead of `ious` and needs `shown` (and takes `known`; see label_region).
    """
    n_units = _check_layer(store, layer)
    image_id = store.image_ids[resolve_image(store, image)]
    author = _check_author(author)
    sid = _check_session_id(session)
    request_id = _check_request_id(request_id)
    ious = np.asarray(ious, dtype=np.float32).reshape(-1)
    if ious.shape != (n_units,):
        raise LabelError(f"{ious.shape[0]} IoUs for the {n_units} units of layer {layer!r}")
    if not np.isfinite(ious).all() or (ious < 0).any() or (ious > 1).any():
        raise LabelError(f"IoUs of layer {layer!r} must lie in [0, 1]")
    if isinstance(rule, DatasetLabelRule):
        if shown is None:
            raise LabelError("the dataset rule needs the images showing each concept (shown=, from "
                             "explain.labelrules.images_showing)")
        from .labelrules import check_known_ious

        known = check_known_ious(known, n_units)  # checked before anything is stored
        # recorded as before the probe-assisted estimate existed, plus "probes": true when it runs and the rivals
        rule_json = {"kind": "dataset", **{k: v for k, v in asdict(rule).items() if k != "probes" or v},
                     **({"rivals": sorted(known)} if known else {})}
    elif isinstance(rule, LabelRule):
        rule_json = {"kind": "published", **asdict(rule)}
    else:
        raise LabelError(f"unknown labeling rule {rule!r}")
    level = float((rule_extra or {}).get("level", DEFAULT_LEVEL))
    shape = patch_size(store)
    specs = list(specs)
    if mask is None:
        mask = rasterize_regions(specs, shape)
    spec_json = regions_to_json(specs)
    if isinstance(rule, DatasetLabelRule) and rule.probes:
        from .probes import FeatureCache

        cache = cache if cache is not None else FeatureCache(store)
        new = RegionRecord(id=0, image_id=image_id, concept=concept, specs=regions_from_json(spec_json), shape=shape,
                           area=int(mask.sum()), author=author, created_at=None, session=sid)
        _warm_probe_fits(db, store, layer=layer, regions=[*regions_for(db, session=sid, author=author), new],
                         shown=shown, rule=rule, level=level, cache=cache)
    now = utcnow()
    try:
        with db.write() as s:
            _open_session(s, sid, write=True)
            concept = _check_concept(s, concept)
            _serialize(s, sid, author, layer)
            if request_id is not None:
                replay = _replay_in(s, sid, author, request_id, layer=layer, image_id=image_id, concept=concept)
                if replay is not None:
                    return replay
            ensure_author(s, author)
            reg = Region(session_id=sid, image_id=image_id, concept=concept, spec=spec_json, height=shape[0],
                         width=shape[1], area=int(mask.sum()), author=author, created_at=now, version=1)
            s.add(reg)
            s.flush()
            action = LabelAction(session_id=sid, kind="region", layer=layer, concept=concept, image_id=image_id,
                                 region_id=reg.id, rule={**rule_json, **(rule_extra or {})}, author=author,
                                 created_at=now, request_id=request_id)
            s.add(action)
            s.flush()  # a concurrent twin with the same request_id fails here (unique constraint)
            current = _current(s, sid, author, layer)
            changed: dict[int, tuple[str | None, str | None]] = {}
            if isinstance(rule, DatasetLabelRule):
                changed = _apply_dataset_rule(s, store, action, current, rule=rule, level=level, shown=shown, now=now,
                                              cache=cache, known=known)
            else:
                behind = np.zeros(n_units)
                for unit, lab in current.items():
                    if 0 <= unit < n_units:
                        behind[unit] = np.inf if lab.iou is None else lab.iou
                take = decide_labels(ious, behind, rule)
                for unit in np.flatnonzero(take).tolist():
                    old = current.get(unit)
                    changed[unit] = (old.concept if old is not None else None, concept)
                    _set_label(s, action, layer, unit, old, concept=concept, iou=float(ious[unit]), author=author,
                               image_id=image_id, region_id=reg.id, now=now)
            action.n_changed = len(changed)
            audit(s, actor=author, action="label.region", session_id=sid, target=f"action:{action.id}",
                  detail={"layer": layer, "image": image_id, "concept": concept, "region": reg.id,
                          "changed": sorted(changed), "request_id": request_id})
            action_id, region_id = action.id, reg.id
    except IntegrityError:
        if request_id is None:
            raise
        replay = _replay(db, sid, author, request_id, layer=layer, image_id=image_id, concept=concept)
        if replay is None:
            raise
        return replay
    return LabelResult(action_id=action_id, region_id=region_id, layer=layer, concept=concept, image_id=image_id,
                       changed=changed, ious=ious, session=sid)


def name_unit(db: Database, store, *, layer: str, unit: int, concept: str, author: str,
              session: int = WORKSPACE_SESSION, expected_version: int | None = None) -> LabelResult:
    """Name a unit by hand (no region, no IoU): the rule never overrides such a label; undo restores the old one.

    expected_version: the version of the author's label of this unit the caller saw (0: no label); a different
    current version raises ConflictError and nothing is written. None: no check.
    """
    n_units = _check_layer(store, layer)
    if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or not 0 <= int(unit) < n_units:
        raise UnknownUnitError(unit, where=f"layer {layer!r} (units 0 … {n_units - 1})")
    unit = int(unit)
    author = _check_author(author)
    sid = _check_session_id(session)
    expected_version = _check_version_arg(expected_version, f"unit {unit}")
    now = utcnow()
    with db.write() as s:
        _open_session(s, sid, write=True)
        concept = _check_concept(s, concept)
        _serialize(s, sid, author, layer)
        old = s.get(UnitLabel, (sid, author, layer, unit))
        if expected_version is not None and expected_version != (old.version if old is not None else 0):
            who, when = _last_writer(s, sid, layer, unit, author)
            raise ConflictError(f"{author}'s label of unit {unit} of layer {layer!r}", who=who, when=when,
                                current_version=old.version if old is not None else 0)
        ensure_author(s, author)
        action = LabelAction(session_id=sid, kind="manual", layer=layer, concept=concept, rule={}, author=author,
                             created_at=now, n_changed=1)
        s.add(action)
        s.flush()
        previous = old.concept if old is not None else None
        _set_label(s, action, layer, unit, old, concept=concept, iou=None, author=author, image_id=None,
                   region_id=None, now=now)
        audit(s, actor=author, action="label.manual", session_id=sid, target=f"action:{action.id}",
              detail={"layer": layer, "unit": unit, "concept": concept, "previous": previous})
        action_id = action.id
    return LabelResult(action_id=action_id, region_id=None, layer=layer, concept=concept, image_id=None,
                       changed={unit: (previous, concept)}, session=sid)


def _actor_info(s, author: str, actor_role: str | None) -> UserInfo:
    role = actor_role if actor_role is not None else role_of(s, author)
    return UserInfo(id=0, name=author, display_name=author, role=role or "", active=True, stamp="")


def undo(db: Database, action_id: int, *, author: str, session: int = WORKSPACE_SESSION,
         actor_role: str | None = None) -> UndoResult:
    """Undo one labeling action of `session`: every unit it changed gets exactly its previous label (or none),
    and its region is marked deleted. `author` is who undoes it; another author's action needs
    store.accounts.can_remove (actor_role: the undoer's role, default their role in the database) — AccessDenied
    otherwise. Refused (LabelError) when the action was already undone, or when a later action changed one of the
    same labels (undo that one first); UnknownActionError for an id that is not an action of this session."""
    author = _check_author(author)
    sid = _check_session_id(session)
    now = utcnow()
    with db.write() as s:
        _open_session(s, sid, write=True)
        ok_id = isinstance(action_id, (int, np.integer)) and not isinstance(action_id, bool) \
            and 0 < int(action_id) < 2**62
        peek = s.get(LabelAction, int(action_id)) if ok_id else None
        if peek is None or peek.session_id != sid:
            raise UnknownActionError(action_id, where=f"review session {sid}")
        _serialize(s, sid, peek.author, peek.layer)
        action = s.scalar(select(LabelAction).where(LabelAction.id == peek.id).with_for_update()
                          .execution_options(populate_existing=True))
        if action.author != author:
            actor = _actor_info(s, author, actor_role)
            author_role = role_of(s, action.author)
            if not can_remove(actor, author_role, author=action.author):
                raise AccessDenied(f"{author} ({actor.role or 'no role'}) may not undo action {action.id} of "
                                   f"{action.author} ({author_role or 'radiologist'})")
        if action.kind == "undo":
            raise LabelError(f"action {action.id} is itself an undo (of action {action.undoes}); "
                             f"label again instead of undoing an undo")
        if action.undone_by is not None:
            by = s.get(LabelAction, action.undone_by)
            raise LabelError(f"action {action.id} was already undone by action {action.undone_by}"
                             + (f" ({by.author} at {by.created_at})" if by is not None else ""))
        changes = s.scalars(select(LabelChange).where(LabelChange.action_id == action.id)
                            .order_by(LabelChange.id)).all()
        ensure_author(s, author)
        rows = {}
        for ch in changes:
            owner = (ch.after or ch.before or {}).get("author", action.author)
            lab = s.get(UnitLabel, (sid, owner, ch.layer, ch.unit))
            if ch.after is None:  # the action removed this label (dataset rule): nothing may have labeled it since
                if lab is not None:
                    raise LabelError(f"cannot undo action {action.id}: unit {ch.unit} of layer {ch.layer!r} was "
                                     f"labeled since by action {lab.action_id}; undo that first")
                continue
            if lab is None or lab.action_id != action.id:
                later = lab.action_id if lab is not None else "a later action or undo that removed it"
                raise LabelError(f"cannot undo action {action.id}: unit {ch.unit} of layer {ch.layer!r} was "
                                 f"changed since by action {later}; undo that first")
            rows[ch.id] = lab
        rec = LabelAction(session_id=sid, kind="undo", layer=action.layer, concept=action.concept,
                          image_id=action.image_id, region_id=action.region_id, rule={}, author=author,
                          created_at=now, undoes=action.id, n_changed=len(changes))
        s.add(rec)
        s.flush()
        restored: dict[int, str | None] = {}
        for ch in changes:
            if ch.after is None:  # give the removed label back
                s.add(_label_from_snapshot(sid, ch.layer, ch.unit, ch.before))
                restored[ch.unit] = ch.before["concept"]
                s.add(LabelChange(session_id=sid, action_id=rec.id, layer=ch.layer, unit=ch.unit, before=None,
                                  after=ch.before))
                continue
            lab = rows[ch.id]
            after = lab.snapshot()
            b = ch.before
            if b is None or b.get("author", lab.author) != lab.author:
                s.delete(lab)
                restored[ch.unit] = None
                s.flush()
                # a v1 change (shared labels) that replaced another author's label: give that label back
                if b is not None and s.get(UnitLabel, (sid, b["author"], ch.layer, ch.unit)) is None:
                    s.add(_label_from_snapshot(sid, ch.layer, ch.unit, b))
            else:
                lab.concept, lab.iou = b["concept"], b["iou"]
                lab.created_at, lab.image_id, lab.region_id = parse_time(b["created_at"]), b["image_id"], b["region_id"]
                lab.action_id, lab.version = b["action_id"], b["version"]
                restored[ch.unit] = b["concept"]
            s.add(LabelChange(session_id=sid, action_id=rec.id, layer=ch.layer, unit=ch.unit, before=after,
                              after=ch.before))
        action.undone_by = rec.id
        if action.region_id is not None:
            region = s.get(Region, action.region_id)
            if region is not None:
                region.deleted_at = now
                region.version = (region.version or 0) + 1
        audit(s, actor=author, action="label.undo", session_id=sid, target=f"action:{action.id}",
              detail={"undo_action": rec.id, "author": action.author, "units": sorted(restored)})
        rec_id = rec.id
    return UndoResult(action_id=rec_id, undone=int(action_id), restored=restored)


def _label_from_snapshot(sid: int, layer: str, unit: int, b: dict) -> UnitLabel:
    return UnitLabel(session_id=sid, author=b["author"], layer=layer, unit=unit, concept=b["concept"], iou=b["iou"],
                     created_at=parse_time(b["created_at"]), image_id=b["image_id"], region_id=b["region_id"],
                     action_id=b["action_id"], version=b["version"])


# -- queries -----------------------------------------------------------------------------------------------------------
def _label_rows(s, sid: int, *, layer: str | None = None, author: str | None = None, concept: str | None = None):
    q = select(UnitLabel).where(UnitLabel.session_id == sid)
    if layer is not None:
        q = q.where(UnitLabel.layer == layer)
    if author is not None:
        q = q.where(UnitLabel.author == author)
    return s.scalars(q.order_by(UnitLabel.layer, UnitLabel.unit, UnitLabel.author)).all()


def _merge(rows) -> list[tuple[UnitLabel, int, int]]:
    """Per (layer, unit): the label whose concept most annotators gave (ties → the most recent label), with
    (votes for it, annotators who labeled the unit)."""
    by_unit: dict[tuple[str, int], list[UnitLabel]] = {}
    for r in rows:
        by_unit.setdefault((r.layer, r.unit), []).append(r)
    out = []
    for key in sorted(by_unit):
        labs = by_unit[key]
        votes = Counter(r.concept for r in labs)
        top = max(votes.values())
        tied = [r for r in labs if votes[r.concept] == top]
        best = max(tied, key=lambda r: (_ts(r.created_at), r.action_id))
        out.append((best, top, len(labs)))
    return out


def _ts(value) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:  # SQLite returns naive datetimes, written in UTC
        import datetime as _dt

        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.timestamp()


def current_labels(db: Database, layer: str, *, session: int = WORKSPACE_SESSION,
                   author: str | None = None) -> dict[int, str]:
    """{unit: concept} of every labeled unit of a layer: one author's labels, or (author None) the merged view."""
    sid = _check_session_id(session)
    with db.read() as s:
        rows = _label_rows(s, sid, layer=layer, author=author)
        if author is not None:
            return {int(r.unit): r.concept for r in rows}
        return {int(r.unit): r.concept for r, _, _ in _merge(rows)}


def unit_labels(db: Database, layer: str | None = None, *, session: int = WORKSPACE_SESSION,
                author: str | None = None) -> list[UnitLabelInfo]:
    """Every current label with its provenance (optionally of one layer), ordered by layer and unit; with author
    None the merged view (the winning label's provenance, `n_annotators` of `n_labeled` agreeing)."""
    sid = _check_session_id(session)
    with db.read() as s:
        rows = _label_rows(s, sid, layer=layer, author=author)
        merged = [(r, 1, 1) for r in rows] if author is not None else _merge(rows)
        return [UnitLabelInfo(layer=r.layer, unit=r.unit, concept=r.concept, iou=r.iou, author=r.author,
                              created_at=r.created_at, image_id=r.image_id, region_id=r.region_id,
                              action_id=r.action_id, version=r.version, session=sid, n_annotators=n,
                              n_labeled=m) for r, n, m in merged]


def units_for(db: Database, concept: str, layer: str | None = None, *, session: int = WORKSPACE_SESSION,
              author: str | None = None) -> dict[str, list[int]]:
    """{layer: [units]} currently labeled with `concept` (by `author`, or in the merged view)."""
    out: dict[str, list[int]] = {}
    for info in unit_labels(db, layer, session=session, author=author):
        if info.concept == concept:
            out.setdefault(info.layer, []).append(int(info.unit))
    return out


def annotators(db: Database, *, session: int = WORKSPACE_SESSION, layer: str | None = None) -> list[str]:
    """Names of the authors who hold unit labels in a session (of one layer), sorted."""
    sid = _check_session_id(session)
    q = select(UnitLabel.author).where(UnitLabel.session_id == sid).distinct()
    if layer is not None:
        q = q.where(UnitLabel.layer == layer)
    with db.read() as s:
        return sorted(s.scalars(q).all())


def label_history(db: Database, *, layer: str | None = None, unit: int | None = None,
                  session: int = WORKSPACE_SESSION, author: str | None = None) -> list[dict]:
    """Actions, newest first, each with its changes: [{"action": {...}, "changes": [{unit, before, after}]}]."""
    sid = _check_session_id(session)
    q = select(LabelAction).where(LabelAction.session_id == sid).order_by(LabelAction.id.desc())
    if layer is not None:
        q = q.where(LabelAction.layer == layer)
    if author is not None:
        q = q.where(LabelAction.author == author)
    out = []
    with db.read() as s:
        for a in s.scalars(q):
            cq = select(LabelChange).where(LabelChange.action_id == a.id).order_by(LabelChange.unit)
            if unit is not None:
                cq = cq.where(LabelChange.unit == int(unit))
            changes = [{"layer": c.layer, "unit": c.unit, "before": c.before, "after": c.after}
                       for c in s.scalars(cq)]
            if unit is not None and not changes:
                continue
            out.append({"action": {"id": a.id, "kind": a.kind, "layer": a.layer, "concept": a.concept,
                                   "image_id": a.image_id, "region_id": a.region_id, "author": a.author,
                                   "created_at": a.created_at, "rule": a.rule, "n_changed": a.n_changed,
                                   "undoes": a.undoes, "undone_by": a.undone_by, "session": a.session_id,
                                   "request_id": a.request_id},
                        "changes": changes})
    return out


def regions_for(db: Database, concept: str | None = None, *, image: str | None = None,
                include_deleted: bool = False, session: int = WORKSPACE_SESSION,
                author: str | None = None) -> list[RegionRecord]:
    """Stored regions (of a concept, an image, an author) of a session, oldest first; undone drawings are left out
    by default."""
    sid = _check_session_id(session)
    q = select(Region).where(Region.session_id == sid).order_by(Region.id)
    if concept is not None:
        q = q.where(Region.concept == concept)
    if image is not None:
        q = q.where(Region.image_id == image)
    if author is not None:
        q = q.where(Region.author == author)
    if not include_deleted:
        q = q.where(Region.deleted_at.is_(None))
    with db.read() as s:
        return _region_records(s, q)


def _region_records(s, q) -> list[RegionRecord]:
    return [RegionRecord(id=r.id, image_id=r.image_id, concept=r.concept, specs=regions_from_json(r.spec),
                         shape=(r.height, r.width), area=r.area, author=r.author, created_at=r.created_at,
                         session=r.session_id, version=r.version)
            for r in s.scalars(q)]


def mark_image(db: Database, store, *, image, concept: str, present: bool, author: str,
               session: int = WORKSPACE_SESSION, expected_version: int | None = None) -> None:
    """Record that `image` shows (present=True) or does not show `concept`; a new mark replaces the session's old
    one (expected_version: the old mark's version the caller saw, 0 for none; stale → ConflictError)."""
    image_id = store.image_ids[resolve_image(store, image)]
    author = _check_author(author)
    sid = _check_session_id(session)
    expected_version = _check_version_arg(expected_version, f"the mark of {image_id}")
    if not isinstance(present, (bool, np.bool_)):
        raise LabelError(f"present must be True or False, got {present!r}")
    with db.write() as s:
        _open_session(s, sid, write=True)
        concept = _check_concept(s, concept)
        mark = s.scalar(select(ImageMark).where(ImageMark.session_id == sid, ImageMark.image_id == image_id,
                                                ImageMark.concept == concept).with_for_update())
        if expected_version is not None and expected_version != (mark.version if mark is not None else 0):
            raise ConflictError(f"the {concept} mark of image {image_id}", who=mark.author if mark else None,
                                when=mark.created_at if mark else None,
                                current_version=mark.version if mark else 0)
        ensure_author(s, author)
        if mark is None:
            s.add(ImageMark(session_id=sid, image_id=image_id, concept=concept, present=bool(present), author=author,
                            created_at=utcnow(), version=1))
        else:
            mark.present, mark.author, mark.created_at = bool(present), author, utcnow()
            mark.version = (mark.version or 0) + 1
        audit(s, actor=author, action="mark.set", session_id=sid, target=f"image:{image_id}",
              detail={"concept": concept, "present": bool(present)})


def unmark_image(db: Database, *, image: str, concept: str, session: int = WORKSPACE_SESSION,
                 author: str | None = None) -> bool:
    """Remove a mark; True when there was one."""
    sid = _check_session_id(session)
    with db.write() as s:
        mark = s.scalar(select(ImageMark).where(ImageMark.session_id == sid, ImageMark.image_id == image,
                                                ImageMark.concept == concept))
        if mark is None:
            return False
        s.delete(mark)
        audit(s, actor=_check_author(author) if author is not None else mark.author, action="mark.remove",
              session_id=sid, target=f"image:{image}", detail={"concept": concept, "present": mark.present})
    return True


def image_marks(db: Database, concept: str, *, session: int = WORKSPACE_SESSION) -> dict[str, bool]:
    """{image_id: present} of the images marked for `concept` in a session."""
    sid = _check_session_id(session)
    with db.read() as s:
        rows = s.execute(select(ImageMark.image_id, ImageMark.present)
                         .where(ImageMark.session_id == sid, ImageMark.concept == concept)).all()
    return {i: bool(p) for i, p in sorted(rows)}


def concepts(db: Database) -> list[dict]:
    """The concept vocabulary (shared by all sessions): [{"id", "name", "description", "builtin"}], built-in first."""
    with db.read() as s:
        rows = s.scalars(select(Concept).order_by(Concept.position, Concept.created_at, Concept.id)).all()
        return [{"id": c.id, "name": c.name, "description": c.description, "builtin": c.builtin} for c in rows]


def add_concept(db: Database, concept_id: str, *, name: str | None = None, description: str = "",
                author: str | None = None) -> None:
    """Add a concept to the vocabulary (snake-case id: letters, digits, '_'); LabelError if malformed or taken."""
    if not isinstance(concept_id, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", concept_id):
        raise LabelError(f"concept id {concept_id!r}: use lower-case letters, digits and '_' (snake case)")
    with db.write() as s:
        if s.get(Concept, concept_id) is not None:
            raise LabelError(f"concept {concept_id!r} exists already")
        s.add(Concept(id=concept_id, name=name or concept_id.replace("_", " "), description=description,
                      builtin=False))
        audit(s, actor=_check_author(author) if author is not None else "unknown", action="concept.add",
              target=f"concept:{concept_id}", detail={"name": name or concept_id.replace("_", " ")})


# -- comments ----------------------------------------------------------------------------------------------------------
MAX_COMMENT = 10000


def _check_text(value) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_COMMENT:
        raise LabelError(f"a comment must be non-empty text of at most {MAX_COMMENT} characters")
    return value


def _check_image_id(image) -> str:
    if not isinstance(image, str) or not image or len(image) > 128:
        raise LabelError(f"image must be an image id of at most 128 characters, got {image!r}")
    return image


def _utc(value):
    """Times as aware UTC datetimes on every database (SQLite hands back naive ones, written in UTC)."""
    import datetime as _dt

    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc)


def _comment_info(c: Comment) -> CommentInfo:
    return CommentInfo(id=c.id, session=c.session_id, image_id=c.image_id, author=c.author, text=c.text,
                       created_at=_utc(c.created_at), updated_at=_utc(c.updated_at), deleted_at=_utc(c.deleted_at),
                       version=c.version)


def add_comment(db: Database, *, image: str, text: str, author: str,
                session: int = WORKSPACE_SESSION) -> CommentInfo:
    """A new comment on an image of a session (the image id is the store's pseudonymous id)."""
    sid = _check_session_id(session)
    author, image, text = _check_author(author), _check_image_id(image), _check_text(text)
    with db.write() as s:
        _open_session(s, sid, write=True)
        ensure_author(s, author)
        c = Comment(session_id=sid, image_id=image, author=author, text=text, created_at=utcnow(), version=1)
        s.add(c)
        s.flush()
        audit(s, actor=author, action="comment.add", session_id=sid, target=f"comment:{c.id}",
              detail={"image": image})
        return _comment_info(c)


def _comment_for_change(s, sid: int, comment_id, expected_version: int, verb: str) -> Comment:
    ok = isinstance(comment_id, (int, np.integer)) and not isinstance(comment_id, bool) and 0 < comment_id < 2**62
    c = s.scalar(select(Comment).where(Comment.id == int(comment_id)).with_for_update()) if ok else None
    if c is None or c.session_id != sid:
        raise LabelError(f"no comment {comment_id!r} in review session {sid}")
    if c.deleted_at is not None:
        raise ConflictError(f"comment {c.id}", who=c.updated_by or c.author, when=c.deleted_at,
                            current_version=c.version)
    if expected_version != c.version:
        raise ConflictError(f"comment {c.id}", who=c.updated_by or c.author, when=c.updated_at or c.created_at,
                            current_version=c.version)
    return c


def edit_comment(db: Database, comment_id: int, *, text: str, author: str, expected_version: int,
                 session: int = WORKSPACE_SESSION) -> CommentInfo:
    """Change a comment's text: only its author may (nobody rewrites another's words → AccessDenied); a stale
    expected_version → ConflictError naming who changed it and when."""
    sid = _check_session_id(session)
    author, text = _check_author(author), _check_text(text)
    expected_version = _check_version_arg(expected_version, f"comment {comment_id}", required="edit_comment")
    with db.write() as s:
        _open_session(s, sid, write=True)
        c = _comment_for_change(s, sid, comment_id, expected_version, "edit")
        if c.author != author:
            raise AccessDenied(f"{author} may not edit comment {c.id} of {c.author}")
        old = c.text
        c.text, c.updated_at, c.updated_by = text, utcnow(), author
        c.version += 1
        audit(s, actor=author, action="comment.edit", session_id=sid, target=f"comment:{c.id}",
              detail={"before": old})
        return _comment_info(c)


def delete_comment(db: Database, comment_id: int, *, author: str, expected_version: int,
                   session: int = WORKSPACE_SESSION, actor_role: str | None = None) -> CommentInfo:
    """Delete a comment (its row stays, with deleted_at): its author, or whoever may remove the author's work
    (store.accounts.can_remove); stale expected_version → ConflictError."""
    sid = _check_session_id(session)
    author = _check_author(author)
    expected_version = _check_version_arg(expected_version, f"comment {comment_id}", required="delete_comment")
    with db.write() as s:
        _open_session(s, sid, write=True)
        c = _comment_for_change(s, sid, comment_id, expected_version, "delete")
        if c.author != author:
            actor = _actor_info(s, author, actor_role)
            if not can_remove(actor, role_of(s, c.author), author=c.author):
                raise AccessDenied(f"{author} ({actor.role or 'no role'}) may not delete comment {c.id} of "
                                   f"{c.author}")
        c.deleted_at = c.updated_at = utcnow()
        c.updated_by = author
        c.version += 1
        audit(s, actor=author, action="comment.delete", session_id=sid, target=f"comment:{c.id}",
              detail={"text": c.text})
        return _comment_info(c)


def comments(db: Database, session: int = WORKSPACE_SESSION, image: str | None = None, *,
             include_deleted: bool = False) -> list[CommentInfo]:
    """The comments of a session (on one image), oldest first; deleted ones left out unless asked for."""
    sid = _check_session_id(session)
    q = select(Comment).where(Comment.session_id == sid).order_by(Comment.id)
    if image is not None:
        q = q.where(Comment.image_id == image)
    if not include_deleted:
        q = q.where(Comment.deleted_at.is_(None))
    with db.read() as s:
        return [_comment_info(c) for c in s.scalars(q)]


# -- probe versions ----------------------------------------------------------------------------------------------------
def _json_metrics(metrics) -> dict:
    import json

    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise LabelError(f"metrics must be a dict, got {type(metrics).__name__}")
    try:  # numpy scalars → plain numbers; NaN → null (JSON has no NaN)
        clean = {str(k): (None if isinstance(v, float) and not np.isfinite(v) else v)
                 for k, v in json.loads(json.dumps(metrics, default=lambda o: o.item() if hasattr(o, "item")
                                                   else str(o))).items()}
    except (TypeError, ValueError) as e:
        raise LabelError(f"metrics are not JSON: {e}") from None
    return clean


def _probe_info(p: ProbeVersion) -> ProbeVersionInfo:
    return ProbeVersionInfo(id=p.id, session=p.session_id, concept=p.concept, layer=p.layer, run_id=p.run_id,
                            author=p.author, created_at=_utc(p.created_at), metrics=p.metrics or {},
                            active=bool(p.active))


def record_probe_version(db: Database, *, session: int = WORKSPACE_SESSION, concept: str, layer: str, run_id: str,
                         author: str, metrics: dict | None = None, active: bool = True) -> ProbeVersionInfo:
    """Record a fitted probe (its mlflow run id and held-out metrics) of (session, concept, layer); with active
    (the default) it becomes the active version and the others of that probe are deactivated. Recording a run id
    that is already recorded for this probe makes that version active again (a rollback) instead of a new row."""
    sid = _check_session_id(session)
    author = _check_author(author)
    if not isinstance(layer, str) or not layer or len(layer) > 200:
        raise LabelError(f"layer must be a layer name, got {layer!r}")
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise LabelError(f"run_id must be an mlflow run id, got {run_id!r}")
    metrics = _json_metrics(metrics)
    with db.write() as s:
        _open_session(s, sid, write=True)
        concept = _check_concept(s, concept)
        _serialize(s, sid, "probe", concept, layer)
        ensure_author(s, author)
        rows = s.scalars(select(ProbeVersion).where(ProbeVersion.session_id == sid, ProbeVersion.concept == concept,
                                                    ProbeVersion.layer == layer)).all()
        same = next((p for p in rows if p.run_id == run_id), None)
        if active:
            for p in rows:
                if p.active and p is not same:
                    p.active = False
                    p.version += 1
        if same is None:
            same = ProbeVersion(session_id=sid, concept=concept, layer=layer, run_id=run_id, author=author,
                                created_at=utcnow(), metrics=metrics, active=bool(active), version=1)
            s.add(same)
        elif active and not same.active:
            same.active = True
            same.version += 1
        s.flush()
        audit(s, actor=author, action="probe.version", session_id=sid, target=f"probe:{concept}@{layer}",
              detail={"run_id": run_id, "active": bool(active)})
        return _probe_info(same)


def recorded_probe_versions(db: Database, *, session: int = WORKSPACE_SESSION, concept: str | None = None,
                            layer: str | None = None) -> list[ProbeVersionInfo]:
    """Recorded probe versions of a session, oldest first."""
    sid = _check_session_id(session)
    q = select(ProbeVersion).where(ProbeVersion.session_id == sid).order_by(ProbeVersion.id)
    if concept is not None:
        q = q.where(ProbeVersion.concept == concept)
    if layer is not None:
        q = q.where(ProbeVersion.layer == layer)
    with db.read() as s:
        return [_probe_info(p) for p in s.scalars(q)]
