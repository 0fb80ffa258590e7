"""Per-image and model reports on a real-data store, with contributions checked against the network's own
arithmetic (after the last block comes global average pooling and one linear layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain.dissection import unit_masks
from explain.errors import UnknownLayerError, UnknownUnitError
from explain.report import image_report, model_report, units_by_concept

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lesion(tmp_path_factory, real_dicoms):
    from helpers_probes import build_lesion_store

    return build_lesion_store(tmp_path_factory.mktemp("report") / "lesion.zarr", real_dicoms[0])


def _lesion_units(store, layer, n=2):
    top, _ = store.topk(layer)
    return [int(u) for u in np.argsort(-store.labels()[top].mean(axis=1), kind="stable")[:n]]


def test_image_report_evidence_and_contributions(lesion, workspace):
    from explain.probes import ProbeAnnotations, load_probe, retrain

    store, net = lesion.store, lesion.net
    deep = lesion.layers[-1]
    units = _lesion_units(store, deep)
    labels = {deep: {units[0]: "mass", units[1]: "mass"}, lesion.layers[0]: {0: "calcification"}}
    retrain(store, ProbeAnnotations("mass", regions=[(i, lesion.masks[i]) for i in (1, 3, 5)]), settings=workspace,
            session="report", layers=[deep])
    i = int(np.flatnonzero(store.labels() == 1)[10])
    r = image_report(store, store.image_ids[i], labels=labels, model=lesion.model, settings=workspace)

    probs = store.probs()[i]
    assert r["image"] == store.image_ids[i] and r["index"] == i and r["label"] == "lesion"
    assert r["prediction"]["class"] == ["normal", "lesion"][int(probs.argmax())]
    assert r["prediction"]["probability"] == pytest.approx(float(probs.max()))
    mass = r["concepts"]["mass"]
    maps = store.maps(deep, i)
    thr = store.thresholds(deep)
    for item in mass["units"]:
        u = item["unit"]
        assert item["max"] == pytest.approx(float(maps[u].max()))
        assert item["fires"] == bool(maps[u].max() > thr[u])
        assert item["area"] == pytest.approx(unit_masks(maps, thr, (32, 32))[u].mean())
    assert mass["probe"] == {"score": mass["probes"][0]["score"], "source": deep, "threshold": 0.5,
                             "present": mass["probes"][0]["score"] >= 0.5}  # one probe: its own verdict
    assert mass["present"] == (any(it["fires"] for it in mass["units"]) or mass["probes"][0]["score"] >= 0.5)
    probe = store.probe("mass", deep)
    assert mass["probes"][0]["score"] == pytest.approx(float(probe.scores[i]))
    assert mass["probes"][0]["heatmap"].shape == (32, 32)

    # contributions: after the last block, logit_c = W[c] · mean_{y,x}(A) + b[c], so removing the concept changes the
    # predicted logit by W[c] · (change of the pooled mean) — computed here from the network's weights by hand
    pred = int(probs.argmax())
    w = net.classifier[-1].weight.detach().numpy()[pred]  # (unit,)
    with torch.no_grad():
        from explain.hooks import Trace
        from training.transforms import preprocess

        with Trace(net, deep) as t:
            net(preprocess(store.image(i)[None], lesion.model.transform))
        a = t.output[0].numpy()  # (unit, y, x)
    zero = [c for c in mass["contributions"] if c["method"] == "zero labeled units"][0]
    assert zero["layer"] == deep and zero["units"] == sorted(units)
    assert zero["logit_change"] == pytest.approx(float(w[units] @ a[units].mean(axis=(1, 2))), rel=1e-4, abs=1e-5)
    assert zero["logit_change"] > 0.1  # the lesion units push a lesion patch towards "lesion"
    erase = [c for c in mass["contributions"] if c["method"] == "erase CAV direction"][0]
    p = load_probe(probe.run_id, settings=workspace)
    v = p.cav / np.linalg.norm(p.cav)
    proj = np.einsum("uyx,u->yx", a - p.mean[:, None, None], v).mean()  # mean over positions of (a − μ)·v
    assert erase["logit_change"] == pytest.approx(float(w @ v) * float(proj), rel=1e-3, abs=1e-4)
    # two probes on one layer and one on a shallower layer: all erased in one batched pass, each as if alone
    from explain.attribution import cav_contribution

    shallow = store.layers[0]
    assert shallow != deep
    others = retrain(store, ProbeAnnotations("calcification", regions=[(i, lesion.masks[i]) for i in (7, 9)]),
                     settings=workspace, session="report", layers=[shallow, deep])
    both = image_report(store, i, labels=labels, model=lesion.model, settings=workspace, with_maps=False)
    x = preprocess(store.image(i)[None], lesion.model.transform)
    expected = [("mass", deep, probe.run_id)] + [("calcification", o.layer, o.run_id) for o in others]
    for concept, layer, run_id in expected:
        got = [c for c in both["concepts"][concept]["contributions"]
               if c["method"] == "erase CAV direction" and c["layer"] == layer]
        q = load_probe(run_id, settings=workspace)
        assert [c["run_id"] for c in got] == [run_id]
        assert got[0]["logit_change"] == pytest.approx(float(cav_contribution(net, x, layer, q.cav, q.mean,
                                                                             target=pred)[0]), abs=1e-5)
    for o in others:
        store.delete_probe("calcification", o.layer)

    cam = r["gradcam"]
    assert cam["layer"] == deep and cam["map"].shape == (32, 32) and cam["map"].min() >= 0
    # without the model: evidence only
    plain = image_report(store, i, labels=labels, with_maps=False)
    assert "gradcam" not in plain and plain["concepts"]["mass"]["contributions"] == []
    assert "heatmap" not in plain["concepts"]["mass"]["probes"][0]
    assert plain["concepts"]["calcification"]["units"][0]["layer"] == lesion.layers[0]
    assert "combined" not in mass  # one probed layer: nothing to combine

    # probes on two layers: the concept's map across them, as the app overlays it
    from explain.probes import concept_heatmap

    retrain(store, ProbeAnnotations("mass", regions=[(i, lesion.masks[i]) for i in (1, 3, 5)]), settings=workspace,
            session="report", layers=[lesion.layers[0]])
    both = image_report(store, i, labels=labels)["concepts"]["mass"]
    assert sorted(p["layer"] for p in both["probes"]) == sorted([lesion.layers[0], deep])
    combined = concept_heatmap(store, "mass", i, size=(32, 32))
    np.testing.assert_allclose(both["combined"]["heatmap"], combined, rtol=1e-6)
    assert both["combined"]["layers"] == [lesion.layers[0], deep]
    assert both["combined"]["score"] == pytest.approx(float(combined.max()))
    assert both["combined"]["score"] <= max(p["score"] for p in both["probes"]) + 1e-6
    assert "heatmap" not in image_report(store, i, labels=labels, with_maps=False)["concepts"]["mass"]["combined"]
    # the concept's verdict is its map across layers, not any one probe's: over every image (no labeled units),
    # present exactly when the combined score reaches 0.5, and some images on which a probe alone said present
    # are not
    overruled = 0
    for j in range(store.n_images):
        e = image_report(store, j, with_maps=False)["concepts"]["mass"]
        assert e["probe"]["source"] == "all layers" and e["probe"]["score"] == e["combined"]["score"]
        assert e["present"] == e["probe"]["present"] == (e["combined"]["score"] >= 0.5)
        overruled += any(p["present"] for p in e["probes"]) and not e["present"]
    assert overruled > 0
    store.delete_probe("mass", lesion.layers[0])


def test_model_report(lesion, workspace):
    from explain.probes import ProbeAnnotations, retrain

    store = lesion.store
    deep = lesion.layers[-1]
    units = _lesion_units(store, deep, 3)
    labels = {deep: {units[0]: "mass", units[1]: "mass", units[2]: "spiculated_margin"}}
    res = retrain(store, ProbeAnnotations("circumscribed_margin", regions=[(1, lesion.masks[1]), (3, lesion.masks[3])],
                                          marks=[(0, False), (2, False)]),
                  settings=workspace, session="report", layers=[deep])
    m = model_report(store, labels=labels, settings=workspace)
    n = store.layer_shape(deep)[0]
    assert m["layers"][deep]["units"] == n and m["layers"][deep]["labeled"] == 3
    assert m["layers"][deep]["unlabeled"] == n - 3 and units[0] not in m["layers"][deep]["unlabeled_units"]
    assert m["layers"][deep]["units_per_concept"] == {"mass": 2, "spiculated_margin": 1}
    assert m["layers"][lesion.layers[0]]["labeled"] == 0
    fires = store.pooled(deep, "max")[:, sorted(units[:2])] > store.thresholds(deep)[sorted(units[:2])]
    assert m["concepts"]["mass"]["coverage"] == pytest.approx(fires.any(axis=1).mean())
    assert m["concepts"]["mass"]["units"] == 2 and m["concepts"]["mass"]["layers"] == {deep: sorted(units[:2])}
    assert m["accuracy"] == pytest.approx(float((store.probs().argmax(1) == store.labels()).mean()))
    item = [p for p in m["probes"] if p["concept"] == "circumscribed_margin"][0]
    assert item["run_id"] == res[0].run_id and item["n_annotations"] == 4
    assert item["auroc"] == pytest.approx(res[0].fit.metrics["auroc"], nan_ok=True)
    # each probed concept's verdict over the store, as the image report gives it image by image
    scores = store.probe("circumscribed_margin", deep).scores
    assert m["concepts"]["circumscribed_margin"]["probe"] == {
        "layers": [deep], "threshold": 0.5, "images_present": pytest.approx(float(np.mean(scores >= 0.5)))}
    strict = model_report(store, settings=workspace, thresholds={"circumscribed_margin": 0.8})
    assert strict["concepts"]["circumscribed_margin"]["probe"]["images_present"] == pytest.approx(
        float(np.mean(scores >= 0.8)))
    assert np.mean(scores >= 0.8) != np.mean(scores >= 0.5)


def test_report_errors(lesion):
    store = lesion.store
    with pytest.raises(UnknownLayerError, match="layer9"):
        units_by_concept({"layer9": {0: "mass"}}, store)
    with pytest.raises(UnknownUnitError, match="500"):
        image_report(store, 0, labels={lesion.layers[0]: {500: "mass"}})
    from explain.errors import UnknownImageError

    with pytest.raises(UnknownImageError, match="img-xyz"):
        image_report(store, "img-xyz")


def test_presence_threshold_by_hand():
    from explain.errors import ProbeDataError
    from explain.verdict import presence_threshold

    shows = np.array([True, True, True, True, False, False, False, False])
    scores = np.array([0.9, 0.8, 0.35, 0.3, 0.6, 0.2, 0.1, 0.05])
    # from 0.25 (halfway between 0.3 and 0.2) every patch with the concept and 3 of 4 without: J = 1.75, the best
    assert presence_threshold(scores, shows, min_each=1) == pytest.approx(0.25)
    assert presence_threshold(np.array([0.9, 0.1]), np.array([True, False]), min_each=1) == pytest.approx(0.5)
    # two cuts equally good (0.25 and 0.8): the one nearer 0.5
    tie = presence_threshold(np.array([0.9, 0.7, 0.4, 0.1]), np.array([True, False, True, False]), min_each=1)
    assert tie == pytest.approx(0.25)
    assert presence_threshold(scores, shows) is None  # fewer than 10 of a kind: nothing to calibrate on
    with pytest.raises(ProbeDataError, match="one score per image"):
        presence_threshold(scores[:3], shows)
    with pytest.raises(ProbeDataError, match="finite"):
        presence_threshold(np.where(shows, np.nan, 0.1), shows, min_each=1)


def test_verdict_scores_and_calibrated_threshold(lesion, workspace):
    from explain.errors import ProbeDataError
    from explain.probes import ProbeAnnotations, retrain
    from explain.verdict import calibrate_presence, presence_threshold, verdict_layers, verdict_scores

    store = lesion.store
    shallow, deep = lesion.layers[0], lesion.layers[-1]
    retrain(store, ProbeAnnotations("mass", regions=[(i, lesion.masks[i]) for i in (1, 3, 5)]), settings=workspace,
            session="verdict", layers=[shallow, deep])
    everything = np.arange(store.n_images)
    scores = verdict_scores(store, "mass", everything)
    assert verdict_layers(store, "mass") == [shallow, deep]
    reports = [image_report(store, j, with_maps=False)["concepts"]["mass"]["probe"] for j in everything]
    np.testing.assert_allclose(scores, [r["score"] for r in reports], rtol=1e-6)
    assert all(r["threshold"] == 0.5 and r["present"] == (r["score"] >= 0.5) for r in reports)
    # calibrated on every image of the store: the best cut of exactly those scores
    shows = np.flatnonzero([m.any() for m in lesion.masks])
    truth = np.isin(everything, shows)
    cal = calibrate_presence(store, "mass", shows, max_images=store.n_images)
    assert cal["threshold"] == pytest.approx(presence_threshold(scores, truth))
    assert (cal["n_with"], cal["n_without"], cal["layers"]) == (truth.sum(), (~truth).sum(), [shallow, deep])
    said = scores >= cal["threshold"]
    assert cal["sensitivity"] == pytest.approx(said[truth].mean())
    assert cal["specificity"] == pytest.approx((~said[~truth]).mean())
    at_half = (scores[truth] >= 0.5).mean() + (scores[~truth] < 0.5).mean()
    assert cal["sensitivity"] + cal["specificity"] >= at_half
    # the report with that threshold: present from it on, the images between it and 0.5 change their verdict
    t = cal["threshold"]
    moved = 0
    for j, before in zip(everything, reports):
        after = image_report(store, j, with_maps=False, thresholds={"mass": t})["concepts"]["mass"]
        assert after["probe"]["threshold"] == t and after["probe"]["present"] == (after["probe"]["score"] >= t)
        assert after["present"] == after["probe"]["present"]  # no labeled units here
        moved += after["probe"]["present"] != before["present"]
    assert moved == ((scores >= t) != (scores >= 0.5)).sum()
    # a sample of the reference images: half of them with the concept, the same sample every time
    small = calibrate_presence(store, "mass", shows, max_images=24)
    assert (small["n_with"], small["n_without"]) == (12, 12)
    assert small == calibrate_presence(store, "mass", shows, max_images=24)
    assert calibrate_presence(store, "mass", shows, reference=everything[:40]) is not None
    assert calibrate_presence(store, "mass", shows[:9]) is None  # too few images known to show it
    # one layer with a probe: its stored score, as the report's verdict
    store.delete_probe("mass", shallow)
    np.testing.assert_allclose(verdict_scores(store, "mass", everything), store.probe("mass", deep).scores)
    with pytest.raises(ProbeDataError, match="no probe of 'spiculated_margin'"):
        verdict_scores(store, "spiculated_margin", everything)
    with pytest.raises(ProbeDataError, match="image indices"):
        verdict_scores(store, "mass", [0, store.n_images])
