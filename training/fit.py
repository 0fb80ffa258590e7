"""`fit(config) -> FitResult`: check the data, train with Lightning, track in mlflow, register the model.

    >>> from training.fit import fit, load_config
    >>> result = fit(load_config("training/configs/demo.yaml"), settings=load_settings())
    >>> result.model_uri, result.metrics["test/auroc"], result.reused

    $ python -m training fit --config training/configs/demo.yaml [--workspace W] [--set trainer.max_epochs=3]

Order matters for bad input: the config, the manifest and every patch header, the network and the Trainer
arguments are checked and the tracking server is reached before an mlflow run exists, so a bad input leaves no
run behind; a failure after that marks the run FAILED. Under DDP only rank 0 talks to mlflow.
A rerun with the same data, config and training code finds the registered version with that reuse key (the
champion, or an earlier version that did not beat it) and returns it unchanged instead of training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, TrainingError

__all__ = ["FitConfig", "ModelConfig", "TrainerConfig", "MlflowConfig", "FitResult", "load_config", "fit", "main"]


# -- configuration ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """A zoo network (`zoo` + `config`) or a user factory (`factory: package.module:function` + `kwargs`)."""

    zoo: str | None = "vgg_bn"
    config: dict = field(default_factory=dict)
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    layers: list[str] | None = None  # default extraction layers; None: the deepest 3 blocks with maps ≥ 8 px
    # opt-in auxiliary targets while training (training.module): each concept's presence in the patch (a mask of it
    # in the manifest), predicted by a linear head on the pooled maps of `aux_layer` (None: the deepest of `layers`);
    # the head is not part of the saved network
    aux_concepts: list[str] | None = None
    aux_weight: float = 1.0
    aux_layer: str | None = None
    # opt-in dense targets on the same layer: a 1×1 convolution predicts, per map cell, the fraction the concept's
    # mask covers (training.module); also only while training
    aux_masks: list[str] | None = None
    aux_mask_weight: float = 1.0
    # 0: that convolution reads each concept from all the layer's units; n > 0: n units of the layer per concept (the
    # first n for the first of aux_masks, the next n for the second, …) each learn to fire where the concept is
    aux_mask_units: int = 0

    def spec(self):
        from .zoo import ModelSpec

        if self.factory is not None:
            return ModelSpec(zoo=None, factory=self.factory, kwargs=dict(self.kwargs))
        return ModelSpec(zoo=self.zoo, config=dict(self.config))

    def __post_init__(self):
        self.spec()  # ConfigError now, not after the data was read
        if self.aux_weight < 0:
            raise ConfigError(f"model.aux_weight: {self.aux_weight} must be ≥ 0")
        if self.aux_mask_weight < 0:
            raise ConfigError(f"model.aux_mask_weight: {self.aux_mask_weight} must be ≥ 0")
        if self.aux_mask_units < 0 or (self.aux_mask_units and not self.aux_masks):
            raise ConfigError(f"model.aux_mask_units: {self.aux_mask_units} must be ≥ 0, and needs aux_masks")


@dataclass(frozen=True)
class TrainerConfig:
    """The Lightning Trainer arguments ConceptLens exposes (anything else is a config error)."""

    max_epochs: int = 10
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    fast_dev_run: bool | int = False
    deterministic: bool = False
    enable_progress_bar: bool = True
    num_threads: int | None = None  # torch intra-op threads of this process; None leaves torch's default
    keep: str = "best"  # weights fit keeps: "best" epoch by val/auroc (ties: lower val/loss), or the "last" epoch

    def __post_init__(self):
        if self.keep not in ("best", "last"):
            raise ConfigError(f"trainer.keep: {self.keep!r} is not 'best' or 'last'")
        if self.max_epochs < 1:
            raise ConfigError(f"trainer.max_epochs: {self.max_epochs} must be ≥ 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"trainer.num_threads: {self.num_threads} must be ≥ 1")


@dataclass(frozen=True)
class MlflowConfig:
    registered_model: str | None = None  # default conceptlens-<dataset>
    experiment: str | None = None  # default: the registered model's name
    alias: str = "champion"
    run_name: str | None = None
    reuse: bool = True  # return the champion unchanged when data, config and code match
    register: bool = True


def _data_config_type():
    from .datamodule import DataConfig

    return DataConfig


def _optim_config_type():
    from .module import OptimConfig

    return OptimConfig


@dataclass(frozen=True)
class FitConfig:
    data: typing.Any = None  # DataConfig (typed lazily: importing fit must not import lightning)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: typing.Any = None  # OptimConfig
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    seed: int = 0

    def __post_init__(self):
        if self.data is None:
            object.__setattr__(self, "data", _data_config_type()())
        if self.optim is None:
            object.__setattr__(self, "optim", _optim_config_type()())

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


_SECTIONS = {"data": _data_config_type, "model": lambda: ModelConfig, "optim": _optim_config_type,
             "trainer": lambda: TrainerConfig, "mlflow": lambda: MlflowConfig}


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is typing.Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = (typing.get_args(tp) or (typing.Any,))[0]
        return origin(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(names)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if cls is FitConfig and k in _SECTIONS:
            tp = _SECTIONS[k]()
        kwargs[k] = _coerce(tp, v, f"{where}.{k}" if where else k)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    d[last] = value


def load_config(source: str | Path | dict | FitConfig, *, overrides: list[str] | tuple[str, ...] = ()) -> FitConfig:
    """A FitConfig from a YAML file, a dict or a FitConfig; `overrides` are 'section.key=yaml-value' strings.

    Unknown keys, wrong types and impossible values raise ConfigError naming the key (and the file).
    """
    where = ""
    if isinstance(source, FitConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source))
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(data, key.strip(), yaml.safe_load(raw))
    try:
        return _build(FitConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


# -- result ----------------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    run_id: str | None
    model_uri: str | None  # models:/<name>/<version>
    version: int | None
    name: str | None
    metrics: dict[str, float]
    checkpoint: Path | None  # local model directory (model.json + weights.pt)
    seconds: float
    images_per_s: float
    reused: bool
    champion: bool = False
    key: str = ""


# -- helpers ---------------------------------------------------------------------------------------------------------
def _git_state() -> tuple[str | None, bool]:
    """(commit of the code that trains, whether tracked files differ from it) — (None, False) outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, False
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, False
    return head.stdout.strip() or None, bool(dirty.stdout.strip())


