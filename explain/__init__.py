"""explain/ — hooks, dissection, unit labels, concept probes, maps, prototypes, attribution and reports.

    >>> from explain import UnitIoU, label_region, retrain, image_report
    >>> ious = UnitIoU(store, "features.23").compute(image, region)      # float32 (unit,)

Importing this package is light: each name loads its module (torch, mlflow, umap) when first used.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Trace": "hooks",
    "ExplainError": "errors", "RegionError": "errors", "ProbeDataError": "errors", "LabelError": "errors",
    "UnknownLayerError": "errors", "UnknownUnitError": "errors", "UnknownImageError": "errors",
    "UnknownConceptError": "errors", "UnknownActionError": "errors",
    "rasterize_polygon": "regions", "rasterize_regions": "regions", "parse_plotly_shapes": "regions",
    "UnitIoU": "dissection", "DatasetIoU": "dissection", "unit_masks": "dissection",
    "reference_unit_iou": "dissection",
    "LabelRule": "labels", "DatasetLabelRule": "labels", "label_region": "labels", "undo": "labels",
    "current_labels": "labels", "CumulativeRule": "labelrules", "DatasetRule": "labelrules",
    "images_showing": "labelrules", "unit_mask_areas": "labelrules", "next_drawings": "labelrules",
    "count_unit_mask_areas": "labelrules",
    "add_comment": "labels", "edit_comment": "labels", "delete_comment": "labels", "comments": "labels",
    "record_probe_version": "labels", "recorded_probe_versions": "labels",
    "label_kappa": "agreement", "region_dice": "agreement",  # (the function agreement: explain.agreement.agreement)
    "fit_probe": "probes", "retrain": "probes", "rollback": "probes", "probe_versions": "probes",
    "probe_heatmap": "probes",
    "compute_maps": "embeddings", "read_maps": "embeddings",
    "unit_prototypes": "prototypes", "probe_prototypes": "prototypes", "class_prototypes": "prototypes",
    "render_overlay": "prototypes",
    "grad_cam": "attribution",
    "image_report": "report", "model_report": "report",
    "verdict_scores": "verdict", "calibrate_presence": "verdict",
    "evaluate_ground_truth": "groundtruth",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'explain' has no attribute {name!r}")


def __dir__():
    return __all__
