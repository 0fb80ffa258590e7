"""Model zoo written for ConceptLens (no torchvision): a VGG with batch norm, a small ResNet, and user factories.

    >>> from training.zoo import build_model, ModelSpec
    >>> spec = ModelSpec(zoo="vgg_bn", config={"widths": [16, 32, 64, 128]})
    >>> net = build_model(spec)                      # nn.Module: float32 (batch, 1, y, x) → logits (batch, 2)
    >>> default_layers(net, (64, 64))                # ['features.12', 'features.19', 'features.26'] (32, 16, 8 px)

Layer names follow torchvision's conventions (`features.N` for VGG, `layer4.1` for ResNet) so that the one dotted
name of a layer (DESIGN.md §1) reads the same as in the papers and tools people already know.
A user network is named by import path, `package.module:factory`, called with keyword arguments from the config;
it must return an nn.Module that maps (batch, 1, y, x) to (batch, 2) logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "VGGConfig", "vgg_bn", "ResNetConfig", "resnet", "ModelSpec", "build_model", "default_layers", "ZOO",
    "code_version",
]


# -- VGG with batch norm ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VGGConfig:
    """Blocks of `convs` 3×3 conv → BN → ReLU, a 2×2 max-pool between blocks, global average pooling, a linear head.

    With widths (16, 32, 64, 128) a 64×64 patch gives maps of 64, 32, 16 and 8 pixels: the deepest block stays at
    8×8 so Network Dissection still has a spatial map to threshold (no pool after the last block, unlike VGG16).
    `pool_before_last=False` keeps the last block at the resolution of the one before (16×16 here): the max-pool
    between them becomes an identity, so every layer keeps its name (`features.N`).
    """

    widths: tuple[int, ...] = (16, 32, 64, 128)
    convs: tuple[int, ...] | int = 2  # convs per block (one number for all blocks)
    in_channels: int = 1
    num_classes: int = 2
    dropout: float = 0.0
    pool_last: bool = False
    pool_before_last: bool = True  # False: no 2×2 max-pool between the last two blocks (a finer deepest map)
    head: str = "avg"  # global pooling before the linear head: avg | max | avgmax (both, concatenated)

    def __post_init__(self):
        _check_head(self.head, "VGGConfig")
        convs = (self.convs,) * len(self.widths) if isinstance(self.convs, int) else tuple(self.convs)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "convs", tuple(int(c) for c in convs))
        if not self.widths or len(self.convs) != len(self.widths) or min(self.convs) < 1 or min(self.widths) < 1:
            raise ConfigError(f"VGGConfig: widths {self.widths} and convs {self.convs} must be positive, same length")


class VGG(nn.Module):
    def __init__(self, config: VGGConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for b, (width, n) in enumerate(zip(config.widths, config.convs)):
            if b > 0:
                keep = b == len(config.widths) - 1 and not config.pool_before_last
                layers.append(nn.Identity() if keep else nn.MaxPool2d(2))
            for _ in range(n):
                # bias is redundant before batch norm
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                c_in = width
        if config.pool_last:
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = _global_pool(config.head)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout),
                                        nn.Linear(c_in * _pool_factor(config.head), config.num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, y, x) → (batch, class)
        return self.classifier(self.pool(self.features(x)))

    def block_outputs(self) -> list[str]:
        """Names of the ReLU that ends each conv block, shallow to deep."""
        names, i = [], 0
        for n in self.config.convs:
            i += 3 * n  # conv, bn, relu per conv
            names.append(f"features.{i - 1}")
            i += 1  # the max-pool that follows
        return names


def vgg_bn(config: VGGConfig | None = None, **kwargs) -> VGG:
    """`vgg_bn(VGGConfig(widths=(16, 32, 64)))` or `vgg_bn(widths=[16, 32, 64])`."""
    return VGG(config or VGGConfig(**kwargs))


# -- ResNet ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResNetConfig:
    """A CIFAR-style ResNet: 3×3 stem, stages of basic blocks (stride 2 from the second stage), GAP, linear head.

    `stem_pool` adds a stride-2 max-pool after the stem for inputs larger than 64 px.
    """

    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] | int = 1  # basic blocks per stage
    in_channels: int = 1
    num_classes: int = 2
    stem_pool: bool = False
    head: str = "avg"  # global pooling before the linear head: avg | max | avgmax

    def __post_init__(self):
        _check_head(self.head, "ResNetConfig")
        blocks = (self.blocks,) * len(self.widths) if isinstance(self.blocks, int) else tuple(self.blocks)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "blocks", tuple(int(b) for b in blocks))
        if not self.widths or len(self.blocks) != len(self.widths) or min(self.blocks) < 1 or min(self.widths) < 1:
            raise ConfigError(f"ResNetConfig: widths {self.widths} and blocks {self.blocks} must be positive")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()  # a second module (not a reused one) so a hook on it fires once per forward
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, c_in, y, x) → (batch, c_out, y/stride, x/stride)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        w0 = config.widths[0]
        self.conv1 = nn.Conv2d(config.in_channels, w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2) if config.stem_pool else nn.Identity()
        c_in = w0
        for s, (width, n) in enumerate(zip(config.widths, config.blocks), start=1):
            blocks = [BasicBlock(c_in if i == 0 else width, width, 2 if (i == 0 and s > 1) else 1) for i in range(n)]
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            c_in = width
        self.avgpool = _global_pool(config.head)  # torchvision's name, whichever pooling
        self.fc = nn.Linear(c_in * _pool_factor(config.head), config.num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, y, x) → (batch, class)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, len(self.config.widths) + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def block_outputs(self) -> list[str]:
        """Names of each stage's last block (its output is the block's final ReLU), shallow to deep."""
        return [f"layer{s}.{n - 1}" for s, n in enumerate(self.config.blocks, start=1)]


def resnet(config: ResNetConfig | None = None, **kwargs) -> ResNet:
    """`resnet(ResNetConfig(widths=(16, 32, 64), blocks=2))` or `resnet(widths=[16, 32, 64])`."""
    return ResNet(config or ResNetConfig(**kwargs))


HEADS = ("avg", "max", "avgmax")


def _check_head(head: str, where: str) -> None:
    if head not in HEADS:
        raise ConfigError(f"{where}: head {head!r} is not one of {', '.join(HEADS)}")


class AvgMaxPool(nn.Module):
    """Global average and global max pooling side by side: (batch, c, y, x) → (batch, 2c, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)], dim=1)


