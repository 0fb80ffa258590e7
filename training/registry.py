"""Saved models, the mlflow Model Registry, and `load_model` — all pickle-free.

    >>> from training import load_model
    >>> m = load_model("models:/conceptlens-demo@champion", settings=settings)
    >>> probs = m.module(preprocess(patches, m.transform)).softmax(1)   # (batch, class)
    >>> m.meta["layers"], m.meta["model_uri"]                    # ['features.9', …], 'models:/conceptlens-demo/3'

A saved model is a directory with two files: `model.json` (the zoo spec or user factory, input size, transform,
default layers, classes) and `weights.pt` (a state dict of tensors written by `torch.save`, read back with
`weights_only=True`, so no pickled object is ever executed). Fit logs that directory as the run artifact `model/`
and registers it; `load_model` accepts `models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<run_id>[/path]`
or a local model directory (or its weights.pt).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, TrackingError, UntrustedModelError
from .transforms import check_transform
from .zoo import ModelSpec, build_model

__all__ = [
    "LoadedModel", "load_model", "save_model", "read_model_dir", "open_tracking", "register_version",
    "champion_version", "find_version", "MODEL_FORMAT", "CLASSES", "TRUSTED_FACTORIES_ENV",
]

MODEL_FORMAT = "conceptlens-model/1"
CLASSES = ["normal", "lesion"]
TRUSTED_FACTORIES_ENV = "CONCEPTLENS_TRUSTED_FACTORIES"
KEY_TAG = "conceptlens.key"
METRIC_TAG = "conceptlens.val_auroc"
DATA_TAG = "conceptlens.data_digest"
MODEL_TAG = "conceptlens.model_digest"  # the model section of the training config (architecture, head, …)


@dataclass
class LoadedModel:
    """An eval-mode network with what is needed to feed it and to name its layers."""

    module: nn.Module
    meta: dict = field(default_factory=dict)

    @property
    def transform(self) -> dict:
        return self.meta["transform"]

    @property
    def layers(self) -> list[str]:
        return self.meta["layers"]

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta["input_size"])


# -- model directories -----------------------------------------------------------------------------------------------
def save_model(directory: str | Path, net: nn.Module, *, spec: ModelSpec, input_size: tuple[int, int],
               transform: dict, layers: list[str], classes: list[str] | None = None, extra: dict | None = None) -> Path:
    """Write `model.json` + `weights.pt` into `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    torch.save(state, directory / "weights.pt")
    doc = {
        "format": MODEL_FORMAT, "spec": spec.to_dict(), "input_size": [int(s) for s in input_size],
        "transform": check_transform(transform), "layers": list(layers), "classes": list(classes or CLASSES),
        "weights": "weights.pt", **(extra or {}),
    }
    (directory / "model.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    return directory


def _trusted(trusted_factories: Iterable[str] | None) -> tuple[str, ...]:
    env = tuple(filter(None, (s.strip() for s in os.environ.get(TRUSTED_FACTORIES_ENV, "").split(","))))
    return tuple(trusted_factories or ()) + env


def read_model_dir(directory: str | Path, *, trusted_factories: Iterable[str] | None = None) -> LoadedModel:
    """Rebuild the network of a model directory and load its weights without unpickling any object."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    spec_path = directory / "model.json"
    if not spec_path.is_file():
        raise ModelLoadError(f"{directory}: not a model directory (no model.json)")
    try:
        doc = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{spec_path}: unreadable model spec ({e})") from None
    if doc.get("format") != MODEL_FORMAT:
        raise ModelLoadError(f"{spec_path}: format {doc.get('format')!r} is not {MODEL_FORMAT!r}")
    weights = directory / Path(doc.get("weights", "weights.pt")).name  # never a path outside the directory
    try:
        spec = ModelSpec.from_dict(doc["spec"])
        input_size = tuple(int(s) for s in doc["input_size"])
        transform = check_transform(doc["transform"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{spec_path}: invalid model spec ({e})") from None
    net = build_model(spec, trusted_factories=_trusted(trusted_factories))
    state = _load_state_dict(weights)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{weights}: weights do not fit the network of {spec_path} ({e})") from None
    net.eval()
    meta = {k: v for k, v in doc.items() if k not in ("format", "weights")}
    meta.update(input_size=list(input_size), transform=transform, spec=spec.to_dict(),
                layers=list(doc.get("layers") or []), classes=list(doc.get("classes") or CLASSES))
    return LoadedModel(module=net, meta=meta)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses every global that is not a tensor type: a crafted pickle ends here, unexecuted
        raise UntrustedModelError(f"{path}: refused to load, the file holds objects other than tensors ({e})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelLoadError(f"{path}: unreadable weights ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelLoadError(f"{path}: not a state dict of named tensors")
    return state


# -- references ------------------------------------------------------------------------------------------------------
def load_model(ref: str | os.PathLike, *, settings, trusted_factories: Iterable[str] | None = None) -> LoadedModel:
    """Load a model by registry URI, run URI or local path; `.meta` says where it came from (model_uri, run_id…).

    Zoo networks always load; a model built by a user factory loads only when the factory is trusted
    (`trusted_factories` or the comma-separated CONCEPTLENS_TRUSTED_FACTORIES), since importing it runs its code.
    """
    ref_s = str(ref)
    if ref_s.startswith("models:/"):
        return _load_registered(ref_s, settings, trusted_factories)
    if ref_s.startswith("runs:/"):
        run_id, _, path = ref_s.removeprefix("runs:/").partition("/")
        if not run_id:
            raise ModelLoadError(f"{ref_s}: no run id")
        path = path.strip("/") or "model"
        with _downloaded(f"runs:/{run_id}/{path}", settings) as local:
            loaded = read_model_dir(local, trusted_factories=trusted_factories)
        loaded.meta.update(model_uri=f"runs:/{run_id}/{path}", run_id=run_id, name=loaded.meta.get("name"),
                           version=None)
        return loaded
    path = Path(ref_s).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{ref_s}: no such model (not a models:/ or runs:/ URI, and no file there)")
    loaded = read_model_dir(path, trusted_factories=trusted_factories)
    loaded.meta.update(model_uri=str(path.resolve()), run_id=loaded.meta.get("run_id"), version=None,
                       name=loaded.meta.get("name"))
    return loaded


def _load_registered(ref: str, settings, trusted_factories) -> LoadedModel:
    from mlflow.exceptions import MlflowException

    body = ref.removeprefix("models:/").strip("/")
    client = _client(settings)
    try:
        if "@" in body:
            name, _, alias = body.partition("@")
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.rpartition("/")
            if not name or not version.isdigit():
                raise ModelLoadError(f"{ref}: expected models:/<name>@<alias> or models:/<name>/<version>")
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ModelLoadError(f"{ref}: not found in the registry at {_safe_uri(settings.tracking_uri)} "
                             f"({e.message.splitlines()[0]})") from None
    with _downloaded(mv.source, settings, run_id=mv.run_id) as local:
        loaded = read_model_dir(local, trusted_factories=trusted_factories)
    loaded.meta.update(model_uri=f"models:/{mv.name}/{mv.version}", ref=ref, run_id=mv.run_id, name=mv.name,
                       version=int(mv.version))
    return loaded


@contextmanager
def _downloaded(uri: str, settings, run_id: str | None = None):
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="conceptlens-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                        tracking_uri=settings.tracking_uri)
        except (MlflowException, OSError) as e:
            raise ModelLoadError(f"{uri}: cannot download the model artifacts ({e})") from None
        yield Path(local)


# -- tracking and registry -------------------------------------------------------------------------------------------
def _safe_uri(uri: str) -> str:
    """The URI without credentials, for messages."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _client(settings):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _check_server(uri: str, timeout: float) -> None:
    """Fail fast when an http(s) tracking server does not answer (mlflow itself would retry for minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise TrackingError(f"mlflow tracking server {_safe_uri(uri)}: /health answered {r.status}")
    except urllib.error.HTTPError as e:
        raise TrackingError(f"mlflow tracking server {_safe_uri(uri)}: /health answered {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"mlflow tracking server {_safe_uri(uri)} is unreachable ({reason}); start it or "
                            f"unset MLFLOW_TRACKING_URI for the embedded sqlite store") from None


@contextmanager
def _init_lock(settings):
    """Serialise the first use of an embedded sqlite database, whose schema mlflow creates on first connection."""
    uri = settings.tracking_uri
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_tracking(settings, experiment: str, *, timeout: float = 5.0):
    """Check the tracking store, create the experiment once, return (MlflowClient, experiment_id).

    The embedded store keeps artifacts under <workspace>/mlartifacts/<experiment>; a server uses its own default.
    """
    from mlflow.exceptions import MlflowException

    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout)
    client = _client(settings)
    try:
        with _init_lock(settings):
            exp = client.get_experiment_by_name(experiment)
            if exp is not None:
                return client, exp.experiment_id
            location = None
            if uri.startswith("sqlite:"):
                location = (settings.artifact_root / experiment).resolve().as_uri()
            try:
                return client, client.create_experiment(experiment, artifact_location=location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                return client, client.get_experiment_by_name(experiment).experiment_id
    except MlflowException as e:
        raise TrackingError(
            f"mlflow at {_safe_uri(uri)}: cannot open experiment {experiment!r} ({e.message})") from None


def champion_version(client, name: str, alias: str):
    """The model version an alias points at, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(client, name: str, key: str, *, alias: str = "champion"):
    """The version of `name` trained with reuse key `key`: the alias holder when it matches, else the newest one."""
    from mlflow.exceptions import MlflowException

    champ = champion_version(client, name, alias)
    if champ is not None and champ.tags.get(KEY_TAG) == key:
        return champ
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    matching = [v for v in versions if v.tags.get(KEY_TAG) == key]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def register_version(client, *, name: str, run_id: str, source: str, key: str, val_auroc: float,
                     alias: str = "champion", data_digest: str | None = None, model_digest: str | None = None,
                     tags: dict | None = None) -> tuple[int, bool]:
    """Register `source` as a new version of `name`; move `alias` to it when its val/auroc beats the alias holder's,
    or when the alias holder was trained on other data (its val/auroc was measured on another validation split),
    or is another model (`model_digest`: a changed architecture is the user's choice, not a contender to beat).

    Returns (version, became_champion).
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="ConceptLens classifier (normal vs lesion)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {KEY_TAG: key, METRIC_TAG: f"{val_auroc:.6f}", **(tags or {})}
    if data_digest:
        version_tags[DATA_TAG] = data_digest
    if model_digest:
        version_tags[MODEL_TAG] = model_digest
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
    current = champion_version(client, name, alias)
    best = float("-inf")
    if current is not None:
        try:
            best = float(current.tags.get(METRIC_TAG, "-inf"))
        except ValueError:
            best = float("-inf")
    other_data = current is not None and data_digest is not None and current.tags.get(DATA_TAG) != data_digest
    other_model = current is not None and model_digest is not None and current.tags.get(MODEL_TAG) != model_digest
    promote = current is None or other_data or other_model or val_auroc > best
    if promote:
        client.set_registered_model_alias(name, alias, mv.version)
    return int(mv.version), promote
