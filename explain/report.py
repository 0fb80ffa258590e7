"""Reports: why the model said what it said about one image, and what the model's units and probes stand for.

    >>> from explain.report import image_report, model_report
    >>> labels = {"features.13": {4: "mass", 17: "mass", 30: "calcification"}}   # layer → {unit: concept}
    >>> r = image_report(store, "img-3a", labels=labels, model=loaded, settings=settings)
    >>> r["prediction"], r["concepts"]["mass"]["present"], r["concepts"]["mass"]["contributions"]
    >>> m = model_report(store, labels=labels, settings=settings)
    >>> m["concepts"]["mass"]["units"], m["layers"]["features.13"]["unlabeled"], m["probes"]

Definitions (DESIGN.md §4):
- A labeled unit *fires* on an image when its max activation there (the layer's map grid) exceeds its dataset
  threshold (the Network-Dissection quantile, level 0.99 by default) — the same rule that makes probe examples
  from labeled units. Its *area* is the fraction of the patch covered by its unit mask (bilinear upsampling,
  thresholded; explain.dissection.mask_counts).
- A probe's evidence is its current stored score (max of its heatmap) and heatmap; it says *present* when the
  score is ≥ 0.5. A concept with probes on several of the reported layers also gets its map across them
  (`combined`: explain.probes.combine_heatmaps of their heatmaps at the patch size, as the app overlays it) and
  that map's max.
- The concept's probe verdict (`probe`: score, what it comes from, threshold, present) is that combined score
  where there is one, else the score of its probe on the deepest probed layer (explain.verdict); present from
  the concept's threshold on: the one given in `thresholds` (the app calibrates it on the images the dataset
  lists as showing the concept or not: explain.verdict.calibrate_presence), else 0.5. Not any probe's: the app
  retrains a concept's probe on every layer, and a shallow layer's map (32×32 cells of small receptive fields)
  has a cell above 0.5 on nearly every image. Measured against the demo's ground truth (the bench's
  probes/image/*: probes from 5 drawings, 400 held-out test patches per concept; 2026-11-29): "any probe"
  spared 0–5 % of the patches *without* the concept (specificity), the map across layers at 0.5 37–87 %,
  keeping 91–100 % of those with it (sensitivity); its image AUROC 0.88–0.99, within 0.02 of the deepest
  layer's. A calibrated threshold raises the worst specificity further (explain.verdict).
- A concept is present when one of its labeled units fires or its probe verdict says present.
- Contribution (needs the model): the change of the predicted class's logit when the concept is removed at one
  layer and the rest of the network is run again (explain.attribution): its labeled units zeroed, or, for a
  probe, every position's component along the CAV set to the probe's training mean. Positive = the concept
  pushed the model towards its prediction.
- Grad-CAM of the predicted class at the deepest layer (or `gradcam_layer`), upsampled to the patch.
Reports are plain dicts of numbers, strings and (for maps) numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .dissection import DEFAULT_LEVEL, mask_counts, patch_size, resolve_image
from .errors import UnknownLayerError, UnknownUnitError
from .probes import PRESENT

__all__ = ["image_report", "model_report", "units_by_concept"]


def units_by_concept(labels: Mapping[str, Mapping[int, str]], store) -> dict[str, dict[str, list[int]]]:
    """{layer: {unit: concept}} → {concept: {layer: [units]}}, checking layers and units against the store."""
    out: dict[str, dict[str, list[int]]] = {}
    for layer, per in (labels or {}).items():
        if layer not in store.layers:
            raise UnknownLayerError(layer, known=store.layers, where=str(store.url))
        n = store.layer_shape(layer)[0]
        for unit, concept in per.items():
            if not 0 <= int(unit) < n:
                raise UnknownUnitError(unit, where=f"layer {layer!r} ({n} units)")
            out.setdefault(concept, {}).setdefault(layer, []).append(int(unit))
    for per in out.values():
        for layer in per:
            per[layer].sort()
    return out


def _probe_list(store, probes) -> list[tuple[str, str]]:
    return list(store.probes()) if probes is None else [tuple(p) for p in probes]


def _probe_verdicts(store, report: dict, stored: Mapping[str, dict], i: int, size: tuple[int, int],
                    with_maps: bool, thresholds: Mapping[str, float]) -> None:
    """Each probed concept's verdict (module docstring) from its stored probes ({concept: {layer: probe}}): its map
    across layers (kept as `combined`), else its deepest probe's score, against its threshold."""
    from .probes import combine_heatmaps, upsample
    from .verdict import choose_verdict_probes

    for concept, probes in stored.items():
        e = report["concepts"][concept]
        chosen = choose_verdict_probes(probes, store.layers)
        if len(chosen) >= 2:
            heat = combine_heatmaps([upsample(p.maps[i], size) for p in chosen.values()])
            e["combined"] = {"layers": list(chosen), "score": float(heat.max()),
                             **({"heatmap": heat} if with_maps else {})}
            score, source = e["combined"]["score"], "all layers"
        else:
            (source, probe), = chosen.items()
            score = float(probe.scores[i])
        t = float(thresholds.get(concept, PRESENT))
        e["probe"] = {"score": float(score), "source": source, "threshold": t, "present": bool(score >= t)}
        e["present"] |= e["probe"]["present"]


