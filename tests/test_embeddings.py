"""Unit and image maps: exact small cases, then computed once on a real-data store, cached and read back unchanged."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from explain.embeddings import (
    KINDS, MapConfig, compute_maps, image_features, main, pca_coords, read_maps, unit_groups, unit_profiles,
)
from explain.errors import ExplainError, UnknownLayerError
from explain.labelrules import count_unit_mask_areas, unit_mask_areas
from store.errors import ActivationStoreError

torch.set_num_threads(1)


def test_profiles_are_standardized():
    pooled = np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 4.0]])  # (image, unit)
    np.testing.assert_allclose(unit_profiles(pooled), [[-1, 1], [0, 0], [-1, 1]])
    np.testing.assert_allclose(image_features(pooled), [[-1, 0, -1], [1, 0, 1]])


def test_pca_is_deterministic_with_a_sign_convention():
    t = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    x = np.stack([-t, -2 * t], axis=1)  # points on the line through (1, 2)
    coords, ratio = pca_coords(x, 2)
    # the loading (-1, -2)/√5 would be the SVD's other choice: the convention makes the largest loading positive
    np.testing.assert_allclose(coords[:, 0], -t * np.sqrt(5), atol=1e-6)
    np.testing.assert_allclose(coords[:, 1], 0, atol=1e-6)
    np.testing.assert_allclose(ratio, [1.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(pca_coords(-x, 2)[0][:, 0], -pca_coords(x, 2)[0][:, 0])
    assert pca_coords(np.ones((1, 3)), 2)[0].shape == (1, 2)


def test_unit_groups_from_co_firing():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    profiles = np.stack([a, a + 0.1 * rng.normal(size=50), 2 * a + 1, b, b + 0.2 * rng.normal(size=50),
                         np.full(50, 3.0), -a])  # (unit, image)
    groups = unit_groups(profiles, distance=0.5)
    assert groups.tolist() == [0, 0, 0, 1, 1, 2, 3]  # biggest first; constant and anti-correlated units alone
    assert unit_groups(profiles[:1]).tolist() == [0]
    # a looser cut merges everything that is not anti-correlated (a and b are independent: distance ≈ 1)
    assert len(set(unit_groups(profiles, distance=1.2).tolist())) < len(set(groups.tolist()))


@pytest.fixture(scope="module")
def lesion(tmp_path_factory, real_dicoms):
    from helpers_probes import build_lesion_store

    return build_lesion_store(tmp_path_factory.mktemp("maps") / "lesion.zarr", real_dicoms[0])


def test_maps_are_computed_once_cached_and_stable(lesion):
    from store.activations import open_store

    store, layer = lesion.store, lesion.layers[-1]
    units = store.layer_shape(layer)[0]
    assert read_maps(store, layer) == {} and store.mask_areas(layer, 0.99) is None
    done = compute_maps(store, layers=[layer])
    assert done == {layer: [*KINDS, "mask_area"]}
    maps = read_maps(store, layer)
    assert maps["unit_pca"].shape == (units, 2) and maps["unit_umap"].shape == (units, 2)
    assert maps["image_pca"].shape == (store.n_images, 2) and maps["image_umap"].shape == (store.n_images, 2)
    assert maps["unit_groups"].shape == (units,) and maps["unit_groups"].min() == 0
    assert np.isfinite(maps["unit_umap"]).all() and np.isfinite(maps["image_umap"]).all()
    # lesion and normal patches separate on the image map's first component (the network was trained on that)
    from explain.probes import auroc

    a = auroc(store.labels(), maps["image_pca"][:, 0])
    assert max(a, 1 - a) > 0.8
    # cached: nothing recomputed; a reopened store (a restart) reads identical coordinates
    assert compute_maps(store, layers=[layer]) == {layer: []}
    reopened = open_store(lesion.url)
    again = read_maps(reopened, layer)
    for kind in KINDS:
        np.testing.assert_array_equal(again[kind], maps[kind])
    # the unit mask areas: counted from the maps once, then read from the store by the dataset labeling rule
    areas = count_unit_mask_areas(store, layer)
    assert areas.shape == (store.n_images, units) and areas.dtype == np.int32 and areas.max() > 0
    np.testing.assert_array_equal(reopened.mask_areas(layer, 0.99), areas)
    with mock.patch("explain.labelrules.count_unit_mask_areas", side_effect=AssertionError("recounted")):
        np.testing.assert_array_equal(unit_mask_areas(reopened, layer), areas)
    # recomputing from scratch gives the same numbers (fixed seeds, deterministic PCA)
    compute_maps(store, layers=[layer], force=True)
    for kind in KINDS:
        np.testing.assert_array_equal(read_maps(store, layer)[kind], maps[kind])
    attrs = store.embedding_attrs(layer, "unit_umap")
    assert attrs["method"] == "umap" and attrs["params"]["seed"] == 0
    # other parameters → recomputed
    assert compute_maps(store, layers=[layer], kinds=["unit_groups"], config=MapConfig(group_distance=0.3)) == \
        {layer: ["unit_groups"]}


def test_maps_errors_and_cli(lesion, capsys):
    store = lesion.store
    with pytest.raises(UnknownLayerError, match="layer9"):
        compute_maps(store, layers=["layer9"])
    with pytest.raises(UnknownLayerError):
        read_maps(store, "layer9")
    with pytest.raises(ExplainError, match="unknown map kind"):
        compute_maps(store, kinds=["unit_tsne"])
    layer = lesion.layers[0]
    assert main(["--store", lesion.url, "--layers", layer, "--kinds", "unit_pca", "image_pca"]) == 0
    assert "3 map(s) computed" in capsys.readouterr().out  # the two kinds and the unit mask areas
    assert set(read_maps(store, layer)) >= {"unit_pca", "image_pca"}
    assert main(["--store", str(lesion.url) + "-missing"]) == 1
    assert "error:" in capsys.readouterr().err


def test_mask_areas_bad_input_is_refused_and_changes_nothing(lesion):
    from store.activations import open_store

    store, layer = lesion.store, lesion.layers[0]
    areas = count_unit_mask_areas(store, layer)
    store.write_mask_areas(layer, 0.99, areas)
    n, units = areas.shape
    h, w = store.attrs["input_size"]
    for bad, message in [(areas[:-1], "shaped"), (areas.astype(np.float32), "integer"), (areas - 1, "0 …"),
                         (np.full_like(areas, h * w + 1), "0 …")]:
        with pytest.raises(ValueError, match=message):
            store.write_mask_areas(layer, 0.99, bad)
    with pytest.raises(ValueError, match="quantile levels"):
        store.write_mask_areas(layer, 0.97, areas)
    with pytest.raises(ActivationStoreError, match="read-only"):
        open_store(lesion.url).write_mask_areas(layer, 0.99, areas)
    np.testing.assert_array_equal(open_store(lesion.url).mask_areas(layer, 0.99), areas)