def _pool_factor(head: str) -> int:
    return 2 if head == "avgmax" else 1


def _global_pool(head: str) -> nn.Module:
    # max pooling makes a unit answer "is my pattern anywhere in the patch": a small lesion is not averaged away,
    # and the units' maps stay local, which is what dissection thresholds; average pooling rewards a unit for
    # covering the whole lesion (a mass's body); avgmax gives the head both, so each unit can serve either role
    if head == "avgmax":
        return AvgMaxPool()
    return nn.AdaptiveMaxPool2d(1) if head == "max" else nn.AdaptiveAvgPool2d(1)


def _init_weights(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -- spec: what a saved model is, as data ----------------------------------------------------------------------------
ZOO = {"vgg_bn": (vgg_bn, VGGConfig), "resnet": (resnet, ResNetConfig)}


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build: a zoo name with its config, or a user factory `package.module:factory` with kwargs.

    The spec is JSON-serialisable (`to_dict`/`from_dict`); a saved model is this spec plus a state dict.
    """

    zoo: str | None = "vgg_bn"
    config: dict = field(default_factory=dict)
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.zoo is None) == (self.factory is None):
            raise ConfigError(f"model: give exactly one of zoo ({self.zoo!r}) or factory ({self.factory!r})")
        if self.zoo is not None and self.zoo not in ZOO:
            raise ConfigError(f"model.zoo: unknown network {self.zoo!r} (known: {', '.join(sorted(ZOO))})")
        if self.factory is not None and (":" not in self.factory or self.factory.count(":") != 1):
            raise ConfigError(f"model.factory: {self.factory!r} is not 'package.module:function'")
        if self.zoo is not None:
            cfg_cls = ZOO[self.zoo][1]
            known = {f.name for f in dataclasses.fields(cfg_cls)}
            unknown = sorted(set(self.config) - known)
            if unknown:
                raise ConfigError(f"model.config: unknown key(s) {unknown} for {self.zoo} (known: {sorted(known)})")

    def to_dict(self) -> dict:
        if self.zoo is not None:
            return {"zoo": self.zoo, "config": _jsonable(dataclasses.asdict(self.zoo_config()))}
        return {"factory": self.factory, "kwargs": _jsonable(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        unknown = sorted(set(d) - {"zoo", "config", "factory", "kwargs"})
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown}")
        if "factory" in d and d["factory"] is not None:
            return cls(zoo=None, factory=d["factory"], kwargs=dict(d.get("kwargs") or {}))
        return cls(zoo=d.get("zoo", "vgg_bn"), config=dict(d.get("config") or {}))

    def zoo_config(self):
        _, cfg_cls = ZOO[self.zoo]
        return cfg_cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in self.config.items()})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build_model(spec: ModelSpec, *, trusted_factories: tuple[str, ...] | None = None) -> nn.Module:
    """Build the network of a spec. A user factory is imported only when `trusted_factories` is None (the caller's
    own config) or names it (a spec read from a file: see `training.registry.load_model`)."""
    if spec.zoo is not None:
        fn, _ = ZOO[spec.zoo]
        return fn(spec.zoo_config())
    if trusted_factories is not None and not any(_matches(spec.factory, t) for t in trusted_factories):
        from .errors import UntrustedModelError

        raise UntrustedModelError(
            f"model spec names user factory {spec.factory!r}, which is not trusted; pass trusted_factories="
            f"[{spec.factory!r}] or list it in CONCEPTLENS_TRUSTED_FACTORIES"
        )
    fn = _import_factory(spec.factory)
    try:
        net = fn(**spec.kwargs)
    except TypeError as e:
        raise ConfigError(f"model.factory {spec.factory!r}: cannot call with kwargs {spec.kwargs} ({e})") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.factory {spec.factory!r} returned {type(net).__name__}, not a torch nn.Module")
    return net


def _matches(factory: str, trusted: str) -> bool:
    """'pkg.mod:fn' matches itself, 'pkg.mod' (any function there) and 'pkg' (anything below it)."""
    module = factory.partition(":")[0]
    return factory == trusted or module == trusted or module.startswith(trusted + ".")


def _import_factory(path: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.factory {path!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"model.factory {path!r}: {module_name} has no callable {attr!r}")
    return fn


def default_layers(net: nn.Module, input_size: tuple[int, int], *, count: int = 3, min_size: int = 8) -> list[str]:
    """Dotted names of the block outputs (post-ReLU) to extract: the deepest `count` whose maps are ≥ min_size px.

    Zoo networks name their blocks; for any other network the ReLU modules are traced on a zero input and the last
    ReLU of each spatial resolution stands for that block.
    """
    shapes = _output_shapes(net, input_size)
    if hasattr(net, "block_outputs"):
        candidates = [n for n in net.block_outputs() if n in shapes]
    else:
        relus = [n for n, m in net.named_modules() if isinstance(m, nn.ReLU) and n in shapes]
        candidates = []
        for i, n in enumerate(relus):
            nxt = relus[i + 1] if i + 1 < len(relus) else None
            if nxt is None or shapes[nxt][-2:] != shapes[n][-2:]:
                candidates.append(n)
    candidates = [n for n in candidates if len(shapes[n]) == 4 and min(shapes[n][-2:]) >= min_size]
    return candidates[-count:]


def _output_shapes(net: nn.Module, input_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Output shape of every module that is called exactly once by one forward pass of a (1, 1, y, x) input."""
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def fn(_m, _inp, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 1, *input_size))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return {n: s for n, s in shapes.items() if calls.get(n) == 1}


def code_version(spec: ModelSpec) -> str:
    """Hash of the code that defines the network and how it is trained (part of the reuse key in `fit`)."""
    here = Path(__file__).resolve().parent
    files = [here / f for f in ("zoo.py", "module.py", "datamodule.py", "transforms.py")]
    if spec.factory is not None:
        try:
            files.append(Path(inspect.getfile(_import_factory(spec.factory))))
        except (TypeError, OSError):
            pass
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]