def _cav_contributions(model, x, erase: Mapping[str, list[tuple[dict, str]]], settings, pred: int) -> None:
    """Each probe's contribution (its CAV direction erased), every layer's probes in one batched pass."""
    from .attribution import cav_contributions
    from .probes import load_probe

    if not erase:
        return
    loaded = {layer: [load_probe(run_id, settings=settings) for _e, run_id in items] for layer, items in erase.items()}
    deltas = cav_contributions(model.module, x, {layer: (np.stack([p.cav for p in probes]),
                                                         np.stack([p.mean for p in probes]))
                                                 for layer, probes in loaded.items()}, target=pred)
    for layer, items in erase.items():
        for (e, run_id), delta in zip(items, deltas[layer]):
            e["contributions"].append({"method": "erase CAV direction", "layer": layer, "run_id": run_id,
                                       "logit_change": float(delta)})


def image_report(store, image, *, labels: Mapping[str, Mapping[int, str]] | None = None,
                 probes: Sequence[tuple[str, str]] | None = None, model=None, settings=None,
                 level: float = DEFAULT_LEVEL, gradcam_layer: str | None = None,
                 with_maps: bool = True, thresholds: Mapping[str, float] | None = None) -> dict:
    """Prediction, concepts present with their evidence and contributions, and Grad-CAM for one image.

    image: id or index. labels: {layer: {unit: concept}}. probes: (concept, layer) pairs (default: every probe
    stored). model: a LoadedModel (training.load_model) for contributions and Grad-CAM — without it those keys are
    absent. settings: needed for probe contributions (the probe's weights come from its mlflow run).
    """
    i = resolve_image(store, image)
    size = patch_size(store)
    classes = list(store.classes)
    probs = np.asarray(store.probs()[i], np.float64)
    pred = int(probs.argmax())
    report = {
        "image": store.image_ids[i], "index": i,
        "label": classes[int(store.labels()[i])] if 0 <= int(store.labels()[i]) < len(classes) else None,
        "prediction": {"class": classes[pred], "probability": float(probs[pred]),
                       "probs": {c: float(p) for c, p in zip(classes, probs)}},
        "concepts": {},
    }
    by_concept = units_by_concept(labels or {}, store)
    x = None
    if model is not None:
        from training.transforms import preprocess

        x = preprocess(np.asarray(store.image(i))[None], model.transform)  # (1, 1, Y, X)
        model.module.eval()

    def entry(concept: str) -> dict:
        return report["concepts"].setdefault(concept, {"present": False, "units": [], "probes": [],
                                                       "contributions": []})

    for concept, per_layer in sorted(by_concept.items()):
        e = entry(concept)
        for layer, units in sorted(per_layer.items()):
            maps = store.maps(layer, i)[units]  # (labeled unit, y, x)
            thr = np.asarray(store.thresholds(layer, level), np.float32)[units]
            # one empty region: the area counts alone (mask_counts' regions=None path fails for 0 regions today)
            area, _ = mask_counts(maps, thr, np.zeros((1, *size), bool))
            peak = maps.reshape(len(units), -1).max(axis=1)
            for u, m, t, a in zip(units, peak, thr, area):
                fires = bool(m > t)
                e["units"].append({"layer": layer, "unit": u, "max": float(m), "threshold": float(t),
                                   "fires": fires, "area": float(a) / (size[0] * size[1])})
                e["present"] |= fires
            if x is not None:
                from .attribution import units_contribution

                delta = float(units_contribution(model.module, x, layer, units, target=pred)[0])
                e["contributions"].append({"method": "zero labeled units", "layer": layer, "units": units,
                                           "logit_change": delta})

    erase: dict[str, list[tuple[dict, str]]] = {}  # layer → [(concept entry, probe run id)]: contributions below
    probed: dict[str, dict] = {}  # concept → {layer: stored probe}: the verdicts below
    for concept, layer in _probe_list(store, probes):
        from .probes import upsample

        stored = probed.setdefault(concept, {})[layer] = store.probe(concept, layer)
        score = float(stored.scores[i])
        e = entry(concept)
        item = {"layer": layer, "score": score, "present": score >= PRESENT, "run_id": stored.run_id}
        if with_maps and stored.maps is not None:
            item["heatmap"] = upsample(stored.maps[i], size)  # float32 (Y, X)
        e["probes"].append(item)
        if x is not None and settings is not None and stored.run_id:
            erase.setdefault(layer, []).append((e, stored.run_id))
    _cav_contributions(model, x, erase, settings, pred)

    _probe_verdicts(store, report, probed, i, size, with_maps, thresholds or {})

    if x is not None:
        from .attribution import grad_cam

        layer = gradcam_layer or store.layers[-1]
        report["gradcam"] = {"layer": layer, "class": classes[pred],
                             "map": grad_cam(model.module, x, layer, target=pred, size=size)[0]}
    return report


