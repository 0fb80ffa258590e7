"""The alternative labeling rules (explain.labelrules: CumulativeRule, DatasetRule): exact numbers on hand-made
counts and masks, then on real mammogram patches with inserted lesions seen by a hand-set network (unit 0 of
features.1: masses, unit 1: calcifications), fed directly and from a session's stored regions; the dataset rule's
estimate equals the dataset-level IoU when every patch showing the concept is drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_dissection import build_lesion_store

from explain.dissection import interpolation_matrix, unit_cell_weights, unit_masks, upsample_maps
from explain.errors import LabelError, RegionError, UnknownLayerError
from explain.groundtruth import dataset_concept_iou, load_concept_masks
from explain.labelrules import (
    DEFAULT_CUMULATIVE_THRESHOLD,
    AREA_UNITS,
    DEFAULT_DATASET_THRESHOLD,
    SEGMENTED_CONCEPTS,
    CumulativeRule,
    DatasetRule,
    ProbeAssistedRule,
    images_showing,
    next_drawings,
    unit_mask_areas,
)
from explain.labels import DatasetLabelRule, apply_ious, current_labels, label_region, name_unit, regions_for, undo
from explain.probes import FeatureCache
from explain.regions import MaskRegion
from sqlalchemy import select

from store.activations import ImageIndexError, MissingArrayError
from store.annotations import LabelAction, open_database
from store.manifest import read_manifest

torch.set_num_threads(1)


def test_cumulative_iou_and_labels_by_hand():
    rule = CumulativeRule.from_counts(3, threshold=0.1)
    assert rule.labels() == {}
    # drawing 1 of mass, a 10-px region: unit 0 area 10 overlap 5 → 5 / (10 + 10 - 5) = 1/3; unit 1 misses it
    rule.add_counts("mass", area=[10, 4, 0], inter=[5, 0, 0], region_px=10)
    np.testing.assert_allclose(rule.iou(), [[1 / 3, 0, 0]])
    assert rule.labels() == {0: "mass"}
    # drawing 2 of mass, 20 px: unit 0 misses (union 30) → 5 / 45; unit 1 inside (4 / 34); unit 2 2 / 30
    rule.add_counts("mass", area=[10, 4, 2], inter=[0, 4, 2], region_px=20)
    np.testing.assert_allclose(rule.iou(), [[5 / 45, 4 / 34, 2 / 30]])
    assert rule.labels() == {0: "mass", 1: "mass"}  # 0.111 and 0.118 > 0.1; 0.067 is not
    np.testing.assert_array_equal(rule.intersection, [[5, 4, 2]])
    np.testing.assert_array_equal(rule.union, [[45, 34, 30]])
    # a 4-px calcification that units 1 and 2 cover exactly or half: their best concept becomes calcification
    rule.add_counts("calcification", area=[10, 4, 2], inter=[0, 4, 2], region_px=4)
    np.testing.assert_allclose(rule.iou()[1], [0, 1.0, 0.5])
    assert rule.labels() == {0: "mass", 1: "calcification", 2: "calcification"}
    assert rule.units_for("mass") == [0] and rule.units_for("calcification") == [1, 2]
    assert rule.concepts == ["mass", "calcification"] and rule.drawings == {"mass": 2, "calcification": 1}
    # the threshold is strict: exactly 1/3 is not above 1/3
    strict = CumulativeRule.from_counts(1, threshold=1 / 3)
    strict.add_counts("mass", area=[10], inter=[5], region_px=10)
    assert strict.labels() == {}


def test_a_unit_firing_everywhere_is_not_labeled():
    rule = CumulativeRule.from_counts(2, threshold=0.05)
    for _ in range(5):  # unit 0 covers the whole 64×64 patch and so every region; unit 1 only the region
        rule.add_counts("mass", area=[4096, 40], inter=[40, 30], region_px=40)
    np.testing.assert_allclose(rule.iou(), [[200 / 20480, 150 / 250]])
    assert rule.labels() == {1: "mass"}


def test_bad_counts_and_thresholds_are_refused_and_change_nothing():
    with pytest.raises(LabelError, match="threshold"):
        CumulativeRule.from_counts(2, threshold=1.0)
    rule = CumulativeRule.from_counts(2)
    assert rule.threshold == DEFAULT_CUMULATIVE_THRESHOLD == 0.07
    with pytest.raises(LabelError, match=r"shape \(2,\)"):
        rule.add_counts("mass", area=[1, 2, 3], inter=[0, 0, 0], region_px=4)
    with pytest.raises(RegionError, match="covers no pixel"):
        rule.add_counts("mass", area=[1, 2], inter=[0, 0], region_px=0)
    with pytest.raises(LabelError, match="exceeds"):
        rule.add_counts("mass", area=[1, 2], inter=[2, 0], region_px=4)
    with pytest.raises(LabelError, match="concept"):
        rule.add_counts("", area=[1, 2], inter=[0, 0], region_px=4)
    assert rule.concepts == [] and rule.intersection.shape == (0, 2)
    with pytest.raises(LabelError, match="no store"):
        rule.add(0, "mass", np.ones((4, 4), bool))


# -- real stored activations -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lesions(real_dicoms, tmp_path_factory):
    store, manifest = build_lesion_store(tmp_path_factory.mktemp("lr"), real_dicoms)
    return store, read_manifest(manifest)


def _drawings(store, manifest, concept, n):
    by_id = manifest.by_id()
    out = []
    for i, image_id in enumerate(store.image_ids):
        rec = by_id[image_id]
        if rec.split == "test" and concept in rec.masks:
            m = load_concept_masks(rec, (64, 64), [concept])[concept]
            if m.sum() >= 16:
                out.append((i, m))
    return out[:n]


def test_on_real_activations_equals_brute_force_and_finds_the_known_units(lesions):
    store, manifest = lesions
    rule = CumulativeRule(store, "features.1")
    t = store.thresholds("features.1")
    inter, union = {}, {}
    for concept in ("mass", "calcification"):
        draws = _drawings(store, manifest, concept, 4)
        assert len(draws) == 4
        inter[concept], union[concept] = np.zeros(3, np.int64), np.zeros(3, np.int64)
        for i, m in draws:
            rule.add(store.image_ids[i], concept, m)
            up = unit_masks(store.maps("features.1", i), t, (64, 64))  # (unit, y, x) the plain way
            inter[concept] += (up & m).sum(axis=(1, 2))
            union[concept] += (up | m).sum(axis=(1, 2))
    np.testing.assert_array_equal(rule.intersection, [inter["mass"], inter["calcification"]])
    np.testing.assert_array_equal(rule.union, [union["mass"], union["calcification"]])
    labels = rule.labels()
    assert labels.get(0) == "mass" and labels.get(1) == "calcification", (labels, rule.iou())


def test_from_session_reads_the_stored_regions(lesions):
    store, manifest = lesions
    db = open_database("sqlite://")
    direct = CumulativeRule(store, "features.1")
    actions = []
    for concept in ("mass", "calcification"):
        for i, m in _drawings(store, manifest, concept, 3):
            direct.add(i, concept, m)
            res = apply_ious(db, store, layer="features.1", image=i, concept=concept, author="ana",
                             ious=np.zeros(3, np.float32), specs=[MaskRegion.from_mask(m)], mask=m)
            actions.append(res.action_id)
    stored = CumulativeRule.from_session(db, store, "features.1", session=1)
    assert stored.concepts == direct.concepts == ["mass", "calcification"]
    np.testing.assert_array_equal(stored.intersection, direct.intersection)
    np.testing.assert_array_equal(stored.union, direct.union)
    assert stored.labels() == direct.labels()
    assert CumulativeRule.from_session(db, store, "features.1", concepts=["mass"]).concepts == ["mass"]
    # an undone drawing is no longer evidence
    undo(db, actions[-1], author="ana")
    after = CumulativeRule.from_session(db, store, "features.1")
    assert after.drawings == {"mass": 3, "calcification": 2}
    with pytest.raises(UnknownLayerError):
        CumulativeRule(store, "features.99")
    with pytest.raises(RegionError, match="does not match the patch size"):
        direct.add(0, "mass", np.ones((8, 8), bool))
    with pytest.raises(RegionError, match="covers no pixel"):
        direct.add(0, "mass", np.zeros((64, 64), bool))


# -- the dataset-level estimate ----------------------------------------------------------------------------------------
# 4 images: mass on 0, 1, 2 (n = 3), a rim on 2, 3 (n = 2); unit 0 fires 50 px on each image, unit 1 only on 0 and 3
AREA = np.array([[50, 40], [50, 0], [50, 0], [50, 60]])
SHOWN = {"mass": [0, 1, 2], "rim": [2, 3]}


def test_dataset_rule_by_hand():
    rule = DatasetRule.from_counts(image_area=AREA, shown=SHOWN)
    assert rule.threshold == DEFAULT_DATASET_THRESHOLD == 0.04 and rule.labels() == {} and rule.n_units == 2
    np.testing.assert_array_equal(rule.unit_area, [200, 100])  # F_u
    # one mass drawing of 30 px on image 0: unit 0's 50 px cover 20 of it, unit 1's 40 px cover 30
    rule.add_counts("mass", area=[50, 40], inter=[20, 30], region_px=30)
    # I = F_u,mass · inside share: unit 0 150 · 20/50 = 60, unit 1 40 · 30/40 = 30; A = the drawn 30 px × the
    # units' mask area on the images showing mass over theirs on the drawn one: 30 · (150 + 40) / (50 + 40)
    a_mass = 30 * 190 / 90
    np.testing.assert_allclose(rule.iou(), [[60 / (200 + a_mass - 60), 30 / (100 + a_mass - 30)]])
    assert rule.labels() == {0: "mass", 1: "mass"}
    # a rim drawing of 20 px on image 3: unit 0 covers 2 px of it, unit 1 covers all 20
    rule.add_counts("rim", area=[50, 60], inter=[2, 20], region_px=20)
    # I = F_u,rim · share: unit 0 100 · 2/50 = 4, unit 1 60 · 20/60 = 20; A = 20 · (100 + 60) / (50 + 60)
    a_rim = 20 * 160 / 110
    np.testing.assert_allclose(rule.iou()[1], [4 / (200 + a_rim - 4), 20 / (100 + a_rim - 20)])
    assert rule.labels() == {0: "mass", 1: "mass"}  # unit 1: mass 0.225 beats rim 0.183
    # the cumulative rule on the same drawings: on the rim patch unit 1 fires little beyond the rim, so rim wins
    cum = CumulativeRule.from_counts(2)
    cum.add_counts("mass", area=[50, 40], inter=[20, 30], region_px=30)
    cum.add_counts("rim", area=[50, 60], inter=[2, 20], region_px=20)
    np.testing.assert_allclose(cum.iou(), [[20 / 60, 30 / 40], [2 / 68, 20 / 60]])
    # a concept drawn on more images than listed counts as shown on those: A is at least the drawn area (the ratio
    # alone would give 40 · 110 / 220 = 20)
    twice = DatasetRule.from_counts(image_area=AREA, shown={"rim": [3]})
    for _ in range(2):
        twice.add_counts("rim", area=[50, 60], inter=[0, 20], region_px=20)
    np.testing.assert_allclose(twice.iou(), [[0, 20 / (100 + 40 - 20)]])
    # the estimated overlap never exceeds the unit's whole area (unit 1 inside a region covering all of it)
    full = DatasetRule.from_counts(image_area=AREA, shown={"mass": [0, 3]})
    full.add_counts("mass", area=[50, 40], inter=[0, 40], region_px=400)
    a_full = 400 * (100 + 100) / (50 + 40)
    np.testing.assert_allclose(full.iou(), [[0, 100 / (100 + a_full - 100)]])


def test_dataset_rule_carries_the_drawn_area_over_by_the_best_units_only():
    """A_c comes from the AREA_UNITS units with the highest first estimate: units firing off the concept (here a
    lot, on the image not drawn) do not inflate it."""
    assert AREA_UNITS == 5
    area = np.array([[10] * 5 + [10, 10], [20] * 5 + [1000, 1000]])  # (image, unit): both images show mass
    rule = DatasetRule.from_counts(image_area=area, shown={"mass": [0, 1]})
    rule.add_counts("mass", area=[10] * 7, inter=[10] * 5 + [0, 0], region_px=10)  # units 0–4 are the region
    # units 0–4: I = 30 · 10/10; A = 10 · (5 · 30) / (5 · 10) = 30 (with units 5 and 6: 10 · 2170 / 70 = 310)
    np.testing.assert_allclose(rule.iou()[0], [30 / (30 + 30 - 30)] * 5 + [0, 0])
    assert rule.units_for("mass") == [0, 1, 2, 3, 4]


def test_dataset_rule_leaves_units_that_match_a_segmented_concept_better_unlabeled():
    """`known`: each unit's IoU with what the app segments itself (film labels, …). A unit whose estimated IoU with
    the drawn concept does not beat its IoU with one of those is no detector of the drawn concept — the detector
    criterion asks for the unit's best concept — so it takes no label; the estimate itself is unchanged."""
    plain = DatasetRule.from_counts(image_area=AREA, shown=SHOWN)
    plain.add_counts("mass", area=[50, 40], inter=[20, 30], region_px=30)
    est = plain.iou()[0]  # unit 0 ≈ 0.30, unit 1 ≈ 0.23 (test_dataset_rule_by_hand)
    assert plain.labels() == {0: "mass", 1: "mass"}
    for film, background, expected in (([0.5, 0.1], [0.0, 0.0], {1: "mass"}),  # unit 0: a film-label unit
                                       ([0.0, 0.0], [0.0, est[1]], {0: "mass"}),  # a tie goes to the known one
                                       ([0.1, 0.2], [0.2, 0.1], {0: "mass", 1: "mass"})):
        rule = DatasetRule.from_counts(image_area=AREA, shown=SHOWN, known={"film_label": film,
                                                                            "background": background})
        rule.add_counts("mass", area=[50, 40], inter=[20, 30], region_px=30)
        np.testing.assert_allclose(rule.iou()[0], est)
        assert rule.labels() == expected and rule.units_for("mass") == sorted(expected)
    assert set(SEGMENTED_CONCEPTS) == {"film_label", "background", "skin", "pectoral_muscle"}


