"""The LightningModule: an injected network, one shared step, metrics per split, AdamW with a schedule.

    >>> from training.module import ClassifierModule, OptimConfig
    >>> module = ClassifierModule(vgg_bn(VGGConfig()), optim=OptimConfig(lr=3e-3))
    >>> trainer.fit(module, datamodule=dm)      # logs train/loss, val/auroc, val/accuracy, val/sensitivity@90spec…

The batches arrive already normalized (see `PatchDataModule.on_after_batch_transfer`), so `forward` is the bare
network — the module `load_model` hands to extraction sees exactly what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy, BinaryAUROC, BinaryConfusionMatrix, BinaryROC, BinarySensitivityAtSpecificity,
)

from .errors import ConfigError

__all__ = ["OptimConfig", "ClassifierModule", "SPLITS", "SENSITIVITY_KEY"]

SPLITS = ("train", "val", "test")
SENSITIVITY_KEY = "sens_at_90spec"  # mlflow metric names allow no "@"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    pct_start: float = 0.2  # onecycle warm-up fraction
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(f"optim.schedule: {self.schedule!r} is not onecycle, cosine or constant")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 < self.pct_start < 1 and 0 <= self.label_smoothing < 1):
            raise ConfigError(f"optim: lr {self.lr} must be > 0, weight_decay ≥ 0, pct_start in (0, 1), "
                              f"label_smoothing in [0, 1)")


def _split_metrics() -> MetricCollection:
    return MetricCollection({
        "auroc": BinaryAUROC(),
        "accuracy": BinaryAccuracy(),
        # sensitivity at the threshold that keeps specificity ≥ 90% (returns (sensitivity, threshold))
        SENSITIVITY_KEY: BinarySensitivityAtSpecificity(min_specificity=0.9),
    }, compute_groups=False)


class ClassifierModule(L.LightningModule):
    """normal-vs-lesion classifier around any network mapping (batch, 1, y, x) to (batch, 2) logits."""

    def __init__(self, net: nn.Module, *, optim: OptimConfig | None = None):
        super().__init__()
        self.net = net
        self.optim = optim or OptimConfig()
        # one metric object per split ("train" itself is taken: nn.Module.train)
        self.metrics = nn.ModuleDict({f"{s}_split": _split_metrics() for s in SPLITS})
        self.losses = nn.ModuleDict({f"{s}_split": MeanMetric() for s in SPLITS})
        self.test_curves = nn.ModuleDict({"roc": BinaryROC(), "confusion": BinaryConfusionMatrix()})
        self.test_summary: dict | None = None  # ROC points and confusion matrix of the last test run
        self.train_images = 0  # patches seen by training steps on this rank (throughput)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, y, x) → (batch, class)
        return self.net(x)

    def model_step(self, batch, split: str) -> torch.Tensor:
        x, y = batch  # float (batch, 1, y, x), long (batch,)
        logits = self(x)  # (batch, class)
        loss = F.cross_entropy(logits, y, label_smoothing=self.optim.label_smoothing if split == "train" else 0.0)
        prob = logits.detach().float().softmax(1)[:, 1]  # (batch,) P(lesion)
        self.metrics[f"{split}_split"].update(prob, y)
        if split == "test":
            self.test_curves["roc"].update(prob, y)
            self.test_curves["confusion"].update(prob, y)
        self.losses[f"{split}_split"].update(loss.detach(), weight=len(y))
        if split == "train":  # this rank's running loss, for the progress bar only
            self.log("loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        return loss

    def training_step(self, batch, batch_idx):
        self.train_images += len(batch[1])
        return self.model_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.model_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.model_step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        """Every rank computes (and so synchronises) the split's metrics here, at the same point of the loop.

        Nothing is logged with sync_dist: Lightning would synchronise such values lazily, when something reads
        them — on rank 0 that is the progress bar, which the other ranks do not have, and DDP would deadlock.
        """
        values = {"loss": self.losses[f"{split}_split"].compute(), **self.metrics[f"{split}_split"].compute()}
        for name, v in values.items():
            v = v[0] if isinstance(v, tuple) else v  # sensitivity-at-specificity returns (value, threshold)
            self.log(f"{split}/{name}", v.float(), prog_bar=(split == "val" and name in ("auroc", "loss")),
                     sync_dist=False)
        self.metrics[f"{split}_split"].reset()
        self.losses[f"{split}_split"].reset()

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")
        fpr, tpr, thr = self.test_curves["roc"].compute()
        cm = self.test_curves["confusion"].compute()  # (true, predicted)
        self.test_summary = {"fpr": fpr.cpu().numpy(), "tpr": tpr.cpu().numpy(), "thresholds": thr.cpu().numpy(),
                             "confusion": cm.cpu().numpy()}
        for m in self.test_curves.values():
            m.reset()

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.net.parameters():
            # no weight decay on batch-norm scales and biases: decaying them only fights the normalisation
            (no_decay if p.ndim <= 1 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.optim.lr)
        if self.optim.schedule == "constant":
            return opt
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.optim.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.optim.lr, total_steps=steps,
                                                        pct_start=self.optim.pct_start)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