def model_report(store, *, labels: Mapping[str, Mapping[int, str]] | None = None, settings=None,
                 level: float = DEFAULT_LEVEL, thresholds: Mapping[str, float] | None = None) -> dict:
    """Units per concept, unlabeled units per layer, concept coverage, and the quality of every stored probe.

    coverage: the fraction of images on which at least one of the concept's labeled units fires.
    probes: the current stored version of each probe with its mlflow metrics (held-out AUROC / AP, examples,
    annotations, TCAV) when `settings` is given; its "images_present" is the share of images its own score calls
    present (≥ 0.5). Each probed concept's "probe": the image report's verdict over the store — the layers it rests
    on, its threshold (from `thresholds`, as image_report, else 0.5) and the share of images it calls present.
    """
    by_concept = units_by_concept(labels or {}, store)
    probs, y = np.asarray(store.probs()), np.asarray(store.labels())
    report = {
        "store": str(store.url), "model": dict(store.attrs.get("model") or {}), "n_images": store.n_images,
        "accuracy": float((probs.argmax(axis=1) == y).mean()) if len(y) else float("nan"),
        "layers": {}, "concepts": {}, "probes": [],
    }
    fires_cache: dict[str, np.ndarray] = {}

    def fires(layer: str) -> np.ndarray:  # bool (image, unit)
        if layer not in fires_cache:
            fires_cache[layer] = store.pooled(layer, "max") > np.asarray(store.thresholds(layer, level))[None]
        return fires_cache[layer]

    for layer in store.layers:
        n = store.layer_shape(layer)[0]
        labeled = sorted(int(u) for u in (labels or {}).get(layer, {}))
        per = {}
        for concept, layers in by_concept.items():
            if layer in layers:
                per[concept] = layers[layer]
        report["layers"][layer] = {"units": n, "labeled": len(labeled), "unlabeled": n - len(labeled),
                                   "unlabeled_units": sorted(set(range(n)) - set(labeled)),
                                   "units_per_concept": {c: len(u) for c, u in sorted(per.items())}}
    for concept, layers in sorted(by_concept.items()):
        hit = np.zeros(store.n_images, bool)
        for layer, units in layers.items():
            hit |= fires(layer)[:, units].any(axis=1)
        report["concepts"][concept] = {"units": sum(len(u) for u in layers.values()),
                                       "layers": {l: u for l, u in sorted(layers.items())},
                                       "coverage": float(hit.mean())}
    for concept, layer in store.probes():
        stored = store.probe(concept, layer)
        item = {"concept": concept, "layer": layer, "run_id": stored.run_id,
                "images_present": float(np.mean(stored.scores >= PRESENT))}
        if settings is not None and stored.run_id:
            from .probes import probe_versions

            match = [v for v in probe_versions(concept, layer, settings=settings) if v["run_id"] == stored.run_id]
            if match:
                v = match[0]
                item.update({k: v[k] for k in ("auroc", "ap", "cv_auroc", "n_positive", "n_negative",
                                               "n_annotations", "tcav")})
        report["probes"].append(item)
        report["concepts"].setdefault(concept, {"units": 0, "layers": {}, "coverage": 0.0})
    from .verdict import verdict_probes, verdict_scores

    for concept in sorted({c for c, _ in store.probes()}):
        t = float((thresholds or {}).get(concept, PRESENT))
        chosen = verdict_probes(store, concept)
        scores = verdict_scores(store, concept, np.arange(store.n_images), chosen=chosen)
        report["concepts"][concept]["probe"] = {"layers": list(chosen), "threshold": t,
                                                "images_present": float(np.mean(scores >= t))}
    return report
