"""Ground truth: dataset-level IoU against brute force, detectors by hand, and the simulated reviewer end to end on
real mammogram patches with inserted lesions (exact masks) seen by a hand-set network whose units are known:
unit 0 of features.1 responds to bright domes (masses), unit 1 to bright specks (calcifications)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_dissection import build_lesion_store

from explain.dissection import ConceptIoU, main, unit_masks
from explain.errors import ExplainError
from explain.groundtruth import (
    EXPERIMENT,
    GroundTruthConfig,
    choose_drawings,
    dataset_concept_iou,
    detector_margins,
    evaluate_ground_truth,
    find_detectors,
    load_concept_masks,
    log_ground_truth,
    tune_cumulative_threshold,
)
from store.manifest import read_manifest

torch.set_num_threads(1)
CONFIG = GroundTruthConfig(concepts=("mass", "calcification"), ks=(1, 2, 3, 4, 5))


@pytest.fixture(scope="module")
def lesions(real_dicoms, tmp_path_factory):
    store, manifest = build_lesion_store(tmp_path_factory.mktemp("gt"), real_dicoms)
    return store, read_manifest(manifest)


@pytest.fixture(scope="module")
def report(lesions, tmp_path_factory):
    from store.settings import load_settings

    store, manifest = lesions
    return evaluate_ground_truth(load_settings(tmp_path_factory.mktemp("ws")), store=store, data=manifest,
                                 config=CONFIG)


def test_find_detectors_by_hand():
    iou = np.array([[0.30, 0.10, 0.0],   # unit 0: best mass 0.30 → mass detector
                    [0.05, 0.06, 0.0],   # unit 1: best calcification 0.06 → calcification detector
                    [0.03, 0.01, 0.0],   # unit 2: best mass but 0.03 ≤ 0.04 → none
                    [0.20, 0.0, 0.25]])  # unit 3: fires on mass too, but its best concept is skin
    union = np.full(iou.shape, 10_000)
    res = ConceptIoU(layer="l", level=0.99, concepts=["mass", "calcification", "skin"],
                     intersection=np.rint(iou * union).astype(np.int64), union=union, n_images=3)
    assert find_detectors(res) == {"mass": [0], "calcification": [1], "skin": [3]}
    assert find_detectors(res, min_iou=0.2) == {"mass": [0], "calcification": [], "skin": [3]}
    # unit 0 leads calcification by 0.20 and the criterion by 0.26; unit 1 leads mass by only 0.01; unit 2 is 0.01
    # short of the criterion; unit 3 leads mass by 0.05
    np.testing.assert_allclose(detector_margins(res), [0.20, 0.01, 0.01, 0.05], atol=1e-4)
    np.testing.assert_allclose(detector_margins(res, min_iou=0.2), [0.10, 0.14, 0.17, 0.05], atol=1e-4)


def _brute_force_counts(store, manifest, concepts, splits):
    """(intersection, union) int64 (unit, concept) of features.1's unit masks, one unit and image at a time, over
    the images of `splits`, and how many images that was."""
    by_id = manifest.by_id()
    t = store.thresholds("features.1")
    inter = np.zeros((3, len(concepts)), np.int64)
    union = np.zeros((3, len(concepts)), np.int64)
    n = 0
    for i, image_id in enumerate(store.image_ids):
        rec = by_id[image_id]
        if rec.split not in splits:
            continue
        n += 1
        up = unit_masks(store.maps("features.1", i), t, (64, 64))
        masks = load_concept_masks(rec, (64, 64))
        for j, c in enumerate(concepts):
            m = masks.get(c, np.zeros((64, 64), bool))
            inter[:, j] += (up & m).sum(axis=(1, 2))
            union[:, j] += (up | m).sum(axis=(1, 2))
    return inter, union, n


def test_dataset_level_iou_equals_brute_force_over_the_reference_images(lesions):
    store, manifest = lesions
    res = dataset_concept_iou(store, manifest, ["features.1"], splits=("train", "val"))["features.1"]
    assert res.concepts == ["calcification", "mass", "normal_tissue"]
    inter, union, n = _brute_force_counts(store, manifest, res.concepts, ("train", "val"))
    assert res.n_images == n == 42
    np.testing.assert_array_equal(res.intersection, inter)
    np.testing.assert_array_equal(res.union, union)


def test_the_apps_rivals_are_the_segmented_concepts_iou_over_every_store_image(lesions, monkeypatch):
    """segmented_rivals (what the app hands its dataset rules): each unit's IoU with those of the segmented concepts
    the manifest has masks of, over every patch of the store (the population the app's rules estimate over, test
    split included); nothing when the manifest has none of them."""
    import explain.groundtruth as gt

    store, manifest = lesions
    assert gt.segmented_rivals(store, manifest, "features.1") == {}  # masses, calcifications and normal tissue only
    # the same images with masses counted as a segmented concept (skin has no mask here: left out)
    monkeypatch.setattr(gt, "SEGMENTED_CONCEPTS", ("mass", "skin"))
    rivals = gt.segmented_rivals(store, manifest, "features.1")
    inter, union, n = _brute_force_counts(store, manifest, ["mass"], ("train", "val", "test"))
    assert sorted(rivals) == ["mass"] and n == store.n_images == 60
    np.testing.assert_allclose(rivals["mass"], inter[:, 0] / union[:, 0], rtol=1e-6)
    reference = dataset_concept_iou(store, manifest, ["features.1"], concepts=["mass"])["features.1"].iou[:, 0]
    assert rivals["mass"][0] > 0.2 and rivals["mass"][0] != pytest.approx(reference[0], abs=1e-3)  # unit 0: masses


def test_the_known_units_are_the_ground_truth_detectors(report):
    assert report.detectors["features.1"]["mass"] == [0]
    assert report.detectors["features.1"]["calcification"] == [1]
    assert report.iou["features.1"].iou[0, report.concepts.index("mass")] > 0.2


def test_the_simulated_reviewer_finds_them_with_the_published_rule(report):
    for concept in ("mass", "calcification"):
        rows = report.curves["features.1"][concept]
        assert [r["k"] for r in rows] == [1, 2, 3, 4, 5]
        assert all(r["precision"] == 1.0 and r["recall"] == 1.0 for r in rows), rows
        assert report.k_to_goal("features.1", concept) == 1
    assert "mass @k=5: precision 1.00 recall 1.00" in report.summary()


def test_undefined_precision_and_recall_are_reported_as_such(report):
    # features.2 (max-pooled) has no calcification detector: nothing to recall, and nothing was labeled
    assert report.detectors["features.2"]["calcification"] == []
    row = report.at("features.2", "calcification", 5)
    assert row["recall"] is None and row["detectors"] == 0
    assert row["precision"] is None if row["labeled"] == 0 else row["precision"] == 0.0
    assert report.k_to_goal("features.2", "calcification") is None
    assert "n/a" in report.summary()


def test_drawings_are_exact_ground_truth_regions_of_test_patches(report, lesions):
    store, manifest = lesions
    by_id = manifest.by_id()
    assert [(d.k, d.concept) for d in report.drawings] == [(k, c) for k in range(1, 6) for c in ("mass",
                                                                                                "calcification")]
    for d in report.drawings:
        rec = by_id[d.image_id]
        assert rec.split == "test" and d.concept in rec.masks
        np.testing.assert_array_equal(d.mask, load_concept_masks(rec, (64, 64), [d.concept])[d.concept])
        assert d.mask.sum() >= CONFIG.min_region_px
    assert report.available == {"mass": 6, "calcification": 6}
    # seeded: the same order again, another order with another seed
    again, _ = choose_drawings(store, manifest, CONFIG)
    assert [store.image_ids[i] for i in again["mass"]] == [d.image_id for d in report.drawings if d.concept == "mass"]
    other, _ = choose_drawings(store, manifest, GroundTruthConfig(concepts=("mass",), ks=(1, 2, 3, 4, 5), seed=3))
    assert other["mass"] != again["mass"]


def test_the_report_is_logged_to_mlflow(report, workspace, lesions):
    from mlflow.tracking import MlflowClient

    run_id = log_ground_truth(report, workspace, store_attrs=lesions[0].attrs)
    client = MlflowClient(workspace.tracking_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT == "conceptlens-groundtruth"
    assert run.info.status == "FINISHED" and run.data.params["level"] == "0.99"
    assert run.data.tags["model_uri"] == "models:/hand/1"
    hist = client.get_metric_history(run_id, "features.1/recall/mass")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(k, 1.0) for k in range(1, 6)]
    assert run.data.metrics["features.1/detectors/calcification"] == 1
    path = client.download_artifacts(run_id, "groundtruth.json", str(workspace.workspace))
    data = json.loads(open(path).read())
    assert data["detectors"]["features.1"]["mass"] == [0] and len(data["drawings"]) == 10
    npy = client.download_artifacts(run_id, "iou/iou_features.1.npy", str(workspace.workspace))
    np.testing.assert_allclose(np.load(npy, allow_pickle=False), report.iou["features.1"].iou)


def test_python_m_explain_dissect(lesions, workspace, capsys, tmp_path):
    store, manifest = lesions
    out = tmp_path / "dissect.json"
    assert main(["--workspace", str(workspace.workspace), "--store", store.url, "--data", str(manifest.path),
                 "--layer", "features.1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "features.1 (3 units)" in text and "mass" in text and "detectors   1" in text
    data = json.loads(out.read_text())
    assert data["detectors"]["features.1"]["mass"] == [0] and data["n_images"] == 42


def test_a_manifest_of_another_dataset_or_missing_concepts_are_refused(lesions, workspace, real_dicoms, tmp_path):
    from helpers_store import make_patch_manifest

    store, manifest = lesions
    with pytest.raises(ExplainError, match="no ground-truth masks of \\['spiculated_margin'\\]"):
        evaluate_ground_truth(workspace, store=store, data=manifest,
                              config=GroundTruthConfig(concepts=("spiculated_margin",)))
    other = read_manifest(make_patch_manifest(tmp_path, real_dicoms, n=4, size=32))
    with pytest.raises(ExplainError, match="store images are not in"):
        evaluate_ground_truth(workspace, store=store, data=other, config=CONFIG)


def test_python_m_explain_dissect_without_a_store_says_so(workspace, capsys):
    assert main(["--workspace", str(workspace.workspace)]) == 1
    err = capsys.readouterr().err
    assert "demo.zarr" in err and "Traceback" not in err


def test_the_alternative_rules_are_measured_side_by_side_on_the_same_drawings(report, workspace, lesions):
    from mlflow.tracking import MlflowClient

    for rule in ("cumulative", "dataset", "assisted"):
        for concept in ("mass", "calcification"):
            rows = report.rows("features.1", concept, rule)
            assert [r["k"] for r in rows] == [1, 2, 3, 4, 5]
            assert [r["drawn"] for r in rows] == [r["drawn"] for r in report.curves["features.1"][concept]]
            assert rows[-1]["recall"] == 1.0 and rows[-1]["detectors"] == 1, rows
        assert f"[{rule}] @k=5" in report.summary()
    # the dataset rule labels exactly the two known units from the first drawing on
    assert all(r["precision"] == r["recall"] == 1.0 for c in ("mass", "calcification")
               for r in report.rows("features.1", c, "dataset"))
    with pytest.raises(ExplainError, match="unknown rule"):
        report.rows("features.1", "mass", "majority")
    run_id = log_ground_truth(report, workspace, store_attrs=lesions[0].attrs)
    run = MlflowClient(workspace.tracking_uri).get_run(run_id)
    assert run.data.params["cumulative_threshold"] == "0.07" and run.data.params["dataset_threshold"] == "0.04"
    assert run.data.params["assisted_prior"] == "0.25"
    assert run.data.metrics["features.1/cumulative/recall/mass"] == 1.0
    assert run.data.metrics["features.1/dataset/precision/calcification"] == 1.0
    # many reviewers (the deepest layer, k = 5): both rules find the two hand-set units whatever the patches drawn
    assert report.layers[-1] == "features.2"
    for rule in ("cumulative", "dataset", "assisted"):
        assert report.orders[rule]["mass"]["orders"] == 40
    assert run.data.metrics["features.2/dataset/orders_met/mass"] == report.orders["dataset"]["mass"]["met"]


def test_many_reviewers_find_the_known_units(report, lesions):
    from explain.groundtruth import reviewer_orders
    from explain.labelrules import images_showing

    store, manifest = lesions
    # 6 eligible test patches per concept, 5 drawn by each of 12 reviewers
    out = reviewer_orders(store, manifest, "features.1", report.detectors["features.1"], config=CONFIG, orders=12,
                          shown=images_showing(store, manifest))
    for rule in ("cumulative", "dataset", "assisted"):
        for concept in ("mass", "calcification"):
            assert out[rule][concept] == {"precision": 1.0, "recall": 1.0, "met": 1.0, "orders": 12}, out
    # a detector the rules cannot find (a unit labeled nothing) makes recall 0 and no reviewer meets the goal
    out = reviewer_orders(store, manifest, "features.1", {"mass": [2], "calcification": [1]}, config=CONFIG, orders=3)
    assert out["cumulative"]["mass"] == {"precision": 0.0, "recall": 0.0, "met": 0.0, "orders": 3}
    assert set(out) == {"cumulative"}  # no `shown`: no dataset rule


def test_the_dataset_rules_estimate_the_iou_over_the_reference_images(report, lesions, monkeypatch):
    """The detectors are defined over the train and val patches: the rules estimate the IoU over the same images,
    not over the whole store with the test patches the reviewer draws on; both get the rivals they are given, and
    the assisted rule the config's prior."""
    from dataclasses import replace

    import explain.groundtruth as gt
    from explain.labelrules import images_showing

    store, manifest = lesions
    reference = gt.reference_images(store, manifest, CONFIG)
    by_id = manifest.by_id()
    assert reference.tolist() == [i for i, image_id in enumerate(store.image_ids)
                                  if by_id[image_id].split in ("train", "val")]
    assert 0 < len(reference) < store.n_images
    known = {"film_label": np.zeros(store.layer_shape("features.1")[0])}
    config = replace(CONFIG, assisted_prior=0.5)
    seen = []  # (rule, population, rivals, prior) of every rule the bench builds

    def spy(base):
        class Spy(base):
            def __init__(self, *args, **options):
                seen.append((base.__name__, options.get("population"), options.get("known"), options.get("prior")))
                super().__init__(*args, **options)
        return Spy

    for name in ("DatasetRule", "ProbeAssistedRule"):
        monkeypatch.setattr(gt, name, spy(getattr(gt, name)))
    shown = images_showing(store, manifest)
    gt.reviewer_orders(store, manifest, "features.1", report.detectors["features.1"], config=config, orders=1,
                       shown=shown, known=known)
    gt.simulate_reviewer(store, manifest, "features.1", report.detectors["features.1"], config=config, shown=shown,
                         known=known)
    assert sorted({n for n, *_ in seen}) == ["DatasetRule", "ProbeAssistedRule"] and len(seen) == 4
    assert all(np.array_equal(p, reference) and k is known for _, p, k, _ in seen), seen
    assert [prior for n, *_, prior in seen if n == "ProbeAssistedRule"] == [0.5, 0.5]