def test_dataset_rule_bad_input_is_refused_and_changes_nothing():
    with pytest.raises(LabelError, match="images showing 'mass'"):
        DatasetRule.from_counts(image_area=AREA, shown={"mass": []})
    with pytest.raises(LabelError, match="images showing 'mass'"):
        DatasetRule.from_counts(image_area=AREA, shown={"mass": [0, 4]})  # 4 images: indices 0 … 3
    with pytest.raises(LabelError, match="needs image_area"):
        DatasetRule.from_counts(shown=SHOWN)
    with pytest.raises(LabelError, match="non-negative"):
        DatasetRule.from_counts(image_area=-AREA, shown=SHOWN)
    with pytest.raises(LabelError, match=r"shape \(8,\)"):
        DatasetRule.from_counts(image_area=AREA.ravel(), shown=SHOWN)
    with pytest.raises(LabelError, match="not 3"):
        DatasetRule.from_counts(3, image_area=AREA, shown=SHOWN)
    for bad in ([0.1], [0.1, float("nan")], [0.1, -0.1], [0.1, 1.5], [[0.1, 0.2]]):
        with pytest.raises(LabelError, match="known IoUs of 'skin' must be 2 values in"):
            DatasetRule.from_counts(image_area=AREA, shown=SHOWN, known={"skin": bad})
    known = DatasetRule.from_counts(image_area=AREA, shown={**SHOWN, "skin": [3]}, known={"skin": [0.1, 0.2]})
    with pytest.raises(LabelError, match="'skin' is one of the known concepts"):
        known.add_counts("skin", area=[1, 2], inter=[0, 0], region_px=4)
    assert known.concepts == [] and known.region_px.shape == (0,)
    rule = DatasetRule.from_counts(image_area=AREA, shown=SHOWN)
    with pytest.raises(LabelError, match="no image is listed as showing 'film label'.*known: mass, rim"):
        rule.add_counts("film label", area=[1, 2], inter=[0, 0], region_px=4)
    with pytest.raises(LabelError, match="exceeds"):
        rule.add_counts("mass", area=[1, 2], inter=[3, 0], region_px=4)
    assert rule.concepts == [] and rule.region_px.shape == (0,) and rule.iou().shape == (0, 2)
    for population, match in (([], "at least one"), ([0, 4], r"population must be indices of the 4 .*\[0, 4\]"),
                              ([0.5], "population must be indices"), ([-1], "population must be indices")):
        with pytest.raises(LabelError, match=match):
            DatasetRule.from_counts(image_area=AREA, shown=SHOWN, population=population)
    rule = DatasetRule.from_counts(image_area=AREA, shown={**SHOWN, "skin": [3]}, population=[0, 1, 2])
    with pytest.raises(LabelError, match="no image of the population is listed as showing 'skin'"):
        rule.add_counts("skin", area=[1, 2], inter=[0, 0], region_px=4)
    assert rule.concepts == [] and rule.unit_area.tolist() == AREA[:3].sum(axis=0).tolist()


