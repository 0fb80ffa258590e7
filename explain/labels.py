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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sqlalchemy import delete, select

from store.annotations import (
    Concept,
    Database,
    ImageMark,
    LabelAction,
    LabelChange,
    Region,
    UnitLabel,
    parse_time,
    utcnow,
)

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
    "LabelRule",
    "LabelResult",
    "UndoResult",
    "UnitLabelInfo",
    "RegionRecord",
    "decide_labels",
    "label_region",
    "apply_ious",
    "name_unit",
    "undo",
    "current_labels",
    "unit_labels",
    "units_for",
    "label_history",
    "regions_for",
    "mark_image",
    "unmark_image",
    "image_marks",
    "concepts",
    "add_concept",
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
class LabelResult:
    action_id: int
    region_id: int | None
    layer: str
    concept: str
    image_id: str | None
    changed: dict[int, tuple[str | None, str]]  # unit → (previous concept or None, new concept)
    ious: np.ndarray | None = field(default=None, repr=False)  # float32 (unit,) when computed from a region


@dataclass(frozen=True)
class UndoResult:
    action_id: int  # the undo's own action id
    undone: int  # the action it undid
    restored: dict[int, str | None]  # unit → concept after the undo (None: unlabeled again)


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

    def mask(self) -> np.ndarray:
        """bool (y, x) of the patch size."""
        return rasterize_regions(self.specs, self.shape)


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


def _current(session, layer: str) -> dict[int, UnitLabel]:
    return {lab.unit: lab for lab in session.scalars(select(UnitLabel).where(UnitLabel.layer == layer))}


def _set_label(session, action: LabelAction, layer: str, unit: int, existing: UnitLabel | None, *, concept: str,
               iou: float | None, author: str, image_id: str | None, region_id: int | None, now) -> None:
    before = existing.snapshot() if existing is not None else None
    if existing is None:
        existing = UnitLabel(layer=layer, unit=unit, version=0)
        session.add(existing)
    existing.concept, existing.iou, existing.author, existing.created_at = concept, iou, author, now
    existing.image_id, existing.region_id, existing.action_id = image_id, region_id, action.id
    existing.version = (existing.version or 0) + 1
    session.add(LabelChange(action_id=action.id, layer=layer, unit=unit, before=before, after=existing.snapshot()))


# -- labeling ----------------------------------------------------------------------------------------------------------
def label_region(db: Database, store, *, layer: str, image, region, concept: str, author: str,
                 rule: LabelRule = LabelRule(), level: float = DEFAULT_LEVEL,
                 dissect: UnitIoU | None = None) -> LabelResult:
    """Store a drawn region, compute its IoU with every unit of `layer` on `image`, and apply the rule.

    image: id or index in `store`; region: bool mask (y, x), region specs, or their JSON, in patch coordinates.
    `dissect` (a UnitIoU for this store and layer) avoids rebuilding thresholds and geometry per call.
    """
    n_units = _check_layer(store, layer)
    index = resolve_image(store, image)
    author = _check_author(author)
    specs, mask = _region_specs(region, patch_size(store))
    if dissect is None or dissect.layer != layer or dissect.store is not store or dissect.level != float(level):
        dissect = UnitIoU(store, layer, level=level)
    ious = dissect.compute(index, mask)
    assert ious.shape == (n_units,)
    return apply_ious(db, store, layer=layer, image=store.image_ids[index], concept=concept, author=author,
                      ious=ious, specs=specs, mask=mask, rule=rule, rule_extra={"level": float(level)})


def apply_ious(db: Database, store, *, layer: str, image, concept: str, author: str, ious: np.ndarray,
               specs: Sequence[RegionSpec], mask: np.ndarray | None = None, rule: LabelRule = LabelRule(),
               rule_extra: dict | None = None) -> LabelResult:
    """Store the region `specs` and apply the rule to precomputed IoUs (unit,) — one transaction.

    For callers that computed the IoUs themselves (label_region, the simulated reviewer).
    """
    n_units = _check_layer(store, layer)
    image_id = store.image_ids[resolve_image(store, image)]
    author = _check_author(author)
    ious = np.asarray(ious, dtype=np.float32).reshape(-1)
    if ious.shape != (n_units,):
        raise LabelError(f"{ious.shape[0]} IoUs for the {n_units} units of layer {layer!r}")
    if not np.isfinite(ious).all() or (ious < 0).any() or (ious > 1).any():
        raise LabelError(f"IoUs of layer {layer!r} must lie in [0, 1]")
    shape = patch_size(store)
    specs = list(specs)
    if mask is None:
        mask = rasterize_regions(specs, shape)
    spec_json = regions_to_json(specs)
    now = utcnow()
    with db.write() as s:
        concept = _check_concept(s, concept)
        reg = Region(image_id=image_id, concept=concept, spec=spec_json, height=shape[0], width=shape[1],
                     area=int(mask.sum()), author=author, created_at=now)
        s.add(reg)
        s.flush()
        action = LabelAction(kind="region", layer=layer, concept=concept, image_id=image_id, region_id=reg.id,
                             rule={**asdict(rule), **(rule_extra or {})}, author=author, created_at=now)
        s.add(action)
        s.flush()
        current = _current(s, layer)
        behind = np.zeros(n_units)
        for unit, lab in current.items():
            if 0 <= unit < n_units:
                behind[unit] = np.inf if lab.iou is None else lab.iou
        take = decide_labels(ious, behind, rule)
        changed: dict[int, tuple[str | None, str]] = {}
        for unit in np.flatnonzero(take).tolist():
            old = current.get(unit)
            changed[unit] = (old.concept if old is not None else None, concept)
            _set_label(s, action, layer, unit, old, concept=concept, iou=float(ious[unit]), author=author,
                       image_id=image_id, region_id=reg.id, now=now)
        action.n_changed = len(changed)
        action_id, region_id = action.id, reg.id
    return LabelResult(action_id=action_id, region_id=region_id, layer=layer, concept=concept, image_id=image_id,
                       changed=changed, ious=ious)


