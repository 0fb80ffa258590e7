"""Concept probes: example making, the batched logistic fit, CV / held-out splits, metrics, mlflow versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain.errors import ExplainError, ProbeDataError
from explain.probes import (
    Examples, ProbeConfig, auroc, average_precision, cell_coverage, fit_logistic, fit_probe, grouped_folds,
    held_out_split, load_probe, log_probe, mark_examples, mark_position_examples, probe_versions, region_examples,
    session_run, unit_examples,
)

torch.set_num_threads(1)


# -- examples ----------------------------------------------------------------------------------------------------------
def test_cell_coverage_exact_areas():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    np.testing.assert_allclose(cell_coverage(mask, (2, 2)), [[1, 0], [0, 0]])
    mask[2, 2] = True  # one pixel of the bottom-right cell's four
    np.testing.assert_allclose(cell_coverage(mask, (2, 2)), [[1, 0], [0, 0.25]])
    # 3 px onto 2 cells: cell 0 spans [0, 1.5) → row 0 is 1/1.5 of it, row 1 half a pixel = 0.5/1.5
    m3 = np.zeros((3, 1), bool)
    m3[0, 0] = True
    np.testing.assert_allclose(cell_coverage(m3, (2, 1))[:, 0], [2 / 3, 0.0])
    m3[1, 0] = True
    np.testing.assert_allclose(cell_coverage(m3, (2, 1))[:, 0], [1.0, 1 / 3])
    np.testing.assert_allclose(cell_coverage(np.ones((7, 5), bool), (3, 2)), np.ones((3, 2)))


def test_region_examples_inside_outside_border():
    maps = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # (unit, y, x): unit0 = 0..5, unit1 = 6..11
    mask = np.zeros((4, 6), bool)  # patch 4×6 → cells of 2×2 pixels
    mask[0:2, 0:2] = True  # cell (0, 0) fully covered: positive
    mask[0, 2] = True  # cell (0, 1) covered 1/4: border, ignored
    ex = region_examples(maps, mask, image=5)
    assert ex.n_positive == 1 and ex.n_negative == 4 and len(ex) == 5
    np.testing.assert_array_equal(ex.vectors[ex.labels == 1], [[0, 6]])
    np.testing.assert_array_equal(ex.vectors[ex.labels == 0], [[2, 8], [3, 9], [4, 10], [5, 11]])
    assert set(ex.groups.tolist()) == {5} and ex.counts == {"regions": 1}
    # a looser border: cells touched at most 1/4 count as negatives
    assert region_examples(maps, mask, image=5, outside=0.25).n_negative == 5
    with pytest.raises(ProbeDataError, match="image 5: the region mask is empty"):
        region_examples(maps, np.zeros((4, 6), bool), image=5)


def test_mark_and_unit_examples():
    pooled = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    ex = mark_examples(pooled, [True, False], images=[10, 11])
    assert ex.labels.tolist() == [1, 0] and ex.groups.tolist() == [10, 11] and ex.counts == {"marks": 2}
    with pytest.raises(ProbeDataError):
        mark_examples(pooled, [True], images=[10, 11])

    maps = np.zeros((1, 2, 4, 4), np.float32)  # (image, unit, y, x)
    maps[0, 1, 0, 0] = 5.0  # unit 1 fires at (0, 0) only
    maps[0, 0] = 9.0  # unit 0 is not labeled: its values never decide
    ex = unit_examples(maps, [1], np.array([100.0, 1.0]), images=[7])
    # positive (0, 0); its 8-neighbours (0, 1), (1, 0), (1, 1) are left out; the other 12 positions are negatives
    assert ex.n_positive == 1 and ex.n_negative == 12
    np.testing.assert_array_equal(ex.vectors[ex.labels == 1], [[9.0, 5.0]])
    with pytest.raises(ProbeDataError, match="outside"):
        unit_examples(maps, [2], np.ones(2), images=[7])
    joined = ex + mark_examples(pooled, [True, False], images=[10, 11])
    assert len(joined) == 15 and joined.counts == {"units": 1, "marks": 2} and joined.n_annotations == 3


def test_mark_position_examples_match_per_position_scoring():
    maps = np.zeros((2, 2, 2, 2), np.float32)  # (image, unit, y, x)
    maps[0, 0, 0, 1], maps[0, 1, 0, 1] = 4.0, 3.0  # image 0: both units peak together at (0, 1) …
    maps[0, 0, 1, 0] = 4.5  # … unit 0 alone a little higher at (1, 0)
    maps[1] = 1.0
    ex = mark_position_examples(maps, [True, False], images=[20, 21])
    # showing: one positive, a real position (never the pooled vector [4.5, 3], which no position reaches)
    np.testing.assert_array_equal(ex.vectors[ex.labels == 1], [[4.0, 3.0]])
    # not showing: every position of the image is a negative
    assert ex.n_negative == 4 and (ex.groups[ex.labels == 0] == 21).all() and ex.counts == {"marks": 2}
    with pytest.raises(ProbeDataError, match="marks"):
        mark_position_examples(maps[0], [True], images=[20])


# -- fitting -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_rows", [None, 7])  # x in one block; in 43 blocks of 7 rows, the last one short
def test_fit_logistic_matches_sklearn(block_rows):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6) + rng.normal(size=300) > 0).astype(np.float32)
    sw = rng.uniform(0.5, 2.0, size=300).astype(np.float32)
    sub = np.ones(300, np.float32)
    sub[:100] = 0  # the third model leaves out the first 100 rows
    # float64 so the comparison tests the objective, not float32 rounding
    theta = fit_logistic(torch.from_numpy(x).double(), torch.from_numpy(y), torch.from_numpy(np.stack([sw, np.ones(300,
                         np.float32), sub])).double(), torch.tensor([0.1, 1.0, 10.0]), max_iter=1000, tol=1e-9,
                         block_rows=block_rows).numpy()
    for m, (C, rows, w) in enumerate([(0.1, slice(None), sw), (1.0, slice(None), None), (10.0, slice(100, None), None)]):
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x[rows].astype(np.float64), y[rows], sample_weight=w)
        np.testing.assert_allclose(theta[m, :-1], ref.coef_[0], atol=1e-4)
        assert theta[m, -1] == pytest.approx(ref.intercept_[0], abs=1e-4)
    with pytest.raises(ValueError, match="block_rows must be at least 1, got -5"):  # not an empty sum over no blocks
        fit_logistic(torch.from_numpy(x), torch.from_numpy(y), torch.ones(1, 300), torch.tensor([1.0]), block_rows=-5)


def test_metrics_match_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_grouped_folds_and_held_out_keep_images_whole():
    groups = np.repeat(np.arange(9), [5, 1, 7, 3, 3, 2, 8, 1, 4])
    folds = grouped_folds(groups, 3, seed=0)
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    assert set(folds.tolist()) == {0, 1, 2}
    labels = (np.arange(len(groups)) % 2).astype(np.int8)
    held = held_out_split(labels, groups, 0.25, seed=0)
    assert held is not None and held.any() and (~held).any()
    for g in np.unique(groups):
        assert len(np.unique(held[groups == g])) == 1
    # one image only: nothing can be held out
    assert held_out_split(np.array([0, 1, 1]), np.array([4, 4, 4]), 0.25) is None
    # a single positive image cannot be both in training and held out
    assert held_out_split(np.array([1, 0, 0, 0]), np.array([0, 1, 2, 3]), 0.25) is None
    # stratified by whether an image holds positives: images 10, 30 (positives) and 20, 40, 50 (none), unsorted
    groups = np.array([30, 10, 20, 30, 40, 50, 10, 20, 40, 50])
    labels = np.array([0, 1, 0, 1, 0, 0, 0, 0, 0, 0], np.int8)
    for seed in range(5):
        held = held_out_split(labels, groups, 0.25, seed=seed)
        chosen = set(groups[held].tolist())
        assert len(chosen & {10, 30}) == 1 and len(chosen & {20, 40, 50}) == 1, chosen


def _blob_examples(n_images=12, seed=0, units=8):
    """Per-image maps where the concept (units 0 and 1 high) lives in a square region drawn as the mask."""
    rng = np.random.default_rng(seed)
    ex = Examples.empty(units)
    maps_all, masks = [], []
    for i in range(n_images):
        maps = rng.gamma(1.0, 1.0, size=(units, 8, 8)).astype(np.float32)
        y0, x0 = rng.integers(0, 5, 2)
        maps[:2, y0:y0 + 3, x0:x0 + 3] += 2.5
        mask = np.zeros((32, 32), bool)
        mask[4 * y0:4 * (y0 + 3), 4 * x0:4 * (x0 + 3)] = True
        ex = ex + region_examples(maps, mask, image=i)
        maps_all.append(maps)
        masks.append(mask)
    return ex, np.stack(maps_all), np.stack(masks)


def test_fit_probe_learns_the_concept_and_heatmap():
    ex, maps, masks = _blob_examples()
    fit = fit_probe(ex, concept="mass", layer="features.3")
    p = fit.probe
    assert fit.n_positive == 12 * 9 and fit.n_negative == len(ex) - 12 * 9 and fit.n_images == 12
    assert fit.n_annotations == 12
    assert fit.params["C"] in ProbeConfig().Cs and fit.params["held_out_images"] >= 1
    assert fit.metrics["auroc"] > 0.95 and fit.metrics["ap"] > 0.85 and fit.metrics["cv_auroc"] > 0.95
    # the concept units carry the weight
    assert np.argsort(-p.weights)[:2].tolist() in ([0, 1], [1, 0])
    assert np.linalg.norm(p.cav) == pytest.approx(1.0, abs=1e-6)
    # raw-space weights reproduce the standardized model's logits: heatmap = sigmoid(w·a + b) per position
    hm = p.heatmap(maps[0])  # (y, x)
    manual = 1 / (1 + np.exp(-(np.einsum("uyx,u->yx", maps[0], p.weights) + p.bias)))
    np.testing.assert_allclose(hm, manual, rtol=1e-5, atol=1e-6)
    up = p.heatmap(maps, size=(32, 32))  # (image, Y, X)
    assert up.shape == (12, 32, 32)
    assert auroc(masks.reshape(-1), up.reshape(-1)) > 0.9
    assert p.score(up).shape == (12,)
    np.testing.assert_allclose(p.score(hm), hm.max())
    with pytest.raises(ProbeDataError, match="has 8 units"):
        p.heatmap(maps[:, :4])


def test_combined_heatmap_is_the_geometric_mean_of_the_layers_maps():
    from explain.probes import combine_heatmaps

    a = np.array([[0.9, 0.5], [0.0, 1.0]], np.float32)
    b = np.array([[0.1, 0.5], [0.8, 1.0]], np.float32)
    out = combine_heatmaps([a, b])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.3, 0.5], [np.sqrt(0.8e-6), 1.0]], rtol=1e-5)  # a zero is floored, no veto
    np.testing.assert_array_equal(combine_heatmaps([a]), a)
    # a pixel both layers find outranks one only a layer finds (their arithmetic mean would tie them)
    c = combine_heatmaps([np.array([0.6, 1.0]), np.array([0.6, 0.2])])
    assert c[0] > c[1]
    for bad, words in [([], "at least one"), ([a, b[:1]], "one shape"), ([a, b + 1], r"\[0, 1\]"),
                       ([a, np.full_like(b, np.nan)], r"\[0, 1\]")]:
        with pytest.raises(ProbeDataError, match=words):
            combine_heatmaps(bad)


def test_probe_with_one_class_is_refused():
    ex, _, _ = _blob_examples(n_images=2)
    pos = Examples(ex.vectors[ex.labels == 1], ex.labels[ex.labels == 1], ex.groups[ex.labels == 1])
    with pytest.raises(ProbeDataError, match=r"probe mass@features\.3: only positives"):
        fit_probe(pos, concept="mass", layer="features.3")
    neg = mark_examples(np.ones((3, 8)), [False] * 3, images=[0, 1, 2])
    with pytest.raises(ExplainError, match="only negatives"):
        fit_probe(neg, concept="mass", layer="features.3")
    with pytest.raises(ValueError, match="no examples"):
        fit_probe(Examples.empty(8), concept="mass", layer="features.3")


def test_single_image_probe_has_no_held_out_metrics():
    ex, maps, _ = _blob_examples(n_images=1)
    fit = fit_probe(ex, concept="mass", layer="l")
    assert np.isnan(fit.metrics["auroc"]) and np.isnan(fit.metrics["cv_auroc"]) and fit.params["held_out_images"] == 0
    assert fit.metrics["train_auroc"] > 0.95


def test_warm_start_reaches_the_same_probe():
    ex, _, _ = _blob_examples()
    cold = fit_probe(ex, concept="mass", layer="l", config=ProbeConfig(Cs=(1.0,), balance=(True,)))
    warm = fit_probe(ex, concept="mass", layer="l", config=ProbeConfig(Cs=(1.0,), balance=(True,)), init=cold.probe)
    np.testing.assert_allclose(warm.probe.weights, cold.probe.weights, atol=2e-3)


# -- mlflow ------------------------------------------------------------------------------------------------------------
def test_probe_runs_are_nested_versions_with_numpy_artifacts(workspace):
    import mlflow
    from mlflow.tracking import MlflowClient

    ex, maps, _ = _blob_examples()
    fit = fit_probe(ex, concept="mass", layer="features.3")
    parent = session_run("alice", settings=workspace)
    assert session_run("alice", settings=workspace) == parent  # got, not created twice
    assert session_run("bob", settings=workspace) != parent
    r1 = log_probe(fit, settings=workspace, session="alice", store="demo", tcav={"normal": 0.25, "lesion": 0.75})
    fit2 = fit_probe(ex + mark_examples(maps[:1].max(axis=(2, 3)), [True], images=[0]), concept="mass",
                     layer="features.3")
    r2 = log_probe(fit2, settings=workspace, session="alice", store="demo")

    client = MlflowClient(tracking_uri=workspace.tracking_uri)
    run = client.get_run(r1)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.status == "FINISHED"
    assert run.data.params["C"] == str(fit.params["C"]) and run.data.params["concept"] == "mass"
    assert run.data.metrics["n_positive"] == fit.n_positive and run.data.metrics["n_negative"] == fit.n_negative
    assert run.data.metrics["auroc"] == pytest.approx(fit.metrics["auroc"])
    assert run.data.metrics["tcav/lesion"] == 0.75
    names = sorted(a.path for a in client.list_artifacts(r1, "probe"))
    assert names == [f"probe/{n}.npy" for n in ("bias", "cav", "mean", "scale", "weights")]
    local = mlflow.artifacts.download_artifacts(run_id=r1, artifact_path="probe/cav.npy",
                                                tracking_uri=workspace.tracking_uri)
    np.testing.assert_allclose(np.load(local, allow_pickle=False), fit.probe.cav)
    # artifacts live in the workspace, not in the current directory
    assert str(workspace.artifact_root) in run.info.artifact_uri

    loaded = load_probe(r1, settings=workspace)
    assert loaded.run_id == r1 and loaded.concept == "mass" and loaded.layer == "features.3"
    np.testing.assert_array_equal(loaded.weights, fit.probe.weights)
    np.testing.assert_allclose(loaded.heatmap(maps), fit.probe.heatmap(maps), atol=1e-6)
    # a logged version never changes: read from the tracking store once, then kept (per tracking store)
    import explain.probes as probes_module

    hits = probes_module._read_probe.cache_info().hits
    assert load_probe(r1, settings=workspace) is loaded
    assert probes_module._read_probe.cache_info().hits == hits + 1
    probes_module._read_probe.cache_clear()  # forgotten: read again, equal but a new object
    again = load_probe(r1, settings=workspace)
    assert again is not loaded and np.array_equal(again.weights, loaded.weights) and again.bias == loaded.bias

    versions = probe_versions("mass", "features.3", settings=workspace)
    assert [v["run_id"] for v in versions] == [r2, r1]
    assert versions[1]["n_annotations"] == 12 and versions[0]["n_annotations"] == 13
    assert versions[1]["tcav"] == {"normal": 0.25, "lesion": 0.75}
    assert probe_versions("mass", "features.9", settings=workspace) == []
    assert probe_versions("mass", "features.3", settings=workspace, store="other") == []
    with pytest.raises(ProbeDataError, match="not a probe fit"):
        load_probe(parent, settings=workspace)
    with pytest.raises(ProbeDataError, match="no probe run"):
        load_probe("0" * 32, settings=workspace)


# -- on a real-data store: patches of a real mammogram with inserted masses, a small trained network ----------------
@pytest.fixture(scope="module")
def lesion(tmp_path_factory, real_dicoms):
    from helpers_probes import build_lesion_store

    return build_lesion_store(tmp_path_factory.mktemp("probes") / "lesion.zarr", real_dicoms[0])


def _n_probe_runs(settings):
    from mlflow.tracking import MlflowClient

    from explain.probes import PROBE_EXPERIMENT

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    exp = client.get_experiment_by_name(PROBE_EXPERIMENT)
    if exp is None:
        return 0
    return len(client.search_runs([exp.experiment_id], filter_string="tags.`conceptlens.kind` = 'probe'"))


def test_retrain_from_drawn_regions_writes_scores_and_heatmaps(lesion, workspace):
    from explain.probes import FeatureCache, ProbeAnnotations, concept_heatmap, concept_layers, probe_heatmap, retrain

    store, masks = lesion.store, lesion.masks
    cache = FeatureCache(store, model=lesion.model, tcav_per_class=16)
    ann = ProbeAnnotations("mass", regions=[(f"img-{i:03d}", masks[i]) for i in (1, 3, 5)])
    results = retrain(store, ann, settings=workspace, session="alice", cache=cache)
    assert [r.layer for r in results] == lesion.layers
    deep = results[-1]
    stored = store.probe("mass", deep.layer)
    assert stored.run_id == deep.run_id and stored.attrs["n_annotations"] == 3
    np.testing.assert_allclose(stored.scores, deep.scores)
    assert stored.maps.shape == (store.n_images, *store.layer_shape(deep.layer)[1:])
    # the stored heatmaps are the probe applied at every position
    direct = deep.fit.probe.heatmap(store.maps_many(deep.layer, [10, 11]))
    np.testing.assert_allclose(stored.maps[[10, 11]], direct, atol=2e-3)
    # they find the inserted masses on patches nobody annotated
    held = np.arange(7, store.n_images)
    hm = np.stack([probe_heatmap(store, "mass", deep.layer, int(i)) for i in held])  # (image, Y, X)
    assert hm.shape == (len(held), 32, 32)
    assert auroc(masks[held].reshape(-1), hm.reshape(-1)) > 0.85
    # lesion patches score higher than normal ones
    assert auroc(store.labels()[held], stored.scores[held]) > 0.85
    # the concept's map across layers: every layer's stored map at the patch size, geometric mean, and it finds the
    # masses too
    assert concept_layers(store, "mass") == lesion.layers
    per_layer = [probe_heatmap(store, "mass", layer, 9) for layer in lesion.layers]
    np.testing.assert_allclose(concept_heatmap(store, "mass", 9),
                               np.prod(np.maximum(per_layer, 1e-6), axis=0) ** (1 / len(per_layer)), rtol=1e-5)
    np.testing.assert_array_equal(concept_heatmap(store, "mass", 9, layers=[deep.layer]), per_layer[-1])
    both = np.stack([concept_heatmap(store, "mass", int(i)) for i in held])
    assert auroc(masks[held].reshape(-1), both.reshape(-1)) > 0.85
    with pytest.raises(ProbeDataError, match="no probe of 'calcification'"):
        concept_heatmap(store, "calcification", 9)
    # the mlflow run holds TCAV scores per class and timings were measured
    versions = probe_versions("mass", deep.layer, settings=workspace)
    assert versions[0]["run_id"] == deep.run_id and set(versions[0]["tcav"]) == {"normal", "lesion"}
    sens = cache.sensitivities(deep.layer)  # computed once by the retrain, reused here
    assert versions[0]["tcav"] == pytest.approx(sens.scores(deep.fit.probe.cav))
    assert set(versions[0]["tcav_local"]) == {"normal", "lesion"}
    # growing "mass" where the probe sees it raises the lesion logit of lesion patches
    assert versions[0]["tcav_local"]["lesion"] > 0.7, versions[0]["tcav_local"]
    assert versions[0]["store"] == "lesion" and versions[0]["n_annotations"] == 3
    assert set(deep.timings) == {"collect", "fit", "tcav", "log", "write"}


def test_retrain_of_every_layer_logs_each_run_before_storing_it(lesion, workspace):
    """retrain overlaps one layer's mlflow run and store write with the next layer's fit: every layer still gets a
    complete run under the one parent run of its session, and the store names that run with its weights."""
    from mlflow.tracking import MlflowClient

    from explain.probes import FeatureCache, ProbeAnnotations, retrain

    store, masks = lesion.store, lesion.masks
    cache = FeatureCache(store, model=lesion.model, tcav_per_class=16)
    ann = ProbeAnnotations("circumscribed_margin", regions=[(i, masks[i]) for i in (1, 3)], marks=[(8, False)])
    results = retrain(store, ann, settings=workspace, session="carol", layers=lesion.layers, cache=cache)
    assert [r.layer for r in results] == lesion.layers
    client = MlflowClient(tracking_uri=workspace.tracking_uri)
    parent = session_run("carol", settings=workspace)
    try:
        for r in results:
            run = client.get_run(r.run_id)
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
            assert run.data.tags["conceptlens.layer"] == r.layer and run.data.tags["conceptlens.n_annotations"] == "3"
            assert run.data.params["C"] == str(r.fit.params["C"]) and run.data.params["layer"] == r.layer
            assert run.data.metrics["n_positive"] == r.fit.n_positive
            assert run.data.metrics["auroc"] == pytest.approx(r.fit.metrics["auroc"], nan_ok=True)
            assert {"tcav/lesion", "tcav/local/lesion"} <= set(run.data.metrics)
            stored = store.probe("circumscribed_margin", r.layer)
            assert stored.run_id == r.run_id == r.fit.probe.run_id and stored.attrs["session"] == "carol"
            np.testing.assert_allclose(stored.scores, r.scores)
            loaded = load_probe(r.run_id, settings=workspace)
            np.testing.assert_array_equal(loaded.weights, r.fit.probe.weights)
            assert cache.last[("circumscribed_margin", r.layer)].run_id == r.run_id
    finally:
        for layer in lesion.layers:
            store.delete_probe("circumscribed_margin", layer)


def test_one_class_retrain_changes_nothing(lesion, workspace):
    from explain.probes import ProbeAnnotations, retrain

    store = lesion.store
    before = store.probes()
    with pytest.raises(ProbeDataError, match="only positives"):
        retrain(store, ProbeAnnotations("calcification", marks=[(1, True), (3, True)]), settings=workspace,
                session="alice")
    with pytest.raises(ProbeDataError, match="only negatives"):
        retrain(store, ProbeAnnotations("calcification", marks=[(0, False)]), settings=workspace, session="alice")
    with pytest.raises(ProbeDataError, match="only positives"):  # also with regions covering the whole patch
        retrain(store, ProbeAnnotations("calcification", regions=[(1, np.ones((32, 32), bool))]),
                settings=workspace, session="alice")
    assert store.probes() == before
    assert _n_probe_runs(workspace) == 0


def test_bad_annotations_name_what_is_wrong(lesion, workspace):
    from explain.errors import UnknownImageError, UnknownLayerError, UnknownUnitError
    from explain.probes import ProbeAnnotations, collect_examples, retrain

    store, layer = lesion.store, lesion.layers[-1]
    with pytest.raises(UnknownImageError, match="img-999"):
        collect_examples(store, layer, ProbeAnnotations("mass", regions=[("img-999", lesion.masks[1])]))
    with pytest.raises(UnknownImageError, match="4000"):
        collect_examples(store, layer, ProbeAnnotations("mass", marks=[(4000, True)]))
    with pytest.raises(ProbeDataError, match=r"img-001.*\(8, 8\)"):
        collect_examples(store, layer, ProbeAnnotations("mass", regions=[("img-001", np.ones((8, 8), bool))]))
    with pytest.raises(UnknownUnitError, match="999"):
        collect_examples(store, layer, ProbeAnnotations("mass", units={layer: [999]}))
    with pytest.raises(UnknownLayerError, match="layer9"):
        retrain(store, ProbeAnnotations("mass", units={"layer9": [1]}), settings=workspace, session="s")


def test_versions_and_rollback(lesion, workspace):
    from explain.probes import FeatureCache, ProbeAnnotations, heatmaps_for_store, load_probe, retrain, rollback

    store, masks, layer = lesion.store, lesion.masks, lesion.layers[-1]
    cache = FeatureCache(store)
    first = retrain(store, ProbeAnnotations("spiculated_margin", regions=[(1, masks[1])], marks=[(2, False)]),
                    settings=workspace, session="bob", layers=[layer], cache=cache)[0]
    second = retrain(store, ProbeAnnotations("spiculated_margin", regions=[(1, masks[1]), (9, masks[9])],
                                             marks=[(2, False), (4, False)]),
                     settings=workspace, session="bob", layers=[layer], cache=cache)[0]
    versions = probe_versions("spiculated_margin", layer, settings=workspace)
    assert [v["run_id"] for v in versions] == [second.run_id, first.run_id]
    # no model in the cache: no TCAV, and the run says why
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=workspace.tracking_uri).get_run(first.run_id).data.tags
    assert tags["conceptlens.tcav"] == "not computed: no model given" and versions[0]["tcav"] == {}
    assert [v["n_annotations"] for v in versions] == [4, 2]
    assert store.probe("spiculated_margin", layer).run_id == second.run_id

    rollback(store, "spiculated_margin", layer, first.run_id, settings=workspace)
    stored = store.probe("spiculated_margin", layer)
    assert stored.run_id == first.run_id and stored.attrs["rolled_back_from"] == second.run_id
    scores, maps = heatmaps_for_store(store, load_probe(first.run_id, settings=workspace))
    np.testing.assert_array_equal(stored.scores, scores)
    np.testing.assert_array_equal(stored.maps, maps.astype(np.float32))
    np.testing.assert_allclose(stored.scores, first.scores)
    with pytest.raises(ProbeDataError, match="not spiculated_margin@features.6"):
        rollback(store, "spiculated_margin", lesion.layers[0], first.run_id, settings=workspace)


def test_probe_from_labeled_units(lesion):
    from explain.probes import ProbeAnnotations, collect_examples

    store, layer = lesion.store, lesion.layers[-1]
    # the unit whose top images are most often lesion patches stands in for a unit labeled "mass"
    top, _ = store.topk(layer)
    unit = int(np.argmax(store.labels()[top].mean(axis=1)))
    ex = collect_examples(store, layer, ProbeAnnotations("mass", units={layer: [unit]}),
                          config=ProbeConfig(background=0))
    assert ex.n_positive > 0 and ex.n_negative > 0 and ex.counts == {"units": 1}
    assert set(np.unique(ex.groups)) <= set(top[unit].tolist())
    # every positive has the labeled unit at or above its threshold, no negative does
    thr = store.thresholds(layer)[unit]
    assert (ex.vectors[ex.labels == 1, unit] >= thr).all() and (ex.vectors[ex.labels == 0, unit] < thr).all()
    fit = fit_probe(ex, concept="mass", layer=layer)
    assert fit.probe.weights[unit] > 0


def test_image_figures_by_hand():
    from explain.probe_eval import image_figures

    shows = np.array([True, True, True, False, False])
    got = image_figures(shows, np.array([0.9, 0.5, 0.2, 0.6, 0.1]))
    # 0.5 counts as present; the pairs (shown, not shown) ranked right: 0.9>0.6, 0.9>0.1, 0.5>0.1, 0.2>0.1 → 4 of 6
    assert got == pytest.approx({"auroc": 4 / 6, "sensitivity": 2 / 3, "specificity": 1 / 2, "threshold": 0.5})
    # from another threshold: 0.2 and 0.1 are the only scores below 0.3
    assert image_figures(shows, np.array([0.9, 0.5, 0.2, 0.6, 0.1]), threshold=0.3) == pytest.approx(
        {"auroc": 4 / 6, "sensitivity": 2 / 3, "specificity": 1 / 2, "threshold": 0.3})
    assert image_figures(shows, np.array([0.9, 0.5, 0.2, 0.6, 0.1]), threshold=0.15)["sensitivity"] == 1.0
    none = image_figures(np.array([True, True]), np.array([0.7, 0.2]))
    assert np.isnan(none["auroc"]) and np.isnan(none["specificity"]) and none["sensitivity"] == 0.5
    with pytest.raises(ProbeDataError, match="one score per image"):
        image_figures(shows, np.zeros(4))


def test_ground_truth_curve_on_held_out_patches(lesion):
    from explain.probe_eval import eval_images, pixel_auroc, probe_curve

    store, layer = lesion.store, lesion.layers[-1]
    masks = {i: m for i, m in enumerate(lesion.masks) if m.any()}
    draw = np.arange(0, 30)
    evaluate = eval_images(np.arange(30, store.n_images), masks, max_eval=40, seed=1)
    assert len(evaluate) == 40 and sum(int(i) in masks for i in evaluate) == 20
    curve = probe_curve(store, "mass", layer, masks, draw=draw, evaluate=evaluate, ks=(1, 3, 5))
    assert [p["k"] for p in curve] == [1, 3, 5]
    assert [store.index_of(i) for i in curve[-1]["images"]] == [i for i in draw if i in masks][:5]  # in order
    assert curve[0]["images"] == curve[-1]["images"][:1]  # each k adds drawings to the previous ones
    assert curve[-1]["pixel_auroc"] > 0.85
    # the number is the plain pixel AUROC of the k=5 probe's heatmaps
    from explain.probes import ProbeAnnotations, collect_examples

    idx = [store.index_of(i) for i in curve[-1]["images"]]
    ex = collect_examples(store, layer, ProbeAnnotations("mass", regions=[(i, masks[i]) for i in idx]),
                          background_pool=draw)  # background from the drawing candidates, never the evaluated
    fit = fit_probe(ex, concept="mass", layer=layer)
    assert pixel_auroc(fit.probe, store, evaluate, masks) == pytest.approx(curve[-1]["pixel_auroc"])
    # several layers: a probe on each from the same drawings, their maps combined
    both = probe_curve(store, "mass", lesion.layers, masks, draw=draw, evaluate=evaluate, ks=(5,))
    fits = [fit_probe(collect_examples(store, name, ProbeAnnotations("mass", regions=[(i, masks[i]) for i in idx]),
                                       background_pool=draw), concept="mass", layer=name) for name in lesion.layers]
    assert both[0]["pixel_auroc"] == pytest.approx(pixel_auroc([f.probe for f in fits], store, evaluate, masks))
    assert both[0]["pixel_auroc"] > 0.85 and both[0]["images"] == curve[-1]["images"]
    # and each layer's own figure from the same fits
    alone = {f.probe.layer: pixel_auroc(f.probe, store, evaluate, masks) for f in fits}
    assert both[0]["layers"] == pytest.approx(alone)
    assert both[0]["layers"][layer] == pytest.approx(curve[-1]["pixel_auroc"])
    # image level: each patch scored as the report scores it, against whether it shows the concept
    from explain.probe_eval import image_figures
    from explain.probes import FeatureCache, combine_heatmaps

    cache = FeatureCache(store)
    shows = np.array([int(i) in masks for i in evaluate])
    stored = {f.probe.layer: f.probe.score(f.probe.heatmap(cache.image_maps(f.probe.layer, evaluate))) for f in fits}
    combined = combine_heatmaps([f.probe.heatmap(cache.image_maps(f.probe.layer, evaluate), size=(32, 32))
                                 for f in fits])
    assert both[0]["image"] == pytest.approx(image_figures(shows, combined.reshape(len(evaluate), -1).max(axis=1)))
    assert both[0]["image_layers"] == {name: pytest.approx(image_figures(shows, v)) for name, v in stored.items()}
    assert both[0]["image_any"] == pytest.approx(image_figures(shows, np.max(list(stored.values()), axis=0)))
    assert curve[-1]["image"] == pytest.approx(both[0]["image_layers"][layer])  # one layer: its stored score
    assert both[0]["image"]["auroc"] > 0.8
    # calibrated on reference patches: the verdict's scores there, their best cut, applied to the evaluated ones
    from explain.verdict import presence_threshold

    reference = np.setdiff1d(np.arange(store.n_images), np.concatenate([evaluate, [int(i) for i in idx]]))
    cal = probe_curve(store, "mass", lesion.layers, masks, draw=draw, evaluate=evaluate, ks=(5,),
                      reference=reference)[0]
    ref = combine_heatmaps([f.probe.heatmap(cache.image_maps(f.probe.layer, reference), size=(32, 32))
                            for f in fits]).reshape(len(reference), -1).max(axis=1)
    t = presence_threshold(ref, np.array([int(i) in masks for i in reference]))
    assert t is not None and cal["image"] == both[0]["image"]
    assert cal["image_calibrated"] == pytest.approx(
        image_figures(shows, combined.reshape(len(evaluate), -1).max(axis=1), threshold=t))
    assert "image_calibrated" not in both[0]
    with pytest.raises(ProbeDataError, match="reference patches must not be evaluated"):
        probe_curve(store, "mass", layer, masks, draw=draw, evaluate=evaluate, ks=(1,), reference=evaluate[:3])
    with pytest.raises(ProbeDataError, match="must not be evaluated"):
        probe_curve(store, "mass", layer, masks, draw=draw, evaluate=[1, 40], ks=(1,))
    with pytest.raises(ProbeDataError, match="no patch to draw on"):
        probe_curve(store, "mass", layer, masks, draw=[0, 2, 4], evaluate=evaluate, ks=(1,))


def test_region_smaller_than_a_cell_still_gives_positives():
    maps = np.arange(2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2)  # (unit, y, x); cells of 4×4 px on an 8×8 patch
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # 4 px: a quarter of cell (0, 0)
    mask[0, 4] = True  # 1 px of cell (0, 1): 1/16 < 0.5 × 1/4 → border, left out
    ex = region_examples(maps, mask, image=0)
    assert ex.n_positive == 1 and ex.n_negative == 2
    np.testing.assert_array_equal(ex.vectors[ex.labels == 1], [[0, 4]])


def test_background_negatives(lesion):
    from explain.probes import ProbeAnnotations, background_examples, collect_examples

    store, masks, layer = lesion.store, lesion.masks, lesion.layers[-1]
    ann = ProbeAnnotations("mass", regions=[(1, masks[1]), (3, masks[3])])
    plain = collect_examples(store, layer, ann, config=ProbeConfig(background=0))
    cfg = ProbeConfig(background=50, background_images=10)
    ex = collect_examples(store, layer, ann, config=cfg, background_pool=np.arange(0, 40))
    assert len(ex) == len(plain) + 50 and ex.n_positive == plain.n_positive
    assert ex.counts == {"regions": 2, "background": 50} and ex.n_annotations == 2
    bg = ex.groups[len(plain):]
    assert set(bg.tolist()) <= set(range(40)) - {1, 3} and len(set(bg.tolist())) <= 10
    # the vectors are real positions of those images
    v, g = ex.vectors[len(plain)], int(bg[0])
    positions = np.moveaxis(store.maps(layer, g), 0, -1).reshape(-1, v.shape[0])
    assert np.isclose(positions, v, atol=1e-6).all(axis=1).any()
    again = background_examples(store, layer, np.setdiff1d(np.arange(40), [1, 3]), n=50, images=10)
    np.testing.assert_array_equal(again.vectors, ex.vectors[len(plain):])  # seeded: the same draw
    # background never rescues annotations of one class
    with pytest.raises(ProbeDataError, match="only positives"):
        collect_examples(store, layer, ProbeAnnotations("mass", marks=[(1, True)]), config=cfg)


def test_store_model_that_cannot_be_loaded_is_named(lesion, workspace):
    from mlflow.tracking import MlflowClient

    from explain.probes import ProbeAnnotations, retrain

    store, masks = lesion.store, lesion.masks
    res = retrain(store, ProbeAnnotations("architectural_distortion", regions=[(1, masks[1])]), settings=workspace,
                  session="alice", layers=[lesion.layers[-1]])  # a fresh cache with settings: tries the store's model
    tags = MlflowClient(tracking_uri=workspace.tracking_uri).get_run(res[0].run_id).data.tags
    assert tags["conceptlens.tcav"].startswith("not computed: model 'test' of the store could not be loaded")
    store.delete_probe("architectural_distortion", lesion.layers[-1])


def test_leave_one_drawing_out_pixel_auroc(lesion):
    from explain.probe_eval import drawing_cv_auroc

    store, masks = lesion.store, lesion.masks
    drawings = [(i, masks[i]) for i in (1, 3, 5, 7)]
    layer = lesion.layers[-1]
    value = drawing_cv_auroc(store, "mass", layer, drawings)
    assert value > 0.7  # well above chance: the masses are found on images the probe never saw
    # by hand: each drawing left out in turn, pixels of the left-out images pooled
    from explain.probes import ProbeAnnotations, collect_examples

    heat = []
    for j, (image, _) in enumerate(drawings):
        rest = ProbeAnnotations("mass", regions=[d for n, d in enumerate(drawings) if n != j])
        ex = collect_examples(store, layer, rest, background_pool=np.setdiff1d(np.arange(store.n_images), [image]))
        fit = fit_probe(ex, concept="mass", layer=layer)
        heat.append(fit.probe.heatmap(store.maps(layer, image), size=(32, 32)))
    truth = np.stack([m for _, m in drawings])
    assert value == pytest.approx(auroc(truth.reshape(-1), np.stack(heat).reshape(-1)))
    assert np.isnan(drawing_cv_auroc(store, "mass", layer, drawings[:1]))
