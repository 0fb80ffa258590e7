"""Unit labels: the rule with hand-set IoUs, label_region on real stored activations, provenance, exact undo, queries
for the probes, and bad input that leaves the database unchanged (checked row by row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_dissection import build_real_store, fresh_postgres_database

from explain.dissection import UnitIoU, unit_masks
from explain.errors import (
    ExplainError,
    LabelError,
    RegionError,
    UnknownActionError,
    UnknownConceptError,
    UnknownImageError,
    UnknownLayerError,
    UnknownUnitError,
)
from explain.labels import (
    LabelRule,
    add_concept,
    apply_ious,
    concepts,
    current_labels,
    decide_labels,
    image_marks,
    label_history,
    label_region,
    mark_image,
    name_unit,
    regions_for,
    undo,
    unit_labels,
    units_for,
    unmark_image,
)
from explain.regions import MaskRegion, Polygon, Rect, rasterize_regions
from store.annotations import dump, open_database

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(real_dicoms, tmp_path_factory):
    return build_real_store(tmp_path_factory.mktemp("labels"), real_dicoms)


@pytest.fixture
def db(workspace):
    return open_database(workspace.database_url)


L1 = "features.1"  # 4 units
L4 = "features.4"  # 6 units
SQUARE = [Rect(8, 8, 40, 40)]


def _apply(db, store, ious, concept="mass", image=0, layer=L4, author="ana", rule=LabelRule()):
    return apply_ious(db, store, layer=layer, image=image, concept=concept, author=author,
                      ious=np.asarray(ious, np.float32), specs=SQUARE, rule=rule)


# -- the rule ----------------------------------------------------------------------------------------------------------
def test_decide_labels_by_hand():
    ious = np.array([0.5, 0.3, 0.1, 0.25, 0.9])
    behind = np.array([0.0, 0.4, 0.0, 0.2, np.inf])  # unit 4 was named by hand
    np.testing.assert_array_equal(decide_labels(ious, behind), [True, False, False, True, False])
    np.testing.assert_array_equal(decide_labels(ious, behind, LabelRule(threshold=0.28)),
                                  [True, False, False, False, False])
    np.testing.assert_array_equal(decide_labels(ious, behind, LabelRule(above_current=False)),
                                  [True, True, False, True, False])
    assert not decide_labels(np.array([0.2]), np.array([0.0]))[0]  # strictly above the threshold
    with pytest.raises(LabelError, match="threshold"):
        LabelRule(threshold=1.5)


def test_the_published_rule_over_a_sequence_of_drawings(db, store):
    r1 = _apply(db, store, [0.5, 0.3, 0.1, 0.25, 0.0, 0.21], "mass")
    assert r1.changed == {0: (None, "mass"), 1: (None, "mass"), 3: (None, "mass"), 5: (None, "mass")}
    # calcification: unit 1 (0.35 > 0.3) and unit 2 (0.6 > 0) switch; unit 0 (0.45 < 0.5) keeps mass
    r2 = _apply(db, store, [0.45, 0.35, 0.6, 0.1, 0.19, 0.0], "calcification", image=3)
    assert r2.changed == {1: ("mass", "calcification"), 2: (None, "calcification")}
    # the same concept again with more evidence: unit 5's IoU behind its label rises to 0.4
    r3 = _apply(db, store, [0.0, 0.0, 0.0, 0.0, 0.0, 0.4], "mass", image=5)
    assert r3.changed == {5: ("mass", "mass")}
    assert current_labels(db, L4) == {0: "mass", 1: "calcification", 2: "calcification", 3: "mass", 5: "mass"}
    info = {i.unit: i for i in unit_labels(db, L4)}
    assert info[1].iou == pytest.approx(0.35) and info[1].image_id == store.image_ids[3]
    assert info[1].author == "ana" and info[1].action_id == r2.action_id and info[1].region_id == r2.region_id
    assert info[5].iou == pytest.approx(0.4) and info[5].version == 2
    assert units_for(db, "mass") == {L4: [0, 3, 5]}
    assert units_for(db, "calcification", layer=L1) == {}


def test_undo_restores_exactly_the_previous_state(db, store):
    _apply(db, store, [0.5, 0.3, 0.1, 0.25, 0.0, 0.21], "mass")
    before = dump(db)
    r = _apply(db, store, [0.45, 0.35, 0.6, 0.1, 0.19, 0.0], "calcification", image=3)
    mark_unchanged = dump(db)["unit_label"]
    assert mark_unchanged != before["unit_label"]
    u = undo(db, r.action_id, author="ana")
    assert u.restored == {1: "mass", 2: None}
    after = dump(db)
    assert after["unit_label"] == before["unit_label"]  # every field: concept, iou, author, time, region, version
    assert regions_for(db, "calcification") == []  # the undone drawing no longer feeds probes
    assert len(regions_for(db, "calcification", include_deleted=True)) == 1
    with pytest.raises(LabelError, match="already undone"):
        undo(db, r.action_id, author="ana")
    with pytest.raises(LabelError, match="itself an undo"):
        undo(db, u.action_id, author="ana")
    with pytest.raises(UnknownActionError, match="unknown action 999"):
        undo(db, 999, author="ana")
    hist = label_history(db, layer=L4)
    assert [h["action"]["kind"] for h in hist] == ["undo", "region", "region"]
    assert hist[0]["action"]["undoes"] == r.action_id and hist[1]["action"]["undone_by"] == u.action_id


def test_undo_is_refused_while_a_later_action_holds_the_same_unit(db, store):
    a = _apply(db, store, [0.5, 0, 0, 0, 0, 0], "mass")
    b = _apply(db, store, [0.7, 0, 0, 0, 0, 0], "calcification")
    state = dump(db)
    with pytest.raises(LabelError, match=f"unit 0 of layer 'features.4' was changed since by action {b.action_id}"):
        undo(db, a.action_id, author="ana")
    assert dump(db) == state
    undo(db, b.action_id, author="ana")
    undo(db, a.action_id, author="ana")
    assert current_labels(db, L4) == {}


def test_named_units_are_never_overridden_by_the_rule(db, store):
    r = name_unit(db, store, layer=L4, unit=2, concept="skin", author="ana")
    assert r.changed == {2: (None, "skin")}
    _apply(db, store, [0, 0, 0.99, 0, 0, 0], "mass")
    assert current_labels(db, L4) == {2: "skin"}
    info = unit_labels(db, L4)[0]
    assert info.iou is None and info.region_id is None
    with pytest.raises(UnknownUnitError, match="unknown unit 6 in layer 'features.4' \\(units 0 … 5\\)"):
        name_unit(db, store, layer=L4, unit=6, concept="skin", author="ana")


# -- on real activations -----------------------------------------------------------------------------------------------
def test_label_region_uses_the_unit_iou_of_the_drawn_region(db, store):
    # the largest unit mask of the layer on these real patches, drawn exactly (as a mask): that unit's IoU is 1
    thresholds = store.thresholds(L1)
    areas = np.stack([unit_masks(store.maps(L1, i), thresholds, (64, 64)).sum(axis=(1, 2))
                      for i in range(store.n_images)])  # (image, unit)
    image, unit = (int(v) for v in np.unravel_index(areas.argmax(), areas.shape))
    mask = unit_masks(store.maps(L1, image), thresholds, (64, 64))[unit]
    r = label_region(db, store, layer=L1, image=store.image_ids[image], region=mask, concept="normal_tissue",
                     author="ana")
    assert r.ious[unit] == 1.0
    np.testing.assert_array_equal(r.ious, UnitIoU(store, L1).compute(image, mask))
    assert set(r.changed) == set(np.flatnonzero(r.ious > 0.2).tolist()) and unit in r.changed
    (rec,) = regions_for(db, "normal_tissue")
    assert rec.image_id == store.image_ids[image] and rec.shape == (64, 64) and isinstance(rec.specs[0], MaskRegion)
    np.testing.assert_array_equal(rec.mask(), mask)
    assert rec.area == int(mask.sum()) and rec.id == r.region_id
    # a drawn polygon is stored as its shape and reads back identically
    region = [Polygon([(2, 2), (62, 4), (60, 60), (4, 58)])]
    r2 = label_region(db, store, layer=L1, image=3, region=region, concept="mass", author="ana",
                      rule=LabelRule(threshold=0.01))
    ious = UnitIoU(store, L1).compute(3, rasterize_regions(region, (64, 64)))
    np.testing.assert_array_equal(r2.ious, ious)
    current = np.array([r.ious[u] if u in r.changed else 0 for u in range(4)])
    assert set(r2.changed) == set(np.flatnonzero((ious > 0.01) & (ious > current)).tolist())
    (rec2,) = regions_for(db, "mass", image=store.image_ids[3])
    assert rec2.specs == region and rec2.id == r2.region_id
    np.testing.assert_array_equal(rec2.mask(), rasterize_regions(region, (64, 64)))
    hist = label_history(db, layer=L1)
    assert hist[0]["action"]["rule"] == {"kind": "published", "threshold": 0.01, "above_current": True,
                                        "level": 0.99}


# -- bad input: clear errors, nothing stored changes -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(layer="layer9"), UnknownLayerError, "unknown layer 'layer9'"),
    (dict(image="p9999"), UnknownImageError, "unknown image 'p9999'"),
    (dict(image=24), UnknownImageError, "unknown image 24"),
    (dict(concept="tumour"), UnknownConceptError, "unknown concept 'tumour'"),
    (dict(region=[Rect(100, 100, 140, 140)]), RegionError, "covers no pixel"),
    (dict(region=[Polygon([(1, 1), (float("nan"), 3), (5, 5)])]), RegionError, "not finite"),
    (dict(region=np.ones((32, 32), bool)), RegionError, "does not match the patch size"),
    (dict(region=[{"type": "hexagon"}]), RegionError, "unknown type"),
    (dict(author=""), LabelError, "author"),
])
def test_bad_input_raises_and_leaves_the_database_unchanged(db, store, kwargs, error, words):
    _apply(db, store, [0.5, 0.3, 0.1, 0.25, 0.0, 0.21], "mass")
    mark_image(db, store, image=1, concept="mass", present=True, author="ana")
    before = dump(db)
    args = dict(layer=L4, image=0, region=SQUARE, concept="calcification", author="ana")
    args.update(kwargs)
    with pytest.raises(error, match=words) as err:
        label_region(db, store, **args)
    assert isinstance(err.value, ExplainError)
    if isinstance(err.value, (UnknownLayerError, UnknownImageError, UnknownConceptError)):
        assert isinstance(err.value, KeyError)
    assert dump(db) == before


def test_wrong_iou_vectors_are_refused(db, store):
    before = dump(db)
    with pytest.raises(LabelError, match="5 IoUs for the 6 units"):
        _apply(db, store, [0.5] * 5)
    with pytest.raises(LabelError, match=r"in \[0, 1\]"):
        _apply(db, store, [0.5, np.nan, 0, 0, 0, 0])
    assert dump(db) == before


def test_a_failure_inside_the_write_transaction_rolls_everything_back(db, store, monkeypatch):
    """Region, action and the first label are written before the failure; the transaction takes them all back."""
    import explain.labels as labels

    _apply(db, store, [0.5, 0, 0, 0, 0, 0], "mass")
    before = dump(db)
    calls = {"n": 0}
    real = labels._set_label

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(labels, "_set_label", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        _apply(db, store, [0.9, 0.9, 0.9, 0, 0, 0], "calcification")
    assert calls["n"] == 2
    assert dump(db) == before


# -- marks and concepts ------------------------------------------------------------------------------------------------
def test_image_marks_for_probes(db, store):
    mark_image(db, store, image=0, concept="mass", present=True, author="ana")
    mark_image(db, store, image=store.image_ids[2], concept="mass", present=False, author="ana")
    mark_image(db, store, image=0, concept="mass", present=False, author="ben")  # replaces ana's mark
    mark_image(db, store, image=1, concept="calcification", present=True, author="ana")
    assert image_marks(db, "mass") == {store.image_ids[0]: False, store.image_ids[2]: False}
    assert unmark_image(db, image=store.image_ids[0], concept="mass")
    assert not unmark_image(db, image=store.image_ids[0], concept="mass")
    assert image_marks(db, "mass") == {store.image_ids[2]: False}
    with pytest.raises(UnknownImageError):
        mark_image(db, store, image="nope", concept="mass", present=True, author="ana")
    with pytest.raises(UnknownConceptError):
        mark_image(db, store, image=0, concept="nope", present=True, author="ana")
    with pytest.raises(LabelError, match="present must be"):
        mark_image(db, store, image=0, concept="mass", present="yes", author="ana")


def test_concept_vocabulary(db, store):
    ids = [c["id"] for c in concepts(db)]
    assert ids[:4] == ["mass", "calcification", "spiculated_margin", "circumscribed_margin"] and len(ids) == 10
    add_concept(db, "lymph_node", description="intramammary lymph node")
    assert concepts(db)[-1] == {"id": "lymph_node", "name": "lymph node", "description": "intramammary lymph node",
                                "builtin": False}
    _apply(db, store, [0.5, 0, 0, 0, 0, 0], "lymph_node")
    assert current_labels(db, L4) == {0: "lymph_node"}
    with pytest.raises(LabelError, match="exists already"):
        add_concept(db, "mass")
    with pytest.raises(LabelError, match="snake case"):
        add_concept(db, "Lymph Node")


def test_labels_persist_across_processes_opening_the_workspace_database(workspace, store):
    db = open_database(workspace.database_url)
    r = _apply(db, store, [0.5, 0, 0, 0.3, 0, 0], "mass")
    db.dispose()
    again = open_database(settings=workspace)
    assert current_labels(again, L4) == {0: "mass", 3: "mass"}
    assert regions_for(again, "mass")[0].id == r.region_id


@pytest.mark.services
def test_labels_and_undo_on_postgresql(postgres_url, store):
    with fresh_postgres_database(postgres_url) as url:
        db = open_database(url)
        r1 = _apply(db, store, [0.5, 0.3, 0.1, 0.25, 0.0, 0.21], "mass")
        before = dump(db)
        r2 = _apply(db, store, [0.45, 0.35, 0.6, 0.1, 0.19, 0.0], "calcification", image=3)
        assert r2.changed == {1: ("mass", "calcification"), 2: (None, "calcification")}
        undo(db, r2.action_id, author="ana")
        assert dump(db)["unit_label"] == before["unit_label"]
        state = dump(db)
        with pytest.raises(UnknownConceptError):
            _apply(db, store, [0.9] * 6, "tumour")
        assert dump(db) == state
        assert units_for(db, "mass") == {L4: sorted(r1.changed)}
        db.dispose()


# -- review sessions (schema v2) ---------------------------------------------------------------------------------------
from store.accounts import create_session, create_user  # noqa: E402
from store.errors import AccessDenied, ConflictError  # noqa: E402


def test_labels_are_kept_per_annotator_and_merged_by_majority(db, store):
    _apply(db, store, [0.5, 0.3, 0.0, 0.0, 0.0, 0.0], "mass", author="ana")
    _apply(db, store, [0.5, 0.3, 0.0, 0.0, 0.0, 0.0], "calcification", author="ben")  # ben's own labels: no IoU bar
    _apply(db, store, [0.5, 0.0, 0.0, 0.0, 0.0, 0.0], "mass", author="carl")
    assert current_labels(db, L4, author="ana") == {0: "mass", 1: "mass"}
    assert current_labels(db, L4, author="ben") == {0: "calcification", 1: "calcification"}
    # unit 0: mass 2 : 1; unit 1: a tie (ana mass, ben calcification) → the latest, ben's
    assert current_labels(db, L4) == {0: "mass", 1: "calcification"}
    merged = {i.unit: i for i in unit_labels(db, L4)}
    assert (merged[0].n_annotators, merged[0].n_labeled) == (2, 3) and merged[1].author == "ben"
    assert units_for(db, "mass") == {L4: [0]} and units_for(db, "mass", author="ana") == {L4: [0, 1]}


def test_sessions_are_isolated_and_unknown_or_archived_sessions_refuse_writes(db, store):
    create_user(db, name="ana", role="radiologist", actor="admin")
    s2 = create_session(db, name="second", members=["ana"], actor="admin").id
    _apply(db, store, [0.5, 0, 0, 0, 0, 0], "mass")
    r = apply_ious(db, store, layer=L4, image=0, concept="calcification", author="ana", specs=SQUARE,
                   ious=np.array([0.6, 0, 0, 0, 0, 0], np.float32), session=s2)
    assert current_labels(db, L4) == {0: "mass"} and current_labels(db, L4, session=s2) == {0: "calcification"}
    assert [x.concept for x in regions_for(db, session=s2)] == ["calcification"]
    with pytest.raises(UnknownActionError):
        undo(db, r.action_id, author="ana")  # an action of session 2 is not one of session 1
    before = dump(db)
    with pytest.raises(LabelError, match="no review session 99"):
        _apply_s(db, store, 99)
    with pytest.raises(LabelError, match="session must be"):
        _apply_s(db, store, "2")
    from store.annotations import ReviewSession, utcnow

    with db.write() as s:
        s.get(ReviewSession, s2).archived_at = utcnow()
    archived = dump(db)
    with pytest.raises(LabelError, match="archived"):
        _apply_s(db, store, s2)
    assert dump(db) == archived and dump(db)["unit_label"] == before["unit_label"]


def _apply_s(db, store, session):
    return apply_ious(db, store, layer=L4, image=0, concept="mass", author="ana", specs=SQUARE,
                      ious=np.array([0.9] * 6, np.float32), session=session)


def test_a_repeated_request_id_returns_the_first_result_and_writes_nothing(db, store):
    first = label_region(db, store, layer=L4, image=1, region=SQUARE, concept="mass", author="ana",
                         request_id="req-1")
    assert not first.replayed
    before = dump(db)
    again = label_region(db, store, layer=L4, image=1, region=SQUARE, concept="mass", author="ana",
                         request_id="req-1")
    assert again.replayed and again.action_id == first.action_id and again.changed == first.changed
    assert dump(db) == before
    with pytest.raises(LabelError, match="already used for another request"):
        label_region(db, store, layer=L4, image=2, region=SQUARE, concept="mass", author="ana", request_id="req-1")
    # the key is per author: ben's req-1 is his own request
    assert not label_region(db, store, layer=L4, image=1, region=SQUARE, concept="mass", author="ben",
                            request_id="req-1").replayed
    for bad in ("", "x" * 129, "with space", 7):
        with pytest.raises(LabelError, match="request_id"):
            label_region(db, store, layer=L4, image=1, region=SQUARE, concept="mass", author="ana", request_id=bad)


def _concurrent_retries(url, store, n=6):
    """n threads, each with its own engine, send the same request at once: exactly one action is stored."""
    import threading

    results, errors = [], []
    barrier = threading.Barrier(n)

    def worker():
        try:
            mine = open_database(url)
            barrier.wait(30)
            results.append(apply_ious(mine, store, layer=L4, image=2, concept="mass", author="ana", specs=SQUARE,
                                      ious=np.array([0.5, 0.4, 0, 0, 0, 0.3], np.float32), request_id="same-req"))
            mine.dispose()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len({r.action_id for r in results}) == 1 and sum(not r.replayed for r in results) == 1
    d = dump(open_database(url))
    assert [a["request_id"] for a in d["label_action"]] == ["same-req"]
    assert len(d["region"]) == 1 and len(d["unit_label"]) == 3


def test_concurrent_retries_of_one_request_are_stored_exactly_once_on_sqlite(workspace, store):
    open_database(workspace.database_url).dispose()
    _concurrent_retries(workspace.database_url, store)


@pytest.mark.services
def test_concurrent_retries_of_one_request_are_stored_exactly_once_on_postgresql(postgres_url, store):
    with fresh_postgres_database(postgres_url) as url:
        open_database(url).dispose()
        _concurrent_retries(url, store)


def test_undo_rights_a_researcher_cannot_undo_a_radiologists_action(db, store):
    create_user(db, name="ana", role="radiologist", actor="admin")
    create_user(db, name="rob", role="researcher", actor="admin")
    create_user(db, name="boss", role="admin", actor="admin")
    r_ana = _apply(db, store, [0.5, 0, 0, 0, 0, 0], "mass", author="ana")
    r_rob = _apply(db, store, [0, 0.5, 0, 0, 0, 0], "mass", author="rob")
    before = dump(db)
    with pytest.raises(AccessDenied, match="rob \\(researcher\\) may not undo action"):
        undo(db, r_ana.action_id, author="rob")
    with pytest.raises(AccessDenied):  # a role claimed by the caller counts, but never beyond the rule
        undo(db, r_ana.action_id, author="rob", actor_role="researcher")
    assert dump(db) == before
    assert undo(db, r_rob.action_id, author="rob").restored == {1: None}  # own work
    assert undo(db, r_ana.action_id, author="boss").restored == {0: None}  # admins remove all
    assert current_labels(db, L4) == {}


def test_concurrent_manual_edits_conflict_and_nothing_is_overwritten(db, store):
    name_unit(db, store, layer=L4, unit=2, concept="mass", author="ana", expected_version=0)
    seen = unit_labels(db, L4, author="ana")[0].version
    name_unit(db, store, layer=L4, unit=2, concept="calcification", author="ana", expected_version=seen)  # tab 1
    before = dump(db)
    with pytest.raises(ConflictError, match=r"ana's label of unit 2 of layer 'features.4' was changed by ana at "):
        name_unit(db, store, layer=L4, unit=2, concept="skin", author="ana", expected_version=seen)  # tab 2
    assert dump(db) == before and current_labels(db, L4) == {2: "calcification"}


def test_comments_edit_conflicts_and_delete_rights(db):
    create_user(db, name="ana", role="radiologist", actor="admin")
    create_user(db, name="rob", role="researcher", actor="admin")
    from explain.labels import add_comment, comments, delete_comment, edit_comment

    c = add_comment(db, image="p0001", text="spiculated?", author="ana")
    e1 = edit_comment(db, c.id, text="spiculated margin", author="ana", expected_version=c.version)
    before = dump(db)
    with pytest.raises(ConflictError, match=f"comment {c.id} was changed by ana at"):
        edit_comment(db, c.id, text="stale edit", author="ana", expected_version=c.version)
    with pytest.raises(AccessDenied, match="may not edit comment"):
        edit_comment(db, c.id, text="rob's words", author="rob", expected_version=e1.version)
    with pytest.raises(AccessDenied, match="may not delete comment"):
        delete_comment(db, c.id, author="rob", expected_version=e1.version)
    other = create_session(db, name="other", members=["ana"], actor="admin").id
    with pytest.raises(LabelError, match=f"no comment {c.id} in review session {other}"):
        edit_comment(db, c.id, text="x", author="ana", expected_version=e1.version, session=other)
    before = dump(db)
    for bad in ("", "x" * 10001, None):
        with pytest.raises(LabelError, match="comment must be"):
            add_comment(db, image="p0001", text=bad, author="ana")
    assert dump(db) == before
    assert [x.text for x in comments(db, 1, "p0001")] == ["spiculated margin"]
    gone = delete_comment(db, c.id, author="ana", expected_version=e1.version)
    assert comments(db, 1) == [] and comments(db, 1, include_deleted=True)[0].deleted_at == gone.deleted_at
    with pytest.raises(ConflictError):
        edit_comment(db, c.id, text="after delete", author="ana", expected_version=gone.version)


def test_probe_versions_are_recorded_with_one_active_per_probe(db):
    from explain.labels import record_probe_version, recorded_probe_versions

    a = record_probe_version(db, concept="mass", layer=L4, run_id="run-a", author="ana",
                             metrics={"auroc": np.float32(0.9), "ap": float("nan")})
    b = record_probe_version(db, concept="mass", layer=L4, run_id="run-b", author="ana", metrics={"auroc": 0.95})
    assert a.metrics == {"auroc": pytest.approx(0.9), "ap": None}
    assert [(p.run_id, p.active) for p in recorded_probe_versions(db, concept="mass")] == \
        [("run-a", False), ("run-b", True)]
    record_probe_version(db, concept="mass", layer=L4, run_id="run-a", author="ana")  # a rollback
    assert [(p.run_id, p.active) for p in recorded_probe_versions(db)] == [("run-a", True), ("run-b", False)]
    assert b.id != a.id
    with pytest.raises(LabelError, match="run_id"):
        record_probe_version(db, concept="mass", layer=L4, run_id="../x", author="ana")