def _drawn_everywhere(rule_cls, store, manifest, *, rtol: float = 1e-7):
    """A rule fed every patch whose mask shows mass or calcification: its estimate must be the dataset-level IoU over
    all splits, and it labels the two hand-set units. With the population set to the train and val patches and fed
    every one of those, it is the dataset-level IoU over train and val, which differs from the first."""
    by_id = manifest.by_id()
    every = {c: [(i, load_concept_masks(by_id[image_id], (64, 64), [c])[c]) for i, image_id in
                 enumerate(store.image_ids) if c in by_id[image_id].masks] for c in ("mass", "calcification")}
    every = {c: [(i, m) for i, m in v if m.any()] for c, v in every.items()}
    reference = [i for i, image_id in enumerate(store.image_ids) if by_id[image_id].split != "test"]
    truths = []
    for population, splits in ((None, ("train", "val", "test")), (reference, ("train", "val"))):
        rule = rule_cls(store, "features.1", shown={c: [i for i, _ in v] for c, v in every.items()},
                        population=population)
        for c, draws in every.items():
            for i, m in draws:
                if population is None or i in population:
                    rule.add(i, c, m)
        res = dataset_concept_iou(store, manifest, ["features.1"], splits=splits,
                                  concepts=["mass", "calcification"])["features.1"]
        truths.append(res.iou.T[[res.concepts.index(c) for c in rule.concepts]])
        np.testing.assert_allclose(rule.iou(), truths[-1], rtol=rtol)
        assert rule.labels() == {0: "mass", 1: "calcification"}
    assert np.abs(truths[0] - truths[1]).max() > 1e-3  # the population matters


