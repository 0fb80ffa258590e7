"""Unit labels against ground truth on the demo dataset (issue 5, "Measured against ground truth", parts 1–3).

    >>> from tests.benchmarks.bench_groundtruth import run
    >>> run(load_settings())    # [{"name": "groundtruth/mass/precision@5", ...}, ...]

Needs the demo workspace (`make extract`: the demo store and manifest). Steps (explain.groundtruth):
dataset-level IoU of every unit with every ground-truth concept over the train and val patches; ground-truth
detectors (IoU > 0.04 with their best concept); a simulated reviewer drawing the exact ground-truth region on k test
patches per inserted concept (k = 1 … 10) with the published labeling rule after each drawing; precision and recall
of the labeled units against the detectors. Four labeling rules run on the same drawings: the published rule (the
app's default; figures `groundtruth/<concept>/…`) and the alternatives of explain.labelrules: CumulativeRule
(cumulative IoU over the drawings of each concept, threshold tuned on train/val drawings; `groundtruth/cumulative/…`),
DatasetRule (the dataset-level IoU estimated from the drawings, the unit masks of every store image and the
manifest's list of what each patch shows, thresholded at the detector criterion 0.04; `groundtruth/dataset/…`) and
ProbeAssistedRule (the same estimate carried over by probes fitted from the drawings; `groundtruth/assisted/…`);
these two leave a unit unlabeled when it matches a film label, background, skin or pectoral muscle (what the app
segments itself; explain.groundtruth.segmented_ious) better than the drawn concept.
A second reviewer draws the same first patch of each concept and then the patches the app suggests
(explain.labelrules.next_drawings): `groundtruth/suggested/…`, every rule, the dissection layer only.
Goals (at k = 5) apply to the store's deepest layer, the dissection layer, for every rule; the other layers are
reported without goals. The whole report is logged as an mlflow run in experiment
"conceptlens-groundtruth" (its id is in the notes).
"""

from __future__ import annotations

GOAL_K = 5
HAIR = 0.02  # IoU: a detector (or a near-detector) within this of changing status is listed as decided by a hair


def _value(v):
    return "n/a" if v is None else v


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _curve(rows) -> str:
    return " ".join(f"k{r['k']}:{_fmt(r['precision'])}/{_fmt(r['recall'])}" for r in rows)


