"""store.segment on synthetic phantoms with exact masks and on the 8 real CBIS-DDSM films."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from store.images import read_image
from store.segment import SegmentConfig, Segmentation, segment_breast


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# -- a phantom with known masks -------------------------------------------------------------------------------------
def phantom(*, pectoral: bool = False, mlo: bool = False, seed: int = 0):
    """(display (y, x), true breast, true label, true pectoral, true film edge): a breast on the left edge (CC: a
    half disc; MLO: a wedge from the top edge), a bright text block top-right, a film-edge strip along the bottom,
    an optional pectoral triangle, mild noise."""
    h, w = 400, 300
    yy, xx = np.mgrid[0:h, 0:w]
    if mlo:
        breast = (xx <= 150 + 0.3 * yy) & (yy < 330)  # (y, x)
    else:
        breast = (yy - 200) ** 2 + xx**2 <= 170**2  # (y, x)
    img = np.where(breast, 0.45, 0.0).astype(np.float32)
    img[breast] += 0.25 * (1 - xx[breast] / 270)  # denser toward the chest wall
    label = (yy >= 20) & (yy < 40) & (xx >= 230) & (xx < 280)
    img[label] = 1.0
    edge = yy >= h - 5
    img[edge] = 0.8
    pect = breast & (xx < 80 - 80 * yy / 180)  # triangle: x = 80 at the top, meets the chest wall at y = 180
    if pectoral:
        img[pect] = 0.95
    rng = np.random.default_rng(seed)
    img = np.clip(img + rng.normal(0, 0.01, img.shape).astype(np.float32), 0, 1)
    return img, breast, label, pect, edge


def test_phantom_breast_label_edge_and_skin():
    img, breast, label, _, edge = phantom()
    seg = segment_breast(img, view="CC")
    assert isinstance(seg, Segmentation)
    assert iou(seg.breast, breast) > 0.97
    assert iou(seg.film_label, label) > 0.8 and not (seg.film_label & breast).any()
    assert seg.film_edge[edge].mean() > 0.9 and not (seg.film_edge & seg.film_label).any()
    assert not seg.pectoral.any() and seg.pectoral_reason == "not an MLO view"
    # skin: inside the breast, within the band width of the outline, never along the image's own left edge
    band = max(1, round(SegmentConfig().skin_frac * img.shape[1]))
    assert seg.skin.any() and not (seg.skin & ~seg.breast).any()
    dist = ndi.distance_transform_edt(np.pad(seg.breast, ((0, 0), (1, 0)), constant_values=True))[:, 1:]
    assert dist[seg.skin].max() <= band + 1
    assert seg.skin[:, 0].sum() <= 2 * (band + 1)  # only where the outline meets the chest wall, top and bottom
    outline = seg.breast & ~ndi.binary_erosion(seg.breast, border_value=1)
    assert seg.skin[outline].all()


def test_phantom_pectoral_triangle_found_only_on_mlo():
    img, breast, _, pect, _ = phantom(pectoral=True, mlo=True)
    seg = segment_breast(img, view="MLO")
    assert seg.pectoral_reason == "" and iou(seg.pectoral, pect) > 0.9
    a, y0 = seg.pectoral_line
    assert a == pytest.approx(80, abs=4) and y0 == pytest.approx(180, abs=8)
    assert not segment_breast(img, view="CC").pectoral.any()
    plain, *_ = phantom(pectoral=False, mlo=True)
    seg = segment_breast(plain, view="MLO")
    assert not seg.pectoral.any() and seg.pectoral_reason  # says why


def test_masks_partition_the_image():
    img, *_ = phantom(pectoral=True, mlo=True)
    seg = segment_breast(img, view="MLO")
    total = seg.breast.astype(int) + seg.background + seg.film_label + seg.film_edge
    assert (total == 1).all()
    assert not (seg.pectoral & ~seg.breast).any()
    assert set(seg.masks()) == {"background", "skin", "film_label", "film_edge", "pectoral_muscle"}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        segment_breast(np.zeros(100, np.float32))
    bad = np.zeros((64, 64), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segment_breast(bad)


def test_blank_image_gives_empty_breast():
    seg = segment_breast(np.zeros((64, 64), np.float32))
    assert not seg.breast.any() and seg.background.all()


# -- the real films -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_segs(real_dicoms):
    out = []
    for p in real_dicoms:
        img = read_image(p)
        d = img.display(scale=0.2)
        out.append((p, img, d, segment_breast(d, view=img.view)))
    return out


def test_real_breast_is_one_component_on_the_left(real_segs):
    for p, img, d, seg in real_segs:
        h, w = d.shape
        lab, n = ndi.label(seg.breast)
        assert n == 1, p
        assert seg.breast[:, 0].mean() > 0.5, p  # rests on the chest wall edge along most of the height
        assert not seg.breast[:, -w // 4 :].any(), p  # the nipple side never reaches the far right quarter
        assert 0.1 < seg.breast.mean() < 0.5, p
        assert d[seg.breast].mean() > 0.3 and d[seg.background].mean() < 0.05, p


def test_real_film_labels_lie_outside_the_breast(real_segs):
    for p, img, d, seg in real_segs:
        assert not (seg.film_label & seg.breast).any(), p
        lab, n = ndi.label(seg.film_label)
        assert n >= 2, f"{p}: the burned-in view label (letters) should be found"
        h, w = d.shape
        ys, xs = np.nonzero(seg.film_label)
        assert np.median(xs) > w / 2 and np.median(ys) < h / 3, p  # CBIS-DDSM labels sit at the top right
        assert d[seg.film_label].mean() > 0.3, p


def test_real_skin_is_a_band_inside_the_breast_outline(real_segs):
    for p, img, d, seg in real_segs:
        assert seg.skin.any() and not (seg.skin & ~seg.breast).any(), p
        dist = ndi.distance_transform_edt(np.pad(seg.breast, 1, constant_values=True))[1:-1, 1:-1]
        band = max(1, round(SegmentConfig().skin_frac * d.shape[1]))
        assert dist[seg.skin].max() <= band + 1, p
        assert seg.skin.sum() < 0.1 * seg.breast.sum(), p


def test_real_pectoral_muscle_on_mlo_only(real_segs):
    for p, img, d, seg in real_segs:
        h, w = d.shape
        if img.view != "MLO":
            assert not seg.pectoral.any()
            continue
        assert seg.pectoral_reason == "", f"{p}: {seg.pectoral_reason}"
        assert not (seg.pectoral & ~seg.breast).any() and seg.pectoral[0, 0]
        a, y0 = seg.pectoral_line
        # read off the overlays by eye: the muscle edge meets the top at 0.25–0.35 w and the chest wall at 0.4–0.5 h
        assert 0.2 * w < a < 0.4 * w and 0.35 * h < y0 < 0.6 * h, (p, a / w, y0 / h)
        beside = seg.breast & ~seg.pectoral & (np.mgrid[0:h, 0:w][0] < y0)
        assert d[seg.pectoral].mean() > d[beside].mean() + 0.05, p
        assert 0.05 < seg.pectoral.sum() / seg.breast.sum() < 0.35, p


def test_real_segmentation_is_consistent_across_scales(real_segs):
    p, img, d, seg = real_segs[2]
    small = segment_breast(img.display(scale=0.1), view=img.view)
    down = seg.breast[: small.breast.shape[0] * 2 : 2, : small.breast.shape[1] * 2 : 2]
    h, w = min(down.shape[0], small.breast.shape[0]), min(down.shape[1], small.breast.shape[1])
    assert iou(down[:h, :w], small.breast[:h, :w]) > 0.95