def test_dataset_rule_on_real_activations_is_the_dataset_iou_when_every_patch_is_drawn(lesions):
    store, manifest = lesions
    t = store.thresholds("features.1")
    brute = np.stack([unit_masks(store.maps("features.1", i), t, (64, 64)).sum(axis=(1, 2))
                      for i in range(store.n_images)])
    np.testing.assert_array_equal(unit_mask_areas(store, "features.1"), brute)
    assert unit_mask_areas(store, "features.1") is unit_mask_areas(store, "features.1")  # computed once
    by_id = manifest.by_id()
    shown = images_showing(store, manifest)
    assert shown["mass"].tolist() == [i for i, image_id in enumerate(store.image_ids)
                                      if "mass" in by_id[image_id].concepts]
    # drawn on every patch whose mask shows the concept: the estimate is the dataset-level IoU over all splits
    _drawn_everywhere(DatasetRule, store, manifest)
    # from three test drawings per concept, with the manifest's lists, it finds the same units
    few = DatasetRule(store, "features.1", shown=shown)
    for c in ("mass", "calcification"):
        for i, m in _drawings(store, manifest, c, 3):
            few.add(i, c, m)
    assert few.labels() == {0: "mass", 1: "calcification"}, few.iou()
    with pytest.raises(LabelError, match="image_area has 2 units"):
        DatasetRule(store, "features.1", shown=shown, image_area=np.zeros((store.n_images, 2)))