def test_the_cumulative_threshold_is_tuned_on_train_and_val_drawings_only(report, lesions):
    store, manifest = lesions
    detectors = report.detectors["features.1"]
    res = tune_cumulative_threshold(store, manifest, "features.1", detectors, k=3, orders=6,
                                    concepts=("mass", "calcification"), candidates=(0.3, 0.05, 0.01))
    by_id = manifest.by_id()
    assert res.images and {by_id[i].split for i in res.images} <= {"train", "val"}  # never a test patch
    assert sorted(res.scores) == [0.01, 0.05, 0.3] and res.orders == 6 and res.k == 3
    # the hand-set units: both found at low thresholds (min(P, R) = 1); at 0.3 the mass unit's cumulative IoU with
    # the drawn masses is too low and only the (near exact) calcification unit keeps its label
    assert res.scores[0.01] == res.scores[0.05] == 1.0
    assert res.per_concept[0.3] == {"mass": (0.0, 0.0), "calcification": (1.0, 1.0)} and res.scores[0.3] == 0.5
    assert res.threshold == 0.01  # ties go to the smaller threshold
    # the score is the mean over concepts of min(precision, recall), averaged over the orders
    for t, sc in res.scores.items():
        assert sc <= np.mean([min(p, r) for p, r in res.per_concept[t].values()]) + 1e-9
    with pytest.raises(ExplainError, match="no concept with detectors"):
        tune_cumulative_threshold(store, manifest, "features.1", {"mass": [], "calcification": []},
                                  concepts=("mass", "calcification"))


