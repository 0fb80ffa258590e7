"""Unit and image maps: PCA and UMAP of activation profiles, and groups of units that fire together.

    >>> from explain.embeddings import compute_maps, read_maps
    >>> compute_maps(store, layers=["features.13"])          # once (python -m explain maps --store demo), cached
    >>> m = read_maps(store, "features.13")                   # at app time: only reads the cache
    >>> m["unit_umap"].shape, m["unit_groups"].shape, m["image_pca"].shape   # (unit, 2), (unit,), (image, 2)

Inputs: the store's pooled max activations (image, unit) of a layer.
- Unit map: each unit's profile is its max activation on every image, (unit, image), standardized over images
  (z-scores; a unit that never varies gets a zero profile). Two units close on the map fire on the same images.
- Image map: each image's pooled vector (image, unit), every unit standardized over images.
- Unit groups (NeuroCartography-style): average-linkage agglomerative clustering of the unit profiles on
  correlation distance 1 − r, cut at `group_distance` (0.5, i.e. r ≥ 0.5 on average inside a group); groups are
  numbered by size, largest first (ties: lowest unit index first); a unit that never varies is a group of its own.

Everything is deterministic: PCA by SVD with a fixed sign convention (the largest loading of each component is
positive), UMAP with a fixed `random_state` (single-threaded). Results are written once into the store
(`layers/<layer>/embedding/<kind>`, attrs with the parameters) and `read_maps` returns them unchanged; nothing is
computed at app start. Each unit's mask area on every image (`layers/<layer>/mask_area/0.99`) is cached beside them,
for the dataset labeling rule. UMAP (numba) takes a few seconds to compile on first use: run `python -m explain maps`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .dissection import DEFAULT_LEVEL
from .errors import ExplainError, UnknownLayerError
from .labelrules import count_unit_mask_areas

__all__ = ["MapConfig", "KINDS", "unit_profiles", "image_features", "pca_coords", "umap_coords", "unit_groups",
           "compute_maps", "read_maps", "main"]

KINDS = ("unit_pca", "unit_umap", "unit_groups", "image_pca", "image_umap")


@dataclass(frozen=True)
class MapConfig:
    """Parameters of the maps; stored with each cached embedding."""

    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0
    components: int = 2
    group_distance: float = 0.5  # correlation distance (1 − r) at which the unit dendrogram is cut
    stat: str = "max"  # pooled statistic used as the profile: "max" or "mean"


def _standardize(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=axis, keepdims=True)
    std = x.std(axis=axis, keepdims=True)
    return np.where(std > 1e-12, (x - mean) / np.where(std > 1e-12, std, 1.0), 0.0)


def unit_profiles(pooled: np.ndarray) -> np.ndarray:
    """pooled (image, unit) → standardized unit profiles (unit, image) float64 (each row: mean 0, std 1 or all 0)."""
    return _standardize(np.asarray(pooled).T, axis=1)


def image_features(pooled: np.ndarray) -> np.ndarray:
    """pooled (image, unit) → (image, unit) with every unit standardized over images."""
    return _standardize(pooled, axis=0)


def pca_coords(x: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic PCA: (n, d) → (coords (n, c) float32, explained variance ratio (c,)).

    Components whose largest-magnitude loading is negative are flipped, so the result does not depend on the
    SVD routine's sign choice; missing components (n or d smaller than c) are zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(n_components, len(s))
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    signs[signs == 0] = 1
    coords = np.zeros((x.shape[0], n_components))
    coords[:, :k] = u[:, :k] * s[:k] * signs
    total = float((s ** 2).sum())
    ratio = np.zeros(n_components)
    ratio[:k] = (s[:k] ** 2) / total if total > 0 else 0.0
    return coords.astype(np.float32), ratio


def umap_coords(x: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                n_components: int = 2) -> np.ndarray:
    """UMAP (umap-learn, fixed random_state) of (n, d) → (n, c) float32; PCA for fewer than 5 rows."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] < 5:
        return pca_coords(x, n_components)[0]
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap's notes about random_state disabling parallelism, etc.
        reducer = umap.UMAP(n_neighbors=min(n_neighbors, x.shape[0] - 1), min_dist=min_dist, random_state=seed,
                            n_components=n_components, n_jobs=1, init="spectral")
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def unit_groups(profiles: np.ndarray, *, distance: float = 0.5) -> np.ndarray:
    """Group ids (unit,) int64 from average-linkage clustering on correlation distance, largest group = 0.

        >>> unit_groups(unit_profiles(store.pooled("features.13")))
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    z = _standardize(profiles, axis=1)  # (unit, image)
    n_units, n_images = z.shape
    if n_units == 1:
        return np.zeros(1, np.int64)
    flat = ~np.any(z != 0, axis=1)
    d = 1.0 - (z @ z.T) / max(n_images, 1)  # correlation distance (unit, unit)
    d[flat, :] = 1.0
    d[:, flat] = 1.0
    np.fill_diagonal(d, 0.0)
    d = np.clip((d + d.T) / 2, 0.0, 2.0)
    raw = fcluster(linkage(squareform(d, checks=False), method="average"), t=distance, criterion="distance")
    raw = np.where(flat, raw.max() + 1 + np.arange(n_units), raw)  # a unit that never varies stands alone
    ids, first, sizes = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))  # biggest first, then by the lowest unit index in the group
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    return rank[np.searchsorted(ids, raw)]


def _compute(pooled: np.ndarray, kind: str, config: MapConfig) -> tuple[np.ndarray, dict]:
    if kind.startswith("unit_"):
        x = unit_profiles(pooled)
    else:
        x = image_features(pooled)
    if kind == "unit_groups":
        return unit_groups(x, distance=config.group_distance)[:, None].astype(np.float32), {
            "method": "average-linkage on correlation distance", "distance": config.group_distance}
    if kind.endswith("_pca"):
        coords, ratio = pca_coords(x, config.components)
        return coords, {"method": "pca", "explained_variance_ratio": [float(r) for r in ratio]}
    coords = umap_coords(x, n_neighbors=config.n_neighbors, min_dist=config.min_dist, seed=config.seed,
                         n_components=config.components)
    return coords, {"method": "umap", "n_neighbors": config.n_neighbors, "min_dist": config.min_dist,
                    "seed": config.seed}


def compute_maps(store, *, layers: Sequence[str] | None = None, kinds: Sequence[str] = KINDS,
                 config: MapConfig | None = None, force: bool = False, mask_areas: bool = True,
                 progress: Callable[[str, str], None] | None = None) -> dict[str, list[str]]:
    """Compute and cache the maps of each layer (store opened writable); returns layer → kinds computed now.

    Cached kinds made with the same parameters are kept unless `force`; `progress(layer, kind)` is called first.
    With `mask_areas`, each unit's mask area on every image at the dissection level is cached too (kind
    "mask_area": what the dataset labeling rule reads, explain.labelrules.unit_mask_areas).
    """
    config = config or MapConfig()
    layers = list(store.layers if layers is None else layers)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ExplainError(f"unknown map kind(s) {bad} (known: {', '.join(KINDS)})")
    params = {**asdict(config)}
    done: dict[str, list[str]] = {}
    for layer in layers:
        if layer not in store.layers:
            raise UnknownLayerError(layer, known=store.layers, where=str(store.url))
        pooled = store.pooled(layer, config.stat)  # (image, unit)
        done[layer] = []
        have = set(store.embeddings(layer))
        for kind in kinds:
            if not force and kind in have and store.embedding_attrs(layer, kind).get("params") == params:
                continue
            if progress:
                progress(layer, kind)
            coords, attrs = _compute(pooled, kind, config)
            store.write_embedding(layer, kind, coords, over=kind.split("_")[0],
                                  attrs={**attrs, "params": params, "input": f"pooled {config.stat}, standardized"})
            done[layer].append(kind)
        if mask_areas and (force or store.mask_areas(layer, DEFAULT_LEVEL) is None):
            if progress:
                progress(layer, "mask_area")
            store.write_mask_areas(layer, DEFAULT_LEVEL, count_unit_mask_areas(store, layer, DEFAULT_LEVEL))
            done[layer].append("mask_area")
    return done


def read_maps(store, layer: str) -> dict[str, np.ndarray]:
    """The cached maps of a layer: {'unit_pca': (unit, 2), 'unit_umap': …, 'unit_groups': (unit,) int64, …}.

    Only what was computed is returned (an empty dict before `compute_maps`); nothing is computed here.
    """
    if layer not in store.layers:
        raise UnknownLayerError(layer, known=store.layers, where=str(store.url))
    out = {}
    for kind in store.embeddings(layer):
        if kind in KINDS:
            arr = store.embedding(layer, kind)
            out[kind] = arr[:, 0].astype(np.int64) if kind == "unit_groups" else arr
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m explain maps --store demo`: compute and cache the unit and image maps of a store."""
    from store.activations import open_store
    from store.errors import StoreError
    from store.settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m explain maps", description=main.__doc__)
    ap.add_argument("--store", default="demo", help="store name (demo → <workspace>/stores/demo.zarr), path or URL")
    ap.add_argument("--layers", nargs="*", default=None, help="layers (default: every layer of the store)")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--force", action="store_true", help="recompute even when cached with the same parameters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workspace", default=None)
    args = ap.parse_args(argv)
    settings = load_settings(args.workspace)
    url = settings.store_url(args.store)
    try:
        store = open_store(url, read_only=False)
        t0 = time.perf_counter()
        done = compute_maps(store, layers=args.layers, kinds=args.kinds, config=MapConfig(seed=args.seed),
                            force=args.force, progress=lambda l, k: print(f"  {l}: {k}", flush=True))
    except (StoreError, ExplainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(len(v) for v in done.values())
    print(f"{url}: {n} map(s) computed in {time.perf_counter() - t0:.1f} s, the others were cached")
    return 0