def test_interpolation_matrix_and_unit_cell_weights_are_the_upsampling_exactly(lesions):
    store, _ = lesions
    rng = np.random.default_rng(0)
    p = rng.random((3, 16, 16)).astype(np.float32)
    by, bx = interpolation_matrix(16, 64), interpolation_matrix(16, 64)
    np.testing.assert_allclose((by @ torch.from_numpy(p) @ bx.T).numpy(), upsample_maps(p, (64, 64)).numpy(),
                               atol=1e-6)
    units, h, w = store.layer_shape("features.1")
    t = store.thresholds("features.1")
    images = [0, 5, store.n_images - 1]
    cache = FeatureCache(store)
    k = cache.cell_weights("features.1", images, block=2)  # two blocks
    assert k.shape == (3, units, h, w)
    np.testing.assert_array_equal(cache.cell_weights("features.1", [5])[0], k[1])  # kept, not recomputed
    # from the cache's maps (float16 copies)
    np.testing.assert_array_equal(k, unit_cell_weights(cache.image_maps("features.1", images), t, (64, 64)))
    k = unit_cell_weights(store.maps_many("features.1", images), t, (64, 64))
    area = k.sum(axis=(2, 3))
    assert (area == 0).any() and (area > 0).any()  # units silent on an image (skipped) and units firing
    heat = rng.random((3, h, w)).astype(np.float32)
    for j, i in enumerate(images):
        masks = unit_masks(store.maps("features.1", i), t, (64, 64))  # (unit, Y, X) the plain way
        direct = (masks * upsample_maps(heat[j][None], (64, 64)).numpy()).sum(axis=(1, 2))
        np.testing.assert_allclose((k[j] * heat[j]).sum(axis=(1, 2)), direct, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(k[j].sum(axis=(1, 2)), masks.sum(axis=(1, 2)), rtol=1e-5)  # p ≡ 1: the area
    assert cache.cell_weights("features.1", []).shape == (0, units, h, w)
    with pytest.raises(ValueError, match="image, unit, y, x"):
        unit_cell_weights(store.maps("features.1", 0), t, (64, 64))


def test_feature_cache_reads_each_image_once_and_serves_the_same_copy(lesions, monkeypatch):
    store, _ = lesions
    cache = FeatureCache(store)
    reads = []
    real = store.maps_many
    monkeypatch.setattr(store, "maps_many", lambda layer, idx: reads.append(sorted(np.asarray(idx).tolist()))
                        or real(layer, idx))
    last = store.n_images - 1
    first = cache.image_maps("features.1", [3, 1, 3])
    assert reads == [[1, 3]]  # only the images asked for, each once
    np.testing.assert_array_equal(first, store.maps_many("features.1", [3, 1, 3]).astype(np.float16))
    reads.clear()
    cache.load("features.1", [0, 1, 3, last])
    assert reads == [[0, last]]  # the others are in memory
    np.testing.assert_array_equal(cache.image_maps("features.1", [3, 1, 3]), first)
    assert reads == [[0, last]] and cache.image_maps("features.1", []).shape[0] == 0
    every = cache.maps("features.1")  # the whole layer: what is left, in one read
    assert reads[-1] == [i for i in range(store.n_images) if i not in (0, 1, 3, last)] and len(reads) == 2
    assert every.dtype == np.float16 and every.shape[0] == store.n_images
    np.testing.assert_array_equal(every[[3, 1, 3]].astype(np.float32), first)
    with pytest.raises(ImageIndexError, match="image index -1"):
        cache.image_maps("features.1", [0, -1])  # not the last image, as numpy would read it
    with pytest.raises(ImageIndexError, match=f"image index {store.n_images}"):
        cache.load("features.1", [store.n_images])
    with pytest.raises(MissingArrayError, match="no layer 'features.99'"):
        cache.image_maps("features.99", [0])


def test_probe_assisted_rule_is_the_dataset_iou_when_every_patch_is_drawn_and_finds_the_units_from_few(lesions):
    store, manifest = lesions
    # every image showing c drawn: X = x (the probe's overlaps cancel), so I is the drawn overlap and A the drawn area
    _drawn_everywhere(ProbeAssistedRule, store, manifest, rtol=1e-6)  # float32 pull-back sums
    # three test drawings per concept with the manifest's lists: the same units, and a probe per concept
    few = ProbeAssistedRule(store, "features.1", shown=images_showing(store, manifest))
    for c in ("mass", "calcification"):
        for i, m in _drawings(store, manifest, c, 3):
            few.add(store.image_ids[i], c, m)
    assert few.labels() == {0: "mass", 1: "calcification"}, few.iou()
    assert few.probe("mass") is few.probe("mass") and few.probe("mass").concept == "mass"  # fitted once
    again = ProbeAssistedRule(store, "features.1", shown=images_showing(store, manifest), cache=few.cache)
    for c in ("mass", "calcification"):
        for i, m in _drawings(store, manifest, c, 3):
            again.add(i, c, m)
    assert again.probe("mass") is few.probe("mass")  # the same drawings: the cache's fit, not a new one
    np.testing.assert_array_equal(again.iou(), few.iou())
    i, m = _drawings(store, manifest, "mass", 4)[3]
    first = few.probe("mass")
    few.add(i, "mass", m)
    assert few.probe("mass") is not first  # a new drawing refits it


def test_probe_assisted_rule_shrinks_each_units_ratio_toward_the_concepts_and_counts_drawn_members_as_drawn(lesions):
    """The estimate recomputed by hand from the rule's own probe: X, x, y over the images, the pooled ratio R, each
    unit's ratio (y + λR) / (x + λ), the drawn images of the population counted as drawn. Three test patches (outside
    the population of train and val patches) and one train patch (inside it) drawn."""
    from explain.dissection import mask_counts
    from explain.labelrules import DEFAULT_RATIO_PRIOR

    store, manifest = lesions
    shown = images_showing(store, manifest)
    by_id = manifest.by_id()
    population = np.array([i for i, image_id in enumerate(store.image_ids) if by_id[image_id].split != "test"])
    inside = next(i for i in shown["mass"] if i in population
                  and load_concept_masks(by_id[store.image_ids[i]], (64, 64), ["mass"])["mass"].sum() >= 16)
    draws = _drawings(store, manifest, "mass", 3) + [
        (inside, load_concept_masks(by_id[store.image_ids[inside]], (64, 64), ["mass"])["mass"])]
    t = store.thresholds("features.1")
    estimates = {}
    for prior in (DEFAULT_RATIO_PRIOR, 0.0, 1e9):
        rule = ProbeAssistedRule(store, "features.1", shown=shown, population=population, prior=prior)
        for i, m in draws:
            rule.add(i, "mass", m)
        probe, cache = rule.probe("mass"), rule.cache

        def overlaps(images):
            images = np.asarray(images, np.int64)
            p = probe.heatmap(cache.image_maps("features.1", images))
            w = cache.cell_weights("features.1", images, 0.99)
            return (np.einsum("nuyx,nyx->u", w, p, dtype=np.float64),
                    float((p * rule.cell_pixels).sum(dtype=np.float64)))

        inter = [mask_counts(store.maps("features.1", i), t, m[None], grid=rule.grid)[1][0].astype(np.float64)
                 for i, m in draws]
        y, y_in = np.sum(inter, axis=0), inter[-1]
        X, P = overlaps(np.union1d(np.intersect1d(shown["mass"], population), [inside]))
        x, p_drawn = overlaps([i for i, _ in draws])
        x_in, _ = overlaps([inside])
        lam = prior * 64 * 64
        with np.errstate(divide="ignore", invalid="ignore"):  # a unit silent on every drawn patch: X alone
            ratio = np.where(x + lam > 0, (y + lam * y.sum() / x.sum()) / (x + lam), 1.0)
        I = np.minimum(y_in + np.maximum(X - x_in, 0) * ratio, rule.unit_area)
        A = max(P * sum(int(m.sum()) for _, m in draws) / p_drawn, sum(int(m.sum()) for _, m in draws))
        by_hand = I / np.maximum(rule.unit_area + np.maximum(A - I, 0), 1)
        np.testing.assert_allclose(rule.iou()[0], by_hand, rtol=1e-6, atol=1e-12)
        estimates[prior] = rule.iou()[0]
        assert rule.labels().get(0) == "mass"  # the hand-set mass unit, whatever the prior
    assert not np.allclose(estimates[DEFAULT_RATIO_PRIOR], estimates[0.0])  # the prior moves the estimate
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(LabelError, match="prior must be"):
            ProbeAssistedRule(store, "features.1", shown=shown, prior=bad)


def test_probe_assisted_rule_bad_input_is_refused_and_changes_nothing(lesions):
    store, manifest = lesions
    shown = images_showing(store, manifest)
    with pytest.raises(LabelError, match="needs a store"):
        ProbeAssistedRule(None, "features.1", shown=shown)
    with pytest.raises(LabelError, match="needs the drawn masks"):
        ProbeAssistedRule.from_counts(3, shown=shown, image_area=np.zeros((store.n_images, 3)))
    rule = ProbeAssistedRule(store, "features.1", shown=shown)
    with pytest.raises(LabelError, match="use add or add_mask"):
        rule.add_counts("mass", area=[1, 1, 1], inter=[0, 0, 0], region_px=4)
    i, m = _drawings(store, manifest, "mass", 1)[0]
    with pytest.raises(RegionError, match="non-empty"):
        rule.add_mask(i, "mass", np.zeros((64, 64), bool))
    with pytest.raises(RegionError, match="non-empty"):
        rule.add_mask(i, "mass", m[:32])
    with pytest.raises(UnknownLayerError):
        ProbeAssistedRule(store, "features.99", shown=shown)
    assert rule.concepts == [] and rule.drawn == {} and rule.labels() == {}
    rule.add(i, "mass", m)
    assert rule.drawings == {"mass": 1} and [d for d, _ in rule.drawn["mass"]] == [i]


def test_the_dataset_rule_in_the_annotation_database_follows_the_estimate_with_provenance_and_undo(lesions):
    store, manifest = lesions
    db = open_database("sqlite://")
    shown = images_showing(store, manifest)
    rule = DatasetLabelRule()
    args = dict(layer="features.1", author="ana", rule=rule, shown=shown)
    memory = DatasetRule(store, "features.1", shown=shown)
    draws = [(c, i, m) for k in range(3) for c in ("mass", "calcification")
             for i, m in [_drawings(store, manifest, c, 3)[k]]]
    results = []
    for c, i, m in draws:  # after every drawing the stored labels are the rule's, computed from the session
        results.append(label_region(db, store, image=i, region=m, concept=c, **args))
        memory.add(i, c, m)
        assert current_labels(db, "features.1") == memory.labels()
        if len(results) == 1:
            first_estimate = memory.iou()[0, 0]  # unit 0's estimated IoU with mass when it took the label
    assert current_labels(db, "features.1") == {0: "mass", 1: "calcification"}
    first = results[0]
    assert first.changed == {0: (None, "mass")}
    unit0 = _unit_labels(db)[0]  # (unit, concept, iou, image, region, action, version)
    assert unit0[:2] == (0, "mass") and unit0[5] == results[0].action_id and unit0[3] == store.image_ids[draws[0][1]]
    assert 0.04 < unit0[2] == pytest.approx(first_estimate, rel=1e-6)  # the evidence when it was labeled
    # whole-patch "mass" drawings on calcification patches, where unit 0 never fires: the estimated mass area grows
    # until unit 0's IoU with mass falls under 0.04 and it loses the label; undo gives it back exactly
    before = _unit_labels(db)
    removed = None
    by_id = manifest.by_id()
    for i in [i for i, image_id in enumerate(store.image_ids) if "mass" not in by_id[image_id].concepts][:12]:
        res = label_region(db, store, image=i, region=np.ones((64, 64), bool), concept="mass", **args)
        if 0 in res.changed:
            removed = res
            break
    assert removed is not None and removed.changed[0] == ("mass", None)
    assert 0 not in current_labels(db, "features.1")
    undo(db, removed.action_id, author="ana")
    assert current_labels(db, "features.1")[0] == "mass"
    assert _unit_labels(db) == before  # concept, IoU, provenance, version: exactly as before
    # a label named by hand is never overridden or removed by the rule
    name_unit(db, store, layer="features.1", unit=1, concept="mass", author="ana")
    label_region(db, store, image=draws[1][1], region=draws[1][2], concept="calcification", **args)
    assert current_labels(db, "features.1")[1] == "mass"
    # without the images showing each concept the rule refuses, and nothing is stored
    n = len(regions_for(db))
    with pytest.raises(LabelError, match="images showing each concept"):
        label_region(db, store, image=draws[0][1], region=draws[0][2], concept="mass", layer="features.1",
                     author="ana", rule=rule)
    assert len(regions_for(db)) == n


def test_the_dataset_rule_in_the_annotation_database_weighs_the_rivals_it_is_given(lesions):
    """label_region's `known`: a unit whose IoU with a segmented concept (here unit 0 with film labels) beats its
    estimate for the drawn concept takes no label; the action records the rivals; a concept the author draws is
    estimated from the drawings instead of being a rival; rivals of the wrong shape are refused before anything is
    stored."""
    store, manifest = lesions
    db = open_database("sqlite://")
    shown = images_showing(store, manifest)
    draws = [(c, *_drawings(store, manifest, c, 2)[k]) for k in range(2) for c in ("mass", "calcification")]
    plain = DatasetRule(store, "features.1", shown=shown)
    for c, i, m in draws:
        plain.add(i, c, m)
    est = plain.iou()  # (concept, unit): what both sessions below estimate
    assert plain.labels() == {0: "mass", 1: "calcification"}
    known = {"film_label": [min(1.0, est[0, 0] + 0.05), 0.0, 0.0]}  # unit 0 matches film labels a little better
    for author, rivals in (("ana", {}), ("ben", {"known": known})):  # the same drawings, without and with rivals
        for c, i, m in draws:
            label_region(db, store, layer="features.1", image=i, region=m, concept=c, author=author,
                         rule=DatasetLabelRule(), shown=shown, **rivals)
    assert current_labels(db, "features.1", author="ana") == {0: "mass", 1: "calcification"}
    assert current_labels(db, "features.1", author="ben") == {1: "calcification"}
    with db.read() as s:
        rules = s.scalars(select(LabelAction.rule).where(LabelAction.author == "ben")).all()
    assert len(rules) == 4 and all(r == {"kind": "dataset", "threshold": 0.04, "level": 0.99,
                                         "rivals": ["film_label"]} for r in rules)
    # film labels drawn by the author on a patch listed as showing one: estimated from the drawing, no given rival
    c, i, m = draws[0]
    film = label_region(db, store, layer="features.1", image=i, region=m, concept="film_label", author="ben",
                        rule=DatasetLabelRule(), shown={**shown, "film_label": np.array([i])}, known=known)
    assert current_labels(db, "features.1", author="ben")[0] in ("mass", "film_label") and film.changed
    # rivals for another number of units, or out of [0, 1]: refused, nothing stored
    n = len(regions_for(db))
    for bad in ({"film_label": [0.1, 0.2]}, {"skin": [0.1, float("nan"), 0.0]}, {"skin": [0.1, 1.5, 0.0]}):
        with pytest.raises(LabelError, match="known IoUs of"):
            label_region(db, store, layer="features.1", image=i, region=m, concept=c, author="ben",
                         rule=DatasetLabelRule(), shown=shown, known=bad)
    assert len(regions_for(db)) == n


def test_the_assisted_rule_fits_its_probes_before_the_write_transaction(lesions, tmp_path, monkeypatch):
    """DatasetLabelRule(probes=True) in the annotation database: the stored labels are ProbeAssistedRule's over the
    session's drawings, and every probe fit happens while no write lock is held (another connection can take one)."""
    import sqlite3

    import explain.probes

    store, manifest = lesions
    path = tmp_path / "labels.db"
    db = open_database(f"sqlite:///{path}")
    shown = images_showing(store, manifest)
    cache = FeatureCache(store)
    locked: list[bool] = []
    real_fit = explain.probes.fit_probe

    def fit_and_check_lock(*args, **kwargs):
        con = sqlite3.connect(path, timeout=0)
        try:
            con.execute("BEGIN IMMEDIATE")  # fails at once while the labelling transaction holds the write lock
            con.rollback()
            locked.append(False)
        except sqlite3.OperationalError:
            locked.append(True)
        finally:
            con.close()
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(explain.probes, "fit_probe", fit_and_check_lock)
    memory = ProbeAssistedRule(store, "features.1", shown=shown)
    for k in range(2):
        for c in ("mass", "calcification"):
            i, m = _drawings(store, manifest, c, 2)[k]
            label_region(db, store, layer="features.1", image=i, region=m, concept=c, author="ana",
                         rule=DatasetLabelRule(probes=True), shown=shown, cache=cache)
            memory.add(i, c, m)
            assert current_labels(db, "features.1") == memory.labels()
    # one fit per drawing (the concept just drawn; the other's comes from the cache), none under the lock; the
    # in-memory rule above fitted its own (4 more, no database involved)
    assert locked == [False] * 8, locked
    assert current_labels(db, "features.1") == {0: "mass", 1: "calcification"}
    with db.read() as s:
        rules = s.scalars(select(LabelAction.rule)).all()
    assert rules and all(r == {"kind": "dataset", "threshold": 0.04, "probes": True, "level": 0.99} for r in rules)


def _unit_labels(db):
    from sqlalchemy import select

    from store.annotations import UnitLabel

    with db.read() as s:
        return sorted((lab.unit, lab.concept, lab.iou, lab.image_id, lab.region_id, lab.action_id, lab.version)
                      for lab in s.scalars(select(UnitLabel)))


# -- which patch to draw next ------------------------------------------------------------------------------------------
def test_next_drawings_by_hand_keeps_the_drawn_sample_balanced():
    # six images showing a concept: three of kind A (unit 0 fires), two of kind B (unit 1), one of both
    f = np.array([[2, 0], [2, 0], [2, 0], [0, 2], [0, 2], [1, 1]], np.float32)  # (image, unit)
    population = range(6)
    # population means m = (7/6, 5/6), no lift over the dataset (the population is all of it), so weights ∝ m:
    # (7/12, 5/12); z = f / m. Nothing drawn: the most typical image first (image 5: 7/12 (6/7 - 1)^2 + 5/12 (6/5 -
    # 1)^2 = 0.029), then the As (7/12 (12/7 - 1)^2 + 5/12 = 0.71), then the Bs (7/12 + 5/12 (12/5 - 1)^2 = 1.40);
    # identical rows tie exactly and keep their index order
    assert next_drawings(f, population).tolist() == [5, 0, 1, 2, 3, 4]
    # one A drawn: another A leaves unit 1 at 0 (0.71), a B evens both out (7/12 (1/7)^2 + 5/12 (1/5)^2 = 0.029),
    # image 5 half way (7/12 (2/7)^2 + 5/12 (2/5)^2 = 0.11)
    assert next_drawings(f, population, [0]).tolist() == [3, 4, 5, 1, 2]
    # A and the mixed image drawn: a B (0.029) before another A (7/12 (3/7)^2 + 5/12 (3/5)^2 = 0.26). (With A and B
    # drawn, another A and the mixed image tie exactly — each is off by as much on each unit, in opposite directions
    # — and only float rounding would order them.)
    assert next_drawings(f, population, [0, 5]).tolist() == [3, 4, 1, 2]
    # candidates: only those not drawn, in the suggested order; everything drawn: nothing left to suggest
    assert next_drawings(f, population, [0], candidates=[1, 0, 4]).tolist() == [4, 1]
    assert next_drawings(f, population, range(6)).tolist() == []
    # negative activations count as 0
    g, h = f.copy(), f.copy()
    g[2], h[2] = -3.0, 0.0
    assert next_drawings(g, population).tolist() == next_drawings(h, population).tolist() == [5, 2, 0, 1, 3, 4]
    # no unit fires on the population: any order will do (the candidates as given)
    assert next_drawings(np.zeros((6, 2)), [0, 1, 2], [1]).tolist() == [0, 2]
    # the same six images among two that show nothing, and a third unit firing on all eight (a film label) at
    # random strengths: units 0 and 1 fire on the population 4/3 times as much as on the dataset (weights ∝ m · 1/3,
    # as above); unit 2 has no lift and no weight, so the rankings are those above
    film = np.random.default_rng(0).uniform(1, 9, (8, 1))
    g = np.hstack([np.vstack([f, np.zeros((2, 2))]), film])
    assert next_drawings(g, population).tolist() == [5, 0, 1, 2, 3, 4]
    assert next_drawings(g, population, [0]).tolist() == [3, 4, 5, 1, 2]
    assert next_drawings(g, population, [0, 5]).tolist() == [3, 4, 1, 2]


def test_next_drawings_bad_input_is_refused():
    f = np.ones((4, 3))
    with pytest.raises(LabelError, match="finite"):
        next_drawings(np.array([[1.0, np.nan]] * 4), [0, 1])
    with pytest.raises(LabelError, match=r"\(image, feature\)"):
        next_drawings(np.ones(4), [0, 1])
    with pytest.raises(LabelError, match="no image is listed"):
        next_drawings(f, [])
    with pytest.raises(LabelError, match="indices of the 4 store images"):
        next_drawings(f, [0, 4])
    with pytest.raises(LabelError, match="drawn must be .*integers"):
        next_drawings(f, [0, 1], [0.5])
    with pytest.raises(LabelError, match="candidates must be indices"):
        next_drawings(f, [0, 1], candidates=[-1])
    with pytest.raises(LabelError, match="population must be .*integers"):
        next_drawings(f, [True, False])


def test_next_drawings_on_real_activations_ranks_by_the_balance_and_beats_random_samples(lesions):
    """On the stored pooled activations of real patches: the ranking is the order of the drawn sample's imbalance
    (computed here from the definition) once each candidate is added, and three drawings (a given first, then two
    suggested) are on average more balanced than the same first with two random ones."""
    store, manifest = lesions
    shown = images_showing(store, manifest)
    pooled = np.maximum(store.pooled("features.1", "max").astype(np.float64), 0)
    rng = np.random.default_rng(0)
    for concept, population in shown.items():
        mean = pooled[population].mean(axis=0)
        weight = mean * np.maximum(mean / pooled.mean(axis=0) - 1, 0)  # firing × lift over the dataset
        if not (weight > 0).any():  # shown on every image (normal tissue here): no lift anywhere, the firing alone
            weight = mean
        keep = weight > 0
        weight = weight[keep] / weight[keep].sum()

        def imbalance(sample):
            return float(((pooled[sample][:, keep].mean(axis=0) / mean[keep] - 1) ** 2) @ weight)

        drawn = [int(population[0]), int(population[1])]
        ranked = next_drawings(pooled, population, drawn)
        assert sorted(ranked.tolist()) == sorted(set(population.tolist()) - set(drawn))
        scores = [imbalance([*drawn, int(j)]) for j in ranked]
        assert scores == sorted(scores) or np.allclose(scores, sorted(scores), rtol=1e-9), (concept, scores[:5])
        suggested, random = [], []
        for first in population[:10]:
            sample = [int(first)]
            for _ in range(2):
                sample.append(int(next_drawings(pooled, population, sample)[0]))
            suggested.append(imbalance(sample))
            rest = np.setdiff1d(population, [first])
            random += [imbalance([int(first), *rng.choice(rest, 2, replace=False)]) for _ in range(20)]
        assert np.mean(suggested) < np.mean(random), (concept, np.mean(suggested), np.mean(random))