def name_unit(db: Database, store, *, layer: str, unit: int, concept: str, author: str) -> LabelResult:
    """Name a unit by hand (no region, no IoU): the rule never overrides such a label; undo restores the old one."""
    n_units = _check_layer(store, layer)
    if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or not 0 <= int(unit) < n_units:
        raise UnknownUnitError(unit, where=f"layer {layer!r} (units 0 … {n_units - 1})")
    unit = int(unit)
    author = _check_author(author)
    now = utcnow()
    with db.write() as s:
        concept = _check_concept(s, concept)
        action = LabelAction(kind="manual", layer=layer, concept=concept, rule={}, author=author, created_at=now,
                             n_changed=1)
        s.add(action)
        s.flush()
        old = s.get(UnitLabel, (layer, unit))
        previous = old.concept if old is not None else None
        _set_label(s, action, layer, unit, old, concept=concept, iou=None, author=author, image_id=None,
                   region_id=None, now=now)
        action_id = action.id
    return LabelResult(action_id=action_id, region_id=None, layer=layer, concept=concept, image_id=None,
                       changed={unit: (previous, concept)})


def undo(db: Database, action_id: int, *, author: str) -> UndoResult:
    """Undo one labeling action: every unit it changed gets exactly its previous label (or none), and its region
    is marked deleted. Refused (LabelError) when the action was already undone, or when a later action changed one
    of the same units (undo that one first); UnknownActionError for an unknown id."""
    author = _check_author(author)
    now = utcnow()
    with db.write() as s:
        action = s.get(LabelAction, int(action_id)) if isinstance(action_id, (int, np.integer)) else None
        if action is None:
            raise UnknownActionError(action_id)
        if action.kind == "undo":
            raise LabelError(f"action {action.id} is itself an undo (of action {action.undoes}); "
                             f"label again instead of undoing an undo")
        if action.undone_by is not None:
            raise LabelError(f"action {action.id} was already undone by action {action.undone_by}")
        changes = s.scalars(select(LabelChange).where(LabelChange.action_id == action.id)
                            .order_by(LabelChange.id)).all()
        for ch in changes:
            lab = s.get(UnitLabel, (ch.layer, ch.unit))
            if lab is None or lab.action_id != action.id:
                later = lab.action_id if lab is not None else "an earlier undo"
                raise LabelError(f"cannot undo action {action.id}: unit {ch.unit} of layer {ch.layer!r} was "
                                 f"changed since by action {later}; undo that first")
        rec = LabelAction(kind="undo", layer=action.layer, concept=action.concept, image_id=action.image_id,
                          region_id=action.region_id, rule={}, author=author, created_at=now, undoes=action.id,
                          n_changed=len(changes))
        s.add(rec)
        s.flush()
        restored: dict[int, str | None] = {}
        for ch in changes:
            lab = s.get(UnitLabel, (ch.layer, ch.unit))
            after = lab.snapshot()
            if ch.before is None:
                s.delete(lab)
                restored[ch.unit] = None
            else:
                b = ch.before
                lab.concept, lab.iou, lab.author = b["concept"], b["iou"], b["author"]
                lab.created_at, lab.image_id, lab.region_id = parse_time(b["created_at"]), b["image_id"], b["region_id"]
                lab.action_id, lab.version = b["action_id"], b["version"]
                restored[ch.unit] = b["concept"]
            s.add(LabelChange(action_id=rec.id, layer=ch.layer, unit=ch.unit, before=after, after=ch.before))
        action.undone_by = rec.id
        if action.region_id is not None:
            region = s.get(Region, action.region_id)
            if region is not None:
                region.deleted_at = now
        rec_id = rec.id
    return UndoResult(action_id=rec_id, undone=int(action_id), restored=restored)


# -- queries -----------------------------------------------------------------------------------------------------------
def current_labels(db: Database, layer: str) -> dict[int, str]:
    """{unit: concept} of every labeled unit of a layer."""
    with db.read() as s:
        rows = s.execute(select(UnitLabel.unit, UnitLabel.concept).where(UnitLabel.layer == layer)).all()
    return {int(u): c for u, c in sorted(rows)}