def run(settings) -> list[dict]:
    import numpy as np

    from explain.groundtruth import RULES, GroundTruthConfig, detector_margins, evaluate_ground_truth, log_ground_truth
    from store.activations import open_store, store_exists

    url = settings.store_url("demo")
    manifest = settings.manifest_path("demo")
    if not store_exists(url) or not manifest.is_file():
        return [{"name": "groundtruth/demo_store", "value": "missing", "unit": "", "goal": "present", "ok": False,
                 "note": f"demo store {url} or manifest {manifest} missing: run `make extract` first"}]
    store = open_store(url)
    config = GroundTruthConfig()
    report = evaluate_ground_truth(settings, store=store, data="demo", config=config)
    run_id = log_ground_truth(report, settings, store_attrs=store.attrs, run_name="bench")
    head = report.layers[-1]
    figures = []
    measured = [(layer, "random") for layer in report.layers] + [(head, "suggested")]
    for layer, reviewer in measured:
        goals = layer == head
        for c, rule in [(c, rule) for rule in RULES for c in report.config.concepts]:
            det = report.detectors[layer].get(c, [])
            row = report.at(layer, c, GOAL_K, rule, reviewer) or {"precision": None, "recall": None, "labeled": 0,
                                                                   "hits": 0}
            rows = report.rows(layer, c, rule, reviewer)
            who = ("the reviewer follows the app's suggested patches after a first one at random"
                   if reviewer == "suggested" else "random patches")
            note = (f"rule {rule}; layer {layer}; {len(det)} detectors {det[:12]}; drawn on {report.available[c]} "
                    f"eligible test patches ({who}); P/R by k: {_curve(rows)}; mlflow run {run_id}")
            root = "groundtruth/suggested" if reviewer == "suggested" else "groundtruth"
            base = root if rule == "published" else f"{root}/{rule}"
            prefix = f"{base}/{c}" if goals else f"{base}/{layer}/{c}"
            p, r = row["precision"], row["recall"]
            k_goal = report.k_to_goal(layer, c, rule, reviewer)
            if rule == "published" and reviewer == "random":
                figures.append({"name": f"{prefix}/detectors", "value": len(det), "unit": "units",
                                "goal": "> 0" if goals else None, "ok": (len(det) > 0) if goals else None,
                                "note": note})
            figures += [
                {"name": f"{prefix}/precision@{GOAL_K}", "value": _value(p), "unit": "",
                 "goal": ">= 0.8" if goals else None, "ok": (p is not None and p >= 0.8) if goals else None,
                 "note": note},
                {"name": f"{prefix}/recall@{GOAL_K}", "value": _value(r), "unit": "",
                 "goal": ">= 0.8" if goals else None, "ok": (r is not None and r >= 0.8) if goals else None,
                 "note": note},
                {"name": f"{prefix}/k_to_goal", "value": "never" if k_goal is None else k_goal, "unit": "drawings",
                 "goal": f"<= {GOAL_K}" if goals else None,
                 "ok": (k_goal is not None and k_goal <= GOAL_K) if goals else None, "note": note},
            ]
    iou = report.iou[head]
    margins = detector_margins(iou, min_iou=config.detector_iou)
    best, _ = iou.best()
    # why P and R swing from one reviewer to the next (no goal: a property of the model)
    for c in report.config.concepts:
        det = report.detectors[head].get(c, [])
        hair = [u for u in det if margins[u] < HAIR]
        near = [int(u) for u in np.flatnonzero((best == iou.concepts.index(c)) & (margins < HAIR))
                if int(u) not in det]
        figures.append({"name": f"groundtruth/{c}/detectors_by_a_hair", "value": len(hair), "unit": "units",
                        "goal": None, "ok": None,
                        "note": f"{head}: {len(hair)} of the {len(det)} detectors of {c} are within {HAIR} of IoU of "
                                f"another concept or of the {config.detector_iou} criterion ({hair}); {len(near)} "
                                f"units whose best concept it is fall short of the criterion by less ({near}). A "
                                f"reviewer's few drawings cannot settle these, whatever the rule"})
    for base, orders, who in (("groundtruth", report.orders, "at random"),
                              ("groundtruth/suggested", report.orders_suggested,
                               "(after a first one at random) as the app suggests")):
        for rule, per in orders.items():  # the same rules at k = 5 for many reviewers (no goal: a spread)
            for c, v in per.items():
                figures.append({"name": f"{base}/{rule}/{c}/reviewers_meeting_goal@{GOAL_K}", "value": v["met"],
                                "unit": "share", "goal": None, "ok": None,
                                "note": f"{v['orders']} seeded reviewers drawing {GOAL_K} test patches per concept "
                                        f"{who} on {head}: mean precision {v['precision']:.2f}, mean recall "
                                        f"{v['recall']:.2f}; share reaching both 0.8 goals"})
    for c in report.missing:
        figures.append({"name": f"groundtruth/{c}/detectors", "value": "no masks", "unit": "", "goal": "> 0",
                        "ok": False, "note": f"the demo manifest has no ground-truth mask of {c}"})
    figures.append({"name": "groundtruth/seconds", "value": report.seconds, "unit": "s", "goal": None, "ok": None,
                     "note": f"{report.n_reference_images} reference images, {len(report.layers)} layers, "
                             f"{len(report.drawings)} drawings; mlflow run {run_id}"})
    return figures


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from store.settings import load_settings

    for f in run(load_settings()):
        print(f)