def test_a_reviewer_following_the_suggestions_is_measured_on_the_dissection_layer(report, workspace, lesions):
    """The suggested reviewer draws the random reviewer's first patch of each concept, then each time the eligible
    patch explain.labelrules.next_drawings ranks first; every rule is measured on those drawings (the deepest layer
    only), over 40 such reviewers too, and logged to mlflow."""
    from mlflow.tracking import MlflowClient

    from explain.groundtruth import REVIEWERS, RULES, eligible_drawings, reviewer_orders, simulate_reviewer, \
        suggested_order
    from explain.labelrules import images_showing, next_drawings

    store, manifest = lesions
    head = report.layers[-1]
    shown = images_showing(store, manifest)
    pooled = store.pooled(head, "max")
    eligible = eligible_drawings(store, manifest, CONFIG)
    order = {}
    for c in CONFIG.concepts:
        first = store.index_of([d.image_id for d in report.drawings if d.concept == c][0])
        order[c] = suggested_order(pooled, shown[c], eligible[c], first, 5)
        assert order[c][0] == first and len(set(order[c])) == 5 and set(order[c]) <= set(eligible[c])
        for n in range(1, 5):
            assert order[c][n] == next_drawings(pooled, shown[c], order[c][:n], candidates=eligible[c])[0]
    random_order = {c: [store.index_of(d.image_id) for d in report.drawings if d.concept == c]
                    for c in CONFIG.concepts}
    assert order != random_order  # the suggestions are not the seeded random patches
    alt = {}
    published, _ = simulate_reviewer(store, manifest, head, report.detectors[head], config=CONFIG, order=order,
                                     alternatives=alt, shown=shown)
    assert report.suggested == {"published": published, **alt}
    for rule in RULES:
        rows = report.rows(head, "mass", rule, reviewer="suggested")
        assert [r["k"] for r in rows] == [1, 2, 3, 4, 5] and [r["drawn"] for r in rows] == [1, 2, 3, 4, 5]
    for rule in ("dataset", "assisted"):  # the hand-set mass unit, found within the five drawings
        assert report.rows(head, "mass", rule, reviewer="suggested")[-1]["recall"] == 1.0
    with pytest.raises(ExplainError, match=f"measured on {head}"):
        report.rows("features.1", "mass", "dataset", reviewer="suggested")
    with pytest.raises(ExplainError, match="unknown reviewer"):
        report.rows(head, "mass", "dataset", reviewer="lazy")
    assert "following the app's suggestions" in report.summary() and REVIEWERS == ("random", "suggested")
    for rule in ("cumulative", "dataset", "assisted"):
        assert report.orders_suggested[rule]["mass"]["orders"] == 40
    with pytest.raises(ExplainError, match="needs the images showing"):
        reviewer_orders(store, manifest, head, report.detectors[head], config=CONFIG, reviewer="suggested")
    with pytest.raises(ExplainError, match="unknown reviewer"):
        reviewer_orders(store, manifest, head, report.detectors[head], config=CONFIG, reviewer="lazy")
    run = MlflowClient(workspace.tracking_uri).get_run(log_ground_truth(report, workspace))
    assert run.data.metrics[f"{head}/dataset/suggested_orders_met/mass"] == report.orders_suggested["dataset"][
        "mass"]["met"]
    assert run.data.metrics[f"{head}/suggested/dataset/recall/mass"] == report.suggested["dataset"]["mass"][-1][
        "recall"]


def test_the_rules_rivals_are_the_units_iou_with_what_the_app_segments_itself():
    """segmented_ious picks each unit's dataset IoU with film labels, background, skin and pectoral muscle (not the
    lesions, nor normal tissue: those need the ground truth): what evaluate_ground_truth hands to both rules."""
    import explain.groundtruth as gt
    from explain.dissection import ConceptIoU

    res = ConceptIoU(layer="x", level=0.99, concepts=["mass", "film_label", "normal_tissue", "skin"],
                     intersection=np.array([[1, 2, 3, 4], [0, 0, 5, 1]]), union=np.full((2, 4), 10), n_images=3)
    known = gt.segmented_ious(res)
    assert sorted(known) == ["film_label", "skin"]
    np.testing.assert_allclose(known["film_label"], [0.2, 0.0])
    np.testing.assert_allclose(known["skin"], [0.4, 0.1])
