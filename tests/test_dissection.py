"""Network Dissection IoU: hand-set maps with IoUs checked by hand, the fast path against the per-unit reference on
random maps and on real stored activations (real CBIS-DDSM patches through a small network), and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers_dissection import build_real_store

from explain.dissection import (
    DatasetIoU,
    UnitIoU,
    UpsampleGrid,
    mask_counts,
    reference_unit_iou,
    region_iou,
    unit_masks,
    upsample_maps,
)
from explain.errors import RegionError, UnknownImageError, UnknownLayerError
from explain.regions import Polygon, Rect, rasterize_regions

torch.set_num_threads(1)


# -- hand-set examples -------------------------------------------------------------------------------------------------
# A 2×2 map upsampled to 4×4 (align_corners=False): output centres fall at source positions −.25 (clamped to 0),
# .25, .75, 1.25 (clamped to 1), so a row [a, b] becomes [a, .75a + .25b, .25a + .75b, b].
HAND_MAPS = np.array([
    [[0, 4], [0, 4]],  # → every row [0, 1, 3, 4]: above 2 in columns 2, 3
    [[4, 4], [0, 0]],  # → every column [4, 3, 1, 0]: above 2 in rows 0, 1
    [[0, 0], [0, 0]],  # dead unit, threshold 0: empty mask
    [[5, 5], [5, 5]],  # above everywhere
], dtype=np.float32)
HAND_T = np.array([2, 2, 0, 2], dtype=np.float32)


def test_unit_masks_by_hand():
    up = upsample_maps(HAND_MAPS, (4, 4)).numpy()
    np.testing.assert_array_equal(up[0], [[0, 1, 3, 4]] * 4)
    np.testing.assert_array_equal(up[1], np.array([[4, 3, 1, 0]] * 4).T)
    masks = unit_masks(HAND_MAPS, HAND_T, (4, 4))
    right, top = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    right[:, 2:] = True
    top[:2] = True
    np.testing.assert_array_equal(masks[0], right)
    np.testing.assert_array_equal(masks[1], top)
    assert not masks[2].any() and masks[3].all()


@pytest.mark.parametrize("region_box, expected", [
    # region = columns 1-2 (8 px): unit 0 inter 4 (column 2), union 8 + 8 − 4 → 1/3; unit 1 inter 4, union 12 → 1/3;
    # dead unit 0; unit 3 (all 16 px) 8/16
    ((1, 0, 3, 4), [1 / 3, 1 / 3, 0, 0.5]),
    # the top-left quadrant (4 px): unit 0 → 0/12; unit 1 (top half) → 4/8; unit 3 → 4/16
    ((0, 0, 2, 2), [0, 0.5, 0, 0.25]),
    # the right half: exactly unit 0's mask → 1; unit 1 → 4/12
    ((2, 0, 4, 4), [1, 1 / 3, 0, 0.5]),
])
def test_region_iou_by_hand(region_box, expected):
    region = rasterize_regions([Rect(*region_box)], (4, 4))
    np.testing.assert_allclose(region_iou(HAND_MAPS, HAND_T, region), expected, rtol=1e-6)
    np.testing.assert_allclose(reference_unit_iou(HAND_MAPS, HAND_T, region), expected, rtol=1e-6)


def test_mask_counts_by_hand_for_several_regions():
    regions = np.zeros((2, 4, 4), bool)
    regions[0, :, 1:3] = True
    regions[1, :2, :2] = True
    area, inter = mask_counts(HAND_MAPS, HAND_T, regions)
    np.testing.assert_array_equal(area, [8, 8, 0, 16])
    np.testing.assert_array_equal(inter, [[4, 4, 0, 8], [0, 4, 0, 4]])


def test_mask_counts_accepts_an_empty_region_list():
    # a caller with no drawing on an image (an empty list or a (0, H, W) stack) still gets the unit mask areas
    for empty in ([], np.zeros((0, 4, 4), bool)):
        area, inter = mask_counts(HAND_MAPS, HAND_T, empty, size=(4, 4))
        np.testing.assert_array_equal(area, [8, 8, 0, 16])
        assert inter.shape == (0, 4) and inter.dtype == np.int64
    area, inter = mask_counts(HAND_MAPS, HAND_T, np.zeros((0, 4, 4), bool))  # size from the stack itself
    np.testing.assert_array_equal(area, [8, 8, 0, 16])
    assert inter.shape == (0, 4)


def test_a_pixel_equal_to_the_threshold_is_outside():
    maps = np.full((1, 8, 8), 3.0, np.float32)
    area, _ = mask_counts(maps, np.array([3.0], np.float32), size=(64, 64))
    assert area[0] == 0
    area, _ = mask_counts(maps, np.array([2.9999998], np.float32), size=(64, 64))
    assert area[0] == 64 * 64


# -- fast path = reference ---------------------------------------------------------------------------------------------
def _smooth_maps(rng, n_units, h, w):
    x = torch.from_numpy(rng.standard_normal((n_units, 1, h, w)).astype(np.float32))
    k = torch.exp(-torch.arange(-3, 4, dtype=torch.float32) ** 2 / 3)
    k = (k / k.sum())
    x = torch.nn.functional.conv2d(x, k[None, None, :, None], padding=(3, 0))
    x = torch.nn.functional.conv2d(x, k[None, None, None, :], padding=(0, 3))
    return torch.relu(x)[:, 0].numpy()


@pytest.mark.parametrize("map_shape, size", [((32, 32), (512, 512)), ((8, 8), (64, 64)), ((7, 9), (224, 200)),
                                             ((14, 14), (96, 80)), ((16, 16), (16, 300))])
def test_fast_path_equals_the_reference_exactly(map_shape, size):
    rng = np.random.default_rng(sum(size))
    n = 24 if size[0] * size[1] > 100_000 else 64
    data = _smooth_maps(rng, n * 4, *map_shape).reshape(n, 4, *map_shape)  # 4 "images" per unit
    data = data.astype(np.float16).astype(np.float32)  # as stored: float16 maps, thresholds are stored values
    thresholds = np.quantile(data.reshape(n, -1), 0.99, axis=1, method="lower").astype(np.float32)
    thresholds[:3] = 0  # dead-unit style thresholds: zero maps must stay outside
    maps = data[:, 0]
    maps[3] = thresholds[3]  # a flat map exactly at its threshold
    maps[4] = 0
    grid = UpsampleGrid.build(map_shape, size)
    for region in (rasterize_regions([Polygon([(3, 3), (size[1] * .7, size[0] * .2), (size[1] * .5, size[0] * .9)])],
                                     size),
                   rng.random(size) < 0.3):
        fast = region_iou(maps, thresholds, region, grid=grid)
        ref = reference_unit_iou(maps, thresholds, region)
        np.testing.assert_array_equal(fast, ref)
    assert (ref > 0).sum() >= 3  # the comparison is not between empty masks


@pytest.mark.parametrize("map_shape, size", [((14, 14), (96, 80)), ((7, 9), (224, 200))])
def test_fast_path_equals_the_reference_on_signed_large_and_extreme_maps(map_shape, size):
    # signed maps (no ReLU: margins come from negative values too) scaled to thousands (a flat column's λ overflows
    # to ±inf, without a float warning), a unit that never fires and one that fires everywhere, several regions
    rng = np.random.default_rng(9)
    n = 32
    maps = (_smooth_maps(rng, n, *map_shape) - _smooth_maps(rng, n, *map_shape)) * np.float32(5000)
    thresholds = np.quantile(maps.reshape(n, -1), 0.9, axis=1, method="lower").astype(np.float32)
    thresholds[0] = maps[0].max()  # never strictly above
    thresholds[1] = maps[1].min() - 1  # above everywhere
    maps[2] = np.round(maps[2] / 1000) * 1000  # plateaus: many flat columns and values equal to the threshold
    thresholds[2] = 1000
    triangle = Polygon([(5, 2), (size[1] * .8, size[0] * .3), (size[1] * .4, size[0] - 3)])
    regions = np.stack([rasterize_regions([triangle], size), rng.random(size) < 0.3])
    grid = UpsampleGrid.build(map_shape, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        area, inter = mask_counts(maps, thresholds, regions, grid=grid)
    assert area[0] == 0 and area[1] == size[0] * size[1] and 0 < area[2] < area[1]
    for r, region in enumerate(regions):
        fast = (inter[r] / (area + region.sum() - inter[r])).astype(np.float32)
        np.testing.assert_array_equal(fast, reference_unit_iou(maps, thresholds, region))
    # a further drawing on the same maps: the intersections again, from the windows that touch the regions
    np.testing.assert_array_equal(mask_counts(maps, thresholds, regions, grid=grid, known_area=area)[1], inter)


def test_tiny_patches_agree_except_at_pixels_within_a_rounding_of_the_threshold():
    # below 4096 output pixels torch's CPU kernel rounds without fused multiply-add; counts may differ only there
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((50, 5, 3)).astype(np.float32)
    thresholds = np.quantile(maps.reshape(50, -1), 0.8, axis=1).astype(np.float32)
    region = rng.random((17, 11)) < 0.4
    area, inter = mask_counts(maps, thresholds, region)
    up = upsample_maps(maps, (17, 11)).numpy()
    above = up > thresholds[:, None, None]
    near = (np.abs(up - thresholds[:, None, None]) <= 1e-6 * np.abs(maps).max()).sum(axis=(1, 2))
    assert (np.abs(area - above.sum(axis=(1, 2))) <= near).all()
    assert (np.abs(inter[0] - (above & region).sum(axis=(1, 2))) <= near).all()
    assert (area == above.sum(axis=(1, 2))).mean() > 0.9


def test_dataset_counts_of_several_regions_equal_one_at_a_time():
    rng = np.random.default_rng(5)
    maps = _smooth_maps(rng, 40, 16, 16)
    thresholds = np.quantile(maps.reshape(40, -1), 0.95, axis=1).astype(np.float32)
    regions = rng.random((3, 128, 128)) < np.array([0.1, 0.5, 0.9])[:, None, None]
    area, inter = mask_counts(maps, thresholds, regions)
    for r in range(3):
        a1, i1 = mask_counts(maps, thresholds, regions[r])
        np.testing.assert_array_equal(a1, area)
        np.testing.assert_array_equal(i1[0], inter[r])


def test_bad_input_to_the_pure_functions():
    with pytest.raises(RegionError, match="covers no pixel"):
        region_iou(HAND_MAPS, HAND_T, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="3 thresholds for 4 units"):
        region_iou(HAND_MAPS, HAND_T[:3], np.ones((4, 4), bool))
    with pytest.raises(RegionError, match=r"\(y, x\) mask"):
        region_iou(HAND_MAPS, HAND_T, np.ones(16, bool))


# -- on a real store ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_store(real_dicoms, tmp_path_factory):
    """24 real 64×64 CBIS-DDSM patches through a small CNN, extracted into a zarr store."""
    return build_real_store(tmp_path_factory.mktemp("dissect"), real_dicoms)


def test_unit_iou_on_stored_activations_equals_the_reference(real_store):
    s = real_store
    for layer in s.layers:
        thresholds = s.thresholds(layer, 0.99)
        dissect = UnitIoU(s, layer)
        checked = 0
        for i in (0, 5, 17):
            maps = s.maps(layer, i)
            region = rasterize_regions([Polygon([(4, 4), (60, 10), (30, 58)])], (64, 64))
            fast = dissect.compute(s.image_ids[i], region)
            np.testing.assert_array_equal(fast, reference_unit_iou(maps, thresholds, region))
            # region specs and an index give the same result
            np.testing.assert_array_equal(dissect.compute(i, [Polygon([(4, 4), (60, 10), (30, 58)])]), fast)
            checked += int((fast > 0).sum())
        assert checked > 0  # some unit overlaps the region on these real patches


def test_dataset_iou_sums_intersections_and_unions_over_images(real_store):
    s = real_store
    layer = s.layers[-1]
    rng = np.random.default_rng(0)
    masks = {s.image_ids[i]: {"a": rng.random((64, 64)) < 0.2, "b": np.eye(64, dtype=bool)} for i in range(6)}
    masks[s.image_ids[6]] = {"a": np.ones((64, 64), bool)}  # "b" absent there: an empty mask
    res = DatasetIoU(s, layer).compute(masks)
    assert res.concepts == ["a", "b"] and res.n_images == 7 and res.iou.shape == (s.layer_shape(layer)[0], 2)
    thresholds = s.thresholds(layer)
    inter = np.zeros((len(thresholds), 2), np.int64)
    union = np.zeros((len(thresholds), 2), np.int64)
    for image, per in masks.items():
        up = unit_masks(s.maps(layer, s.index_of(image)), thresholds, (64, 64))
        for j, c in enumerate(["a", "b"]):
            m = per.get(c, np.zeros((64, 64), bool))
            inter[:, j] += (up & m).sum(axis=(1, 2))
            union[:, j] += (up | m).sum(axis=(1, 2))
    np.testing.assert_array_equal(res.intersection, inter)
    np.testing.assert_array_equal(res.union, union)
    np.testing.assert_allclose(res.iou, inter / np.maximum(union, 1), rtol=1e-6)
    idx, best = res.best()
    np.testing.assert_array_equal(best, res.iou.max(axis=1))


def test_unknown_layer_image_and_bad_regions_are_clear_errors(real_store):
    s = real_store
    with pytest.raises(UnknownLayerError, match="unknown layer 'layer9'") as err:
        UnitIoU(s, "layer9")
    assert isinstance(err.value, KeyError) and "features.1" in str(err.value)
    dissect = UnitIoU(s, s.layers[0])
    region = np.ones((64, 64), bool)
    with pytest.raises(UnknownImageError, match="'nope'"):
        dissect.compute("nope", region)
    with pytest.raises(UnknownImageError, match="indices 0 … 23"):
        dissect.compute(24, region)
    with pytest.raises(RegionError, match="does not match the patch size"):
        dissect.compute(0, np.ones((32, 32), bool))
    with pytest.raises(RegionError, match="covers no pixel"):
        dissect.compute(0, [Rect(100, 100, 120, 120)])
    with pytest.raises(UnknownImageError):
        DatasetIoU(s, s.layers[0]).compute({"nope": {"a": region}})


def test_a_second_drawing_on_the_same_image_reuses_the_unit_areas(real_store):
    s = real_store
    layer = s.layers[0]
    dissect = UnitIoU(s, layer, cache_images=2)
    thresholds = s.thresholds(layer)
    rng = np.random.default_rng(7)
    for image in (3, 3, 4, 3, 5, 6, 3):  # hits, misses and evictions
        region = rasterize_regions([Rect(*rng.integers(0, 30, 2), *rng.integers(34, 64, 2))], (64, 64))
        np.testing.assert_array_equal(dissect.compute(image, region),
                                      reference_unit_iou(s.maps(layer, image), thresholds, region))
    assert list(dissect._areas) == [5, 6, 3][-2:]
    # known areas with a region: intersections equal the full computation
    maps = s.maps(layer, 3)
    area, inter = mask_counts(maps, thresholds, region)
    a2, i2 = mask_counts(maps, thresholds, region, known_area=area)
    np.testing.assert_array_equal(a2, area)
    np.testing.assert_array_equal(i2, inter)
