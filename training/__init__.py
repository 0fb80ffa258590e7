"""Training: the model zoo, Lightning fit tracked in mlflow, and pickle-free model loading.

    >>> from training import fit, load_config, load_model, preprocess
    >>> result = fit(load_config("training/configs/demo.yaml"), settings=settings)   # FitResult(run_id, model_uri, …)
    >>> m = load_model("models:/conceptlens-demo@champion", settings=settings)
    >>> logits = m.module(preprocess(patches_uint8, m.transform))                    # (batch, 2)

Importing this package is light: torch, lightning and mlflow load only when a function that needs them is called.
"""

from __future__ import annotations

import importlib

__all__ = [
    "fit", "load_config", "FitConfig", "FitResult", "load_model", "LoadedModel", "save_model", "preprocess",
    "build_model", "ModelSpec", "VGGConfig", "ResNetConfig", "vgg_bn", "resnet", "default_layers",
    "TrainingError", "ConfigError", "DataError", "TrackingError", "ModelLoadError", "UntrustedModelError",
    "build_demo", "DemoConfig", "DemoReport",
]

_WHERE = {
    "fit": "fit", "load_config": "fit", "FitConfig": "fit", "FitResult": "fit",
    "load_model": "registry", "LoadedModel": "registry", "save_model": "registry",
    "preprocess": "transforms",
    "build_model": "zoo", "ModelSpec": "zoo", "VGGConfig": "zoo", "ResNetConfig": "zoo", "vgg_bn": "zoo",
    "resnet": "zoo", "default_layers": "zoo",
    "TrainingError": "errors", "ConfigError": "errors", "DataError": "errors", "TrackingError": "errors",
    "ModelLoadError": "errors", "UntrustedModelError": "errors",
    "build_demo": "demo", "DemoConfig": "demo", "DemoReport": "demo",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