def _dataset_name(manifest: str, manifest_path: Path) -> str:
    return manifest if not manifest.endswith(".csv") else manifest_path.parent.name


def _model_digest(config: FitConfig) -> str:
    """Hash of the config's model section: which network is trained (zoo, widths, head, pooling, aux targets…)."""
    blob = json.dumps(config.to_dict()["model"], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _reuse_key(config: FitConfig, data_digest: str, code: str) -> str:
    """Hash of what determines the trained weights: the data (manifest and patch bytes), the config (less run-time
    knobs) and the training code."""
    d = config.to_dict()
    d.pop("mlflow")
    for k in ("manifest", "num_workers", "in_memory", "memory_limit_mb", "eval_batch_size"):
        d["data"].pop(k)
    for k in ("enable_progress_bar", "num_threads"):
        d["trainer"].pop(k)
    blob = json.dumps({"data": data_digest, "config": d, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def _callbacks(keep: str = "best"):
    """Best-weights keeper and throughput meter (defined here so importing fit stays light)."""
    import lightning as L

    class BestWeights(L.Callback):
        """Keeps a CPU copy of the weights of the epoch with the best val/auroc, ties broken by the lower val/loss
        (no pickled checkpoint files: fit saves the kept state dict itself)."""

        def __init__(self):
            self.best = float("-inf")
            self.best_loss = float("inf")
            self.epoch = -1
            self.state = None

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            auroc = float(m["val/auroc"]) if "val/auroc" in m else float("nan")
            loss = float(m["val/loss"]) if "val/loss" in m else float("inf")
            better = keep == "last" or auroc > self.best or (auroc == self.best and loss < self.best_loss)
            if self.state is None or better:
                self.best, self.best_loss, self.epoch = auroc, loss, trainer.current_epoch
                self.state = {k: t.detach().cpu().clone() for k, t in pl_module.net.state_dict().items()}

    class Throughput(L.Callback):
        """Seconds spent in training epochs, validation excluded."""

        def __init__(self):
            self.seconds = 0.0
            self._t = None

        def on_train_epoch_start(self, trainer, pl_module):
            self._t = time.perf_counter()

        def on_validation_start(self, trainer, pl_module):
            if self._t is not None and not trainer.sanity_checking:
                self.seconds += time.perf_counter() - self._t
                self._t = None

        def on_train_epoch_end(self, trainer, pl_module):
            if self._t is not None:
                self.seconds += time.perf_counter() - self._t
                self._t = None

    return BestWeights(), Throughput()


def _holds(client, name: str, alias: str, version) -> bool:
    from .registry import champion_version

    champ = champion_version(client, name, alias)
    return champ is not None and str(champ.version) == str(version)


def _epoch_logger(client, run_id: str):
    """A Lightning logger that writes epoch metrics (step = epoch) to one run through our own MlflowClient.

    Lightning's MLFlowLogger would set mlflow's process-global tracking URI and end the run after `trainer.fit`;
    this one touches nothing global and leaves ending the run to `fit`. A failed write is kept and retried with the
    next one, so a tracking server that is briefly away costs a warning, not the training.
    """
    from lightning.pytorch.loggers.logger import Logger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
    from mlflow.entities import Metric

    class EpochLogger(Logger):
        def __init__(self):
            super().__init__()
            self.pending: list[Metric] = []

        @property
        def name(self):
            return "mlflow"

        @property
        def version(self):
            return run_id

        @rank_zero_only
        def log_hyperparams(self, params, *args, **kwargs):
            pass  # fit logs the whole config itself

        @rank_zero_only
        def log_metrics(self, metrics, step=None):
            epoch = int(metrics.get("epoch", step or 0))
            ts = int(time.time() * 1000)
            self.pending += [Metric(key=k, value=float(v), timestamp=ts, step=epoch)
                             for k, v in metrics.items() if k != "epoch"]
            self.flush(warn=True)

        def flush(self, *, warn: bool = False) -> None:
            for i in range(0, len(self.pending), 500):
                try:
                    client.log_batch(run_id, metrics=self.pending[i:i + 500])
                except Exception as e:
                    if not warn or getattr(e, "error_code", "") == "INVALID_PARAMETER_VALUE":
                        raise  # at the end of fit, or a bad metric that no retry would fix
                    rank_zero_warn(f"mlflow: could not log {len(self.pending)} metric value(s) to run {run_id} "
                                   f"({type(e).__name__}: {e}); training goes on, they are retried with the next")
                    self.pending = self.pending[i:]
                    return
            self.pending = []

    return EpochLogger()


def _roc_points(summary: dict) -> dict:
    """The test split's ROC as plain JSON: {"fpr": [...], "tpr": [...], "auroc": float or None, "specificity": the
    operating point training reports}. The Experiments page draws the runs' curves from it in one interactive figure
    (the PNG beside it is for the mlflow UI)."""
    from .module import SPECIFICITY

    auroc = float(summary["auroc"])
    return {"fpr": [round(float(v), 6) for v in summary["fpr"]], "tpr": [round(float(v), 6) for v in summary["tpr"]],
            "auroc": auroc if math.isfinite(auroc) else None, "specificity": SPECIFICITY}


def _figures(summary: dict):
    """ROC curve and confusion matrix of the test split as matplotlib Figures (no pyplot: no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .module import SPECIFICITY

    roc = Figure(figsize=(4.2, 4.0), dpi=120)
    FigureCanvasAgg(roc)
    ax = roc.add_subplot()
    ax.plot(summary["fpr"], summary["tpr"], lw=2, label=f"AUROC {summary['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.axvline(1 - SPECIFICITY, c="tab:red", lw=0.8, ls=":", label=f"{SPECIFICITY:.0%} specificity")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate (sensitivity)", title="ROC, test split",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    roc.tight_layout()

    cm = summary["confusion"]  # (true, predicted)
    conf = Figure(figsize=(3.6, 3.2), dpi=120)
    FigureCanvasAgg(conf)
    ax = conf.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for (i, j), n in __import__("numpy").ndenumerate(cm):
        ax.text(j, i, int(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "lesion"], yticklabels=["normal", "lesion"],
           xlabel="predicted (p ≥ 0.5)", ylabel="true", title="Confusion, test split")
    conf.tight_layout()
    return roc, conf


# -- fit -------------------------------------------------------------------------------------------------------------
def _aux_arguments(model: ModelConfig, net, layers: list[str], manifest, input_size) -> tuple[dict, tuple | None]:
    """ClassifierModule's auxiliary-head arguments ({} without aux_concepts and aux_masks) and the aux layer's map
    grid (gy, gx); ConfigError before any run exists."""
    if not model.aux_concepts and not model.aux_masks:
        return {}, None
    from .zoo import _output_shapes

    layer = model.aux_layer or layers[-1]
    shape = _output_shapes(net, input_size).get(layer)
    if shape is None or len(shape) != 4:
        raise ConfigError(f"model.aux_layer: {layer!r} is not a module of the network with (channel, y, x) maps")
    from .module import concept_units

    concept_units(model.aux_masks, model.aux_mask_units, shape[1], layer)  # before any run exists
    known = {c for r in manifest.records for c in r.masks}
    for key in ("aux_concepts", "aux_masks"):
        unknown = sorted(set(getattr(model, key) or ()) - known)
        if unknown:
            raise ConfigError(f"model.{key}: {unknown} have no mask in the manifest (concepts with masks: "
                              f"{sorted(known)})")
    return ({"aux_concepts": tuple(model.aux_concepts or ()), "aux_layer": layer, "aux_weight": model.aux_weight,
             "aux_channels": int(shape[1]), "aux_masks": tuple(model.aux_masks or ()),
             "aux_mask_weight": model.aux_mask_weight, "aux_mask_units": model.aux_mask_units},
            tuple(int(n) for n in shape[2:]))


def _with_concept_targets(dm, concepts, masks=(), grid=None) -> None:
    """Wrap the data module's datasets so that each label carries the concepts' presence after the class (and each
    item the dense targets of `masks` on the map `grid`)."""
    from .module import ConceptTargetDataset

    dm.setup()
    dm.datasets = {s: ConceptTargetDataset(ds, concepts, mask_concepts=masks, grid=grid)
                   for s, ds in dm.datasets.items()}


def fit(config: FitConfig | str | Path | dict, *, settings=None) -> FitResult:
    """Train (or reuse) the classifier a config describes; see the module docstring for the order of checks."""
    t0 = time.perf_counter()
    config = load_config(config)
    if settings is None:
        from store.settings import load_settings

        settings = load_settings()
    settings.ensure()

    import lightning as L
    import torch
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from .datamodule import PatchDataModule
    from .module import ClassifierModule
    from .registry import CLASSES, find_version, open_tracking, register_version, save_model
    from .zoo import build_model, code_version, default_layers

    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)

    # 1. data, network and trainer arguments: every error here comes before any run exists
    manifest_path = settings.manifest_path(config.data.manifest)
    dm = PatchDataModule(config.data, manifest_path=manifest_path, seed=config.seed)
    summary = dm.check()
    spec = config.model.spec()
    net = build_model(spec)
    try:
        layers = list(config.model.layers) if config.model.layers else default_layers(net, summary.input_size)
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, 1, *summary.input_size))  # (2, class)
    except RuntimeError as e:
        raise ConfigError(f"model: the network does not take {summary.input_size} patches ({e})") from None
    if tuple(out.shape) != (2, len(CLASSES)):
        raise ConfigError(f"model: the network returns shape {tuple(out.shape)[1:]} per patch, expected (2,) logits")
    missing = [n for n in layers if n not in dict(net.named_modules())]
    if missing or not layers:
        raise ConfigError(f"model.layers: {missing or layers} not found among the network's modules")
    aux, aux_grid = _aux_arguments(config.model, net, layers, dm.manifest, summary.input_size)
    net.train()

    dataset = _dataset_name(config.data.manifest, manifest_path)
    name = config.mlflow.registered_model or f"conceptlens-{dataset}"
    experiment = config.mlflow.experiment or name
    code = code_version(spec)
    key = _reuse_key(config, summary.digest, code)
    is_zero = rank_zero_only.rank == 0
    track = is_zero and not config.trainer.fast_dev_run

    best, meter = _callbacks(config.trainer.keep)
    tc = config.trainer
    trainer_kwargs = dict(
        max_epochs=tc.max_epochs, accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=tc.strategy, precision=tc.precision, fast_dev_run=tc.fast_dev_run, deterministic=tc.deterministic,
        enable_progress_bar=tc.enable_progress_bar, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=1, callbacks=[best, meter], default_root_dir=str(settings.checkpoint_dir),
        **{k: getattr(tc, k) for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches")
           if getattr(tc, k) is not None},
    )

    # 2. tracking: reachable, experiment open, reuse decided — still no run
    client = run_id = None
    if track:
        client, experiment_id = open_tracking(settings, experiment)
        found = find_version(client, name, key, alias=config.mlflow.alias) if config.mlflow.reuse else None
        if found is not None:
            run = client.get_run(found.run_id)
            return FitResult(
                run_id=found.run_id, model_uri=f"models:/{name}/{found.version}", version=int(found.version),
                name=name, metrics=dict(run.data.metrics), checkpoint=None, seconds=time.perf_counter() - t0,
                images_per_s=float(run.data.metrics.get("fit/images_per_s", float("nan"))), reused=True,
                champion=_holds(client, name, config.mlflow.alias, found.version),
                key=key,
            )

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = L.Trainer(**trainer_kwargs, logger=False)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"trainer: {e}") from None
    if track:
        commit, dirty = _git_state()
        tags = {"conceptlens.key": key, "conceptlens.dataset": dataset, "conceptlens.manifest_sha256": summary.sha256,
                "conceptlens.data_digest": summary.digest,
                "conceptlens.code_version": code, "mlflow.source.type": "LOCAL",
                "mlflow.source.name": "training.fit"}
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["conceptlens.git_dirty"] = str(dirty).lower()
        run = client.create_run(experiment_id, run_name=config.mlflow.run_name, tags=tags)
        run_id = run.info.run_id
        trainer.logger = _epoch_logger(client, run_id)

    try:
        if track:
            _log_inputs(client, run_id, config, summary, dataset, layers, code, net)
        if aux:
            _with_concept_targets(dm, aux["aux_concepts"], aux["aux_masks"], aux_grid)
        module = ClassifierModule(net, optim=config.optim, **aux)
        with warnings.catch_warnings():
            # the module logs values torchmetrics already synchronised over ranks (see ClassifierModule._log_epoch)
            warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
            trainer.fit(module, datamodule=dm)
            if best.state is not None:
                net.load_state_dict(best.state)
            trainer.test(module, datamodule=dm, verbose=False)
        module.remove_aux_hook()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        metrics["best/val_auroc"] = best.best
        metrics["best/epoch"] = float(best.epoch)
        n_train = module.train_images * max(trainer.world_size, 1)
        images_per_s = n_train / meter.seconds if meter.seconds > 0 else float("nan")
        metrics["fit/images_per_s"] = images_per_s
        if not is_zero:
            return FitResult(run_id=None, model_uri=None, version=None, name=name, metrics=metrics, checkpoint=None,
                             seconds=time.perf_counter() - t0, images_per_s=images_per_s, reused=False, key=key)

        model_dir = save_model(
            settings.checkpoint_dir / f"{name}-{run_id or 'dev'}", net.eval(), spec=spec,
            input_size=summary.input_size, transform=dm.transform, layers=layers, classes=CLASSES,
            extra={"name": name, "run_id": run_id, "key": key, "manifest_sha256": summary.sha256,
                   "best_epoch": best.epoch, "val_auroc": best.best},
        )
        version = champion = None
        if track:
            summary_t = module.test_summary or {}
            if summary_t:
                summary_t["auroc"] = metrics.get("test/auroc", float("nan"))
                roc, conf = _figures(summary_t)
                client.log_figure(run_id, roc, "figures/test_roc.png")
                client.log_dict(run_id, _roc_points(summary_t), "figures/test_roc.json")  # the app overlays runs' curves
                client.log_figure(run_id, conf, "figures/test_confusion.png")
            trainer.logger.flush()  # anything a brief tracking outage held back
            metrics["fit/seconds"] = time.perf_counter() - t0
            for k, v in metrics.items():
                client.log_metric(run_id, k, v)
            client.log_artifacts(run_id, str(model_dir), "model")
            if config.mlflow.register:
                source = f"{client.get_run(run_id).info.artifact_uri}/model"
                version, champion = register_version(
                    client, name=name, run_id=run_id, source=source, key=key, alias=config.mlflow.alias,
                    data_digest=summary.digest, model_digest=_model_digest(config),
                    val_auroc=best.best if best.best == best.best else float("-inf"),
                    tags={"conceptlens.test_auroc": f"{metrics.get('test/auroc', float('nan')):.6f}"},
                )
            client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if run_id is not None:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception as e:  # the original error matters more; say why the run could not be closed
                print(f"training.fit: could not mark run {run_id} FAILED: {e}", file=sys.stderr)
        raise
    return FitResult(
        run_id=run_id, model_uri=f"models:/{name}/{version}" if version else None, version=version, name=name,
        metrics=metrics, checkpoint=model_dir, seconds=time.perf_counter() - t0, images_per_s=images_per_s,
        reused=False, champion=bool(champion), key=key,
    )


def _log_inputs(client, run_id, config, summary, dataset, layers, code, net) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    cfg = config.to_dict()
    params = _flatten(cfg)
    params.update({
        "data.manifest_path": str(summary.manifest), "data.manifest_sha256": summary.sha256,
        "data.digest": summary.digest,
        "data.input_size": json.dumps(list(summary.input_size)), "model.layers_resolved": json.dumps(layers),
        "model.code_version": code, "model.parameters": str(sum(p.numel() for p in net.parameters())),
        "data.counts": json.dumps(summary.counts),
    })
    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    client.log_text(run_id, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    ds = Dataset(name=dataset, digest=summary.digest[:16], source_type="local", source=str(summary.manifest))
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])])


# -- command line ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m training fit --config <yaml> [--workspace W] [--set key=value …]`"""
    p = argparse.ArgumentParser(prog="python -m training fit", description="train, track and register a classifier")
    p.add_argument("--config", required=True, help="YAML config (sections data, model, optim, trainer, mlflow)")
    p.add_argument("--workspace", default=None,
                   help="workspace directory (default CONCEPTLENS_WORKSPACE or ./workspace)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.max_epochs=3 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = p.parse_args(argv)
    from store.settings import load_settings

    try:
        config = load_config(args.config, overrides=args.overrides)
        result = fit(config, settings=load_settings(args.workspace))
    except (TrainingError, ValueError) as e:
        print(f"training fit: {e}", file=sys.stderr)
        return 2
    if result.run_id is None and not result.reused:
        return 0  # a non-zero DDP rank, or fast_dev_run
    what = "reused" if result.reused else "trained"
    auroc = result.metrics.get("test/auroc", float("nan"))
    print(f"{what} {result.model_uri or '(not registered)'}  run {result.run_id}  test/auroc {auroc:.4f}  "
          f"{result.seconds:.1f} s  {result.images_per_s:.0f} img/s" + ("  champion" if result.champion else ""))
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "checkpoint": str(result.checkpoint or "")}, default=str))
    return 0