def unit_labels(db: Database, layer: str | None = None) -> list[UnitLabelInfo]:
    """Every current label with its provenance (optionally of one layer), ordered by layer and unit."""
    q = select(UnitLabel).order_by(UnitLabel.layer, UnitLabel.unit)
    if layer is not None:
        q = q.where(UnitLabel.layer == layer)
    with db.read() as s:
        return [UnitLabelInfo(layer=r.layer, unit=r.unit, concept=r.concept, iou=r.iou, author=r.author,
                              created_at=r.created_at, image_id=r.image_id, region_id=r.region_id,
                              action_id=r.action_id, version=r.version) for r in s.scalars(q)]


def units_for(db: Database, concept: str, layer: str | None = None) -> dict[str, list[int]]:
    """{layer: [units]} currently labeled with `concept`."""
    q = select(UnitLabel.layer, UnitLabel.unit).where(UnitLabel.concept == concept)
    if layer is not None:
        q = q.where(UnitLabel.layer == layer)
    out: dict[str, list[int]] = {}
    with db.read() as s:
        for lay, unit in s.execute(q.order_by(UnitLabel.layer, UnitLabel.unit)):
            out.setdefault(lay, []).append(int(unit))
    return out


def label_history(db: Database, *, layer: str | None = None, unit: int | None = None) -> list[dict]:
    """Actions, newest first, each with its changes: [{"action": {...}, "changes": [{unit, before, after}]}]."""
    q = select(LabelAction).order_by(LabelAction.id.desc())
    if layer is not None:
        q = q.where(LabelAction.layer == layer)
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
                                   "undoes": a.undoes, "undone_by": a.undone_by},
                        "changes": changes})
    return out


def regions_for(db: Database, concept: str | None = None, *, image: str | None = None,
                include_deleted: bool = False) -> list[RegionRecord]:
    """Stored regions (of a concept and/or an image), oldest first; undone drawings are left out by default."""
    q = select(Region).order_by(Region.id)
    if concept is not None:
        q = q.where(Region.concept == concept)
    if image is not None:
        q = q.where(Region.image_id == image)
    if not include_deleted:
        q = q.where(Region.deleted_at.is_(None))
    with db.read() as s:
        return [RegionRecord(id=r.id, image_id=r.image_id, concept=r.concept, specs=regions_from_json(r.spec),
                             shape=(r.height, r.width), area=r.area, author=r.author, created_at=r.created_at)
                for r in s.scalars(q)]


def mark_image(db: Database, store, *, image, concept: str, present: bool, author: str) -> None:
    """Record that `image` shows (present=True) or does not show `concept`; a new mark replaces the old one."""
    image_id = store.image_ids[resolve_image(store, image)]
    author = _check_author(author)
    if not isinstance(present, (bool, np.bool_)):
        raise LabelError(f"present must be True or False, got {present!r}")
    with db.write() as s:
        concept = _check_concept(s, concept)
        mark = s.scalar(select(ImageMark).where(ImageMark.image_id == image_id, ImageMark.concept == concept))
        if mark is None:
            s.add(ImageMark(image_id=image_id, concept=concept, present=bool(present), author=author,
                            created_at=utcnow()))
        else:
            mark.present, mark.author, mark.created_at = bool(present), author, utcnow()


def unmark_image(db: Database, *, image: str, concept: str) -> bool:
    """Remove a mark; True when there was one."""
    with db.write() as s:
        n = s.execute(delete(ImageMark).where(ImageMark.image_id == image, ImageMark.concept == concept)).rowcount
    return bool(n)


def image_marks(db: Database, concept: str) -> dict[str, bool]:
    """{image_id: present} of the images marked for `concept`."""
    with db.read() as s:
        rows = s.execute(select(ImageMark.image_id, ImageMark.present).where(ImageMark.concept == concept)).all()
    return {i: bool(p) for i, p in sorted(rows)}


def concepts(db: Database) -> list[dict]:
    """The concept vocabulary: [{"id", "name", "description", "builtin"}], built-in ones first."""
    with db.read() as s:
        rows = s.scalars(select(Concept).order_by(Concept.position, Concept.created_at, Concept.id)).all()
        return [{"id": c.id, "name": c.name, "description": c.description, "builtin": c.builtin} for c in rows]


def add_concept(db: Database, concept_id: str, *, name: str | None = None, description: str = "") -> None:
    """Add a concept to the vocabulary (snake-case id: letters, digits, '_'); LabelError if malformed or taken."""
    import re

    if not isinstance(concept_id, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", concept_id):
        raise LabelError(f"concept id {concept_id!r}: use lower-case letters, digits and '_' (snake case)")
    with db.write() as s:
        if s.get(Concept, concept_id) is not None:
            raise LabelError(f"concept {concept_id!r} exists already")
        s.add(Concept(id=concept_id, name=name or concept_id.replace("_", " "), description=description,
                      builtin=False))
