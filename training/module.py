"""The LightningModule: an injected network, one shared step, metrics per split, AdamW with a schedule.

    >>> from training.module import ClassifierModule, OptimConfig
    >>> module = ClassifierModule(vgg_bn(VGGConfig()), optim=OptimConfig(lr=3e-3))
    >>> trainer.fit(module, datamodule=dm)      # logs train/loss, val/auroc, val/accuracy, val/sensitivity@90spec…

The batches arrive already normalized (see `PatchDataModule.on_after_batch_transfer`), so `forward` is the bare
network — the module `load_model` hands to extraction sees exactly what training saw.

Auxiliary concept targets (opt-in, `aux_concepts`): besides the class, each patch may carry 0/1 targets "this concept
is present in the patch" (CBIS-DDSM annotates every lesion with its type and mass margin, BI-RADS descriptors). A
linear head on the globally pooled (average and max) maps of one layer of the network (`aux_layer`, read with a
forward hook) predicts them with a binary cross-entropy added to the loss (× `aux_weight`). The head lives in this
module, not in the network: the network that is saved and registered stays a plain (batch, 1, y, x) → (batch, 2)
classifier. Batches then hold labels of shape (batch, 1 + concepts): the class first (see `ConceptTargetDataset`).

Dense concept targets (opt-in, `aux_masks`): the image-level targets say *whether* a concept is in the patch, not
*where*; a unit that fires on the whole mass then serves "mass" and "spiculated margin" alike. With `aux_masks`, a
1×1 convolution on the same layer's maps predicts, at every map cell, the fraction of the cell that the concept's
ground-truth mask covers (the manifest's mask, area-downsampled to the map grid; 0 where the patch has no mask of
the concept), with a soft binary cross-entropy (× `aux_mask_weight`). Batches then carry a third tensor, float
(batch, concept, my, mx), which the data module flips and turns with its patch.

Concept units (opt-in, `aux_mask_units` = n > 0, with `aux_masks`): instead of that convolution reading every unit,
n units of the layer per concept are each asked, on their own (a scale and a bias per unit, no other unit), whether
each map cell touches the concept — a binary target, its positives weighted by the batch's ratio of negative to
positive cells (at most MAX_POSITIVE_WEIGHT: a margin or a calcification touches 1–3 % of the cells). The network
then has units known to detect each concept, alongside whatever the others learn. Soft coverage targets did not
work here: units asked for the small coverage of specks and rims fell silent (measured in training/configs/demo.yaml).
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

MAX_POSITIVE_WEIGHT = 10.0  # concept units: the largest weight of a positive cell in the binary cross-entropy

__all__ = ["OptimConfig", "ClassifierModule", "ConceptTargetDataset", "concept_targets", "concept_masks", "SPLITS",
           "SENSITIVITY_KEY", "SPECIFICITY"]

SPLITS = ("train", "val", "test")
SENSITIVITY_KEY = "sens_at_90spec"  # mlflow metric names allow no "@"
SPECIFICITY = 0.9  # the operating point of SENSITIVITY_KEY, marked on every ROC figure


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
        SENSITIVITY_KEY: BinarySensitivityAtSpecificity(min_specificity=SPECIFICITY),
    }, compute_groups=False)


def concept_targets(records, concepts) -> torch.Tensor:
    """long (record, concept): 1 where the record (a manifest PatchRecord) has a mask of the concept, else 0."""
    return torch.tensor([[int(c in r.masks) for c in concepts] for r in records], dtype=torch.long).reshape(
        len(records), len(concepts))


def concept_masks(records, concepts, grid: tuple[int, int]) -> torch.Tensor:
    """float32 (record, concept, gy, gx): the fraction of each cell of a `grid` laid over the patch that the record's
    mask of the concept covers (area downsampling; all zero where the record has no mask of the concept)."""
    from .datamodule import load_patch

    out = torch.zeros(len(records), len(concepts), *grid)
    for i, r in enumerate(records):
        for j, c in enumerate(concepts):
            if c in r.masks:
                m = torch.from_numpy(load_patch(r.masks[c]) > 0).float()  # (y, x) 0/1
                out[i, j] = F.adaptive_avg_pool2d(m[None, None], grid)[0, 0]
    return out


class ConceptTargetDataset(torch.utils.data.Dataset):
    """A patch dataset whose label is long (1 + concepts,): the class, then the concepts' presence in the patch.

    With `mask_concepts` (and the map `grid`), each item also carries the dense targets float (mask concept, gy, gx)
    of `concept_masks`, read once into memory: items are then (image, label, masks).
    """

    def __init__(self, base, concepts, *, mask_concepts=(), grid: tuple[int, int] | None = None):
        self.base = base  # training.datamodule.PatchDataset
        self.records = base.records
        self.labels = base.labels  # (image,) the class alone, for label counts
        self.images = base.images
        self.targets = torch.cat([base.labels[:, None], concept_targets(base.records, concepts)], dim=1)
        self.masks = None  # float (image, mask concept, gy, gx)
        if mask_concepts:
            if grid is None:
                raise ConfigError("ConceptTargetDataset: mask_concepts need the map grid (gy, gx)")
            self.masks = concept_masks(base.records, tuple(mask_concepts), tuple(grid))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, _ = self.base[i]
        if self.masks is None:
            return img, self.targets[i]
        return img, self.targets[i], self.masks[i]


def concept_units(aux_masks, units: int, channels: int, layer: str) -> int:
    """How many units of `layer` (with `channels` units) are concept units: `units` for each of `aux_masks`;
    ConfigError when the layer has fewer."""
    n = len(aux_masks or ()) * int(units)
    if n > int(channels):
        raise ConfigError(f"aux_mask_units: {units} units for each of {len(aux_masks)} concepts, but {layer!r} has "
                          f"{channels} units")
    return n


class ClassifierModule(L.LightningModule):
    """normal-vs-lesion classifier around any network mapping (batch, 1, y, x) to (batch, 2) logits.

    With `aux_concepts` (and `aux_layer`, a module name of `net` whose output is (batch, channel, y, x)), an auxiliary
    linear head predicts each concept's presence from that layer's pooled maps; with `aux_masks`, a 1×1 convolution
    predicts each concept's coverage of every map cell (see the module docstring).
    """

    def __init__(self, net: nn.Module, *, optim: OptimConfig | None = None, aux_concepts=(),
                 aux_layer: str | None = None, aux_weight: float = 1.0, aux_channels: int | None = None,
                 aux_masks=(), aux_mask_weight: float = 1.0, aux_mask_units: int = 0):
        super().__init__()
        self.net = net
        self.optim = optim or OptimConfig()
        self.aux_concepts = tuple(aux_concepts or ())
        self.aux_weight = float(aux_weight)
        self.aux_masks = tuple(aux_masks or ())
        self.aux_mask_weight = float(aux_mask_weight)
        self.aux_mask_units = int(aux_mask_units)
        self.aux_head = None
        self.aux_mask_head = None
        self._aux_maps = None
        self._aux_hook = None
        if self.aux_concepts or self.aux_masks:
            modules = dict(net.named_modules())
            if aux_layer not in modules or not aux_channels:
                raise ConfigError(f"aux_layer {aux_layer!r} is not a module of the network (or has no channels)")
            if self.aux_concepts:
                self.aux_head = nn.Linear(2 * int(aux_channels), len(self.aux_concepts))
            n = concept_units(self.aux_masks, self.aux_mask_units, aux_channels, aux_layer)
            if n:  # a scale and a bias per concept unit, starting as "firing means the concept is there"
                self.aux_mask_head = nn.Conv2d(n, n, kernel_size=1, groups=n)
                nn.init.constant_(self.aux_mask_head.weight, 1.0)
                nn.init.constant_(self.aux_mask_head.bias, -3.0)
            elif self.aux_masks:
                self.aux_mask_head = nn.Conv2d(int(aux_channels), len(self.aux_masks), kernel_size=1)
            self._aux_hook = modules[aux_layer].register_forward_hook(self._keep_maps)
        # one metric object per split ("train" itself is taken: nn.Module.train)
        self.metrics = nn.ModuleDict({f"{s}_split": _split_metrics() for s in SPLITS})
        self.losses = nn.ModuleDict({f"{s}_split": MeanMetric() for s in SPLITS})
        self.test_curves = nn.ModuleDict({"roc": BinaryROC(), "confusion": BinaryConfusionMatrix()})
        self.test_summary: dict | None = None  # ROC points and confusion matrix of the last test run
        self.train_images = 0  # patches seen by training steps on this rank (throughput)

    def _keep_maps(self, _module, _inp, out):
        self._aux_maps = out  # (batch, channel, y, x) of aux_layer, for the auxiliary head

    def remove_aux_hook(self) -> None:
        """Detach the auxiliary head's hook from the network (after training: the saved network carries none)."""
        if self._aux_hook is not None:
            self._aux_hook.remove()
            self._aux_hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, y, x) → (batch, class)
        return self.net(x)

    def model_step(self, batch, split: str) -> torch.Tensor:
        # float (batch, 1, y, x), long (batch,) or (batch, 1 + aux concepts), optionally float (batch, mask, my, mx)
        x, y, *masks = batch
        aux = None
        if y.ndim == 2:
            y, aux = y[:, 0], y[:, 1:]
        logits = self(x)  # (batch, class)
        loss = F.cross_entropy(logits, y, label_smoothing=self.optim.label_smoothing if split == "train" else 0.0)
        prob = logits.detach().float().softmax(1)[:, 1]  # (batch,) P(lesion)
        self.metrics[f"{split}_split"].update(prob, y)
        if split == "test":
            self.test_curves["roc"].update(prob, y)
            self.test_curves["confusion"].update(prob, y)
        self.losses[f"{split}_split"].update(loss.detach(), weight=len(y))  # the class loss alone
        if aux is not None and self.aux_head is not None and self._aux_maps is not None:
            m = self._aux_maps
            pooled = torch.cat([m.mean(dim=(2, 3)), m.amax(dim=(2, 3))], dim=1)  # (batch, 2 channel)
            aux_loss = F.binary_cross_entropy_with_logits(self.aux_head(pooled), aux.float())
            loss = loss + self.aux_weight * aux_loss
        if masks and self.aux_mask_head is not None and self._aux_maps is not None:
            target, weight = masks[0].float(), None
            if self.aux_mask_units:  # each concept unit on its own: (batch, concept × units, my, mx)
                pred = self.aux_mask_head(self._aux_maps[:, :len(self.aux_masks) * self.aux_mask_units])
                target = (target > 0).float().repeat_interleave(self.aux_mask_units, dim=1)
                share = target.mean(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)  # positive cells per concept
                weight = torch.where(target > 0, ((1 - share) / share).clamp(max=MAX_POSITIVE_WEIGHT), 1.0)
            else:
                pred = self.aux_mask_head(self._aux_maps)  # (batch, mask concept, my, mx) logits
            if pred.shape != target.shape:
                raise ConfigError(f"dense concept targets of shape {tuple(masks[0].shape)} do not match the aux "
                                  f"layer's maps {tuple(pred.shape)} (batch, concept, y, x)")
            loss = loss + self.aux_mask_weight * F.binary_cross_entropy_with_logits(pred, target, weight=weight)
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
        heads = [h for h in (self.aux_head, self.aux_mask_head) if h is not None]
        for p in (*self.net.parameters(), *(p for h in heads for p in h.parameters())):
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
