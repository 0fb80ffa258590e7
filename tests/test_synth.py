"""Synthetic lesions on a real CBIS-DDSM mammogram: insertion changes exactly the pixels the masks say, lesions stay
where they are allowed, and each kind has the look it claims (shape, margin, specks, lines)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from training.synth import (
    LESION_CONCEPTS,
    LesionConfig,
    draw_calcification,
    draw_distortion,
    draw_mass,
    insert_lesions,
    place_lesions,
    shoulder,
    unshoulder,
)

CONFIG = LesionConfig()


@pytest.fixture(scope="module")
def mammogram(real_dicoms):
    """(display float32 (y, x), segmentation, allowed bool (y, x)) of one real film (an MLO view) at 1/8."""
    from store.images import read_image
    from store.segment import segment_breast

    img = read_image(real_dicoms[2])  # benign case, right MLO
    display = img.display(scale=1 / 8)
    seg = segment_breast(display, view=img.view)
    allowed = ndi.binary_erosion(seg.breast & ~seg.skin, iterations=3) & ~ndi.binary_dilation(
        seg.pectoral | seg.film_label, iterations=4)
    return display, seg, allowed


@pytest.fixture(scope="module")
def inserted(mammogram):
    display, _, allowed = mammogram
    lesions = place_lesions(display, allowed, np.random.default_rng(5), CONFIG, count=8,
                            kinds=["mass", "calcification", "architectural_distortion", "mass"])
    return lesions, insert_lesions(display, lesions)


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy * yy + xx * xx <= r * r


def test_insertion_changes_exactly_the_footprint(mammogram, inserted):
    display, _, _ = mammogram
    lesions, out = inserted
    assert len(lesions) >= 6 and {les.kind for les in lesions} == {"mass", "calcification", "architectural_distortion"}
    changed = out != display  # (y, x)
    footprint = np.zeros(display.shape, bool)
    masks = np.zeros(display.shape, bool)
    for les in lesions:
        footprint |= les.full(les.footprint, display.shape)
        for concept in les.masks:
            masks |= les.full(concept, display.shape)
    assert np.array_equal(changed, footprint), "pixels changed outside the footprint or a footprint pixel kept"
    # changed pixels lie within the documented soft-edge margin of the masks …
    near = ndi.binary_dilation(masks, structure=_disk(CONFIG.edge_margin_px))
    assert not (changed & ~near).any()
    # … and every pixel of every lesion mask changed: brighter (lesions add density), darker only in a halo
    halos = 0
    for les in lesions:
        body = les.full(les.kind, display.shape)
        for concept in les.masks:
            m = les.full(concept, display.shape)
            assert (out[m & body] > display[m & body]).all(), f"{les.kind}: a {concept} pixel did not get brighter"
            outside = m & ~body
            if concept == "circumscribed_margin":
                halos += int(outside.sum())
                assert (out[outside] < display[outside]).all(), "a halo pixel did not get darker"
                assert (out[outside] >= 0.5 * display[outside]).all(), "a halo pixel lost more than half its value"
            elif outside.any():
                assert (out[outside] > display[outside]).all(), f"{les.kind}: a {concept} pixel did not get brighter"
    assert halos > 0, "no circumscribed mass among the placed lesions: the halo went untested"
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_lesions_stay_in_allowed_tissue_and_apart(mammogram, inserted):
    display, seg, allowed = mammogram
    lesions, _ = inserted
    feet = [les.full(les.footprint, display.shape) for les in lesions]
    for les, foot in zip(lesions, feet):
        assert not (foot & ~allowed).any(), f"{les.kind} at {les.box} leaves the allowed region"
        assert not (foot & (seg.pectoral | seg.film_label | ~seg.breast)).any()
    for i in range(len(feet)):
        grown = ndi.binary_dilation(feet[i], iterations=6)
        for j in range(i + 1, len(feet)):
            assert not (grown & feet[j]).any(), f"lesions {i} and {j} are closer than 6 px"


def test_same_seed_same_lesions(mammogram):
    display, _, allowed = mammogram
    a = place_lesions(display, allowed, np.random.default_rng(9), CONFIG, count=4)
    b = place_lesions(display, allowed, np.random.default_rng(9), CONFIG, count=4)
    c = place_lesions(display, allowed, np.random.default_rng(10), CONFIG, count=4)
    assert [x.origin for x in a] == [x.origin for x in b]
    assert all(np.array_equal(x.attenuation, y.attenuation) for x, y in zip(a, b))
    assert np.array_equal(insert_lesions(display, a), insert_lesions(display, b))
    assert [x.origin for x in a] != [x.origin for x in c]


def _elongation(mask: np.ndarray) -> float:
    """Minor/major axis ratio of a mask's pixel cloud (1 = round)."""
    ys, xs = np.nonzero(mask)
    ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
    return math.sqrt(ev[0] / ev[1])


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area (pixel corners), 1 for a convex shape."""
    from scipy.spatial import ConvexHull

    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    return float(mask.sum() / ConvexHull(corners).volume)


@pytest.mark.parametrize("shape", ["round", "oval", "irregular"])
@pytest.mark.parametrize("margin", ["circumscribed", "spiculated"])
def test_mass_shape_margin_and_masks(shape, margin):
    m = draw_mass(np.random.default_rng(3), CONFIG, shape=shape, margin=margin, diameter_mm=14, attenuation=0.25)
    radius = 14 / 2 / CONFIG.mm_per_px
    body = m.masks["mass"]
    assert set(m.masks) == {"mass", f"{margin}_margin"}
    assert m.attributes == {**m.attributes, "type": "mass", "shape": shape, "margin": margin, "size_mm": 14.0}
    area = body.sum()
    assert 0.8 * math.pi * radius**2 < area < 1.25 * math.pi * radius**2  # equal-area shapes
    if shape == "round":
        assert _elongation(body) > 0.85
    if shape == "oval":
        assert _elongation(body) < 0.8
    if shape == "irregular":  # lobulated: clearly less convex than an ellipse
        assert _solidity(body) < 0.935
    else:
        assert _solidity(body) > 0.945
    # denser in the centre than at the rim
    cy, cx = (int(v) for v in m.center)
    rim = body & ~ndi.binary_erosion(body, iterations=2)
    assert m.attenuation[cy - 1:cy + 2, cx - 1:cx + 2].mean() > 1.4 * m.attenuation[rim].mean()
    margin_mask = m.masks[f"{margin}_margin"]
    ys, xs = np.nonzero(margin_mask)
    reach = np.hypot(ys + 0.5 - m.center[0], xs + 0.5 - m.center[1]).max()
    if margin == "circumscribed":  # a band across the border: the body's rim and a thin dark halo outside it
        halo = margin_mask & ~body
        assert (m.attenuation[halo] < 0).all() and (m.attenuation[body] > 0).all()
        touching = ndi.binary_dilation(body) & ~body
        assert (touching & halo).sum() > 0.95 * touching.sum()  # all around the border …
        assert not (halo & ~ndi.binary_dilation(body, structure=_disk(2))).any()  # … and 2 px wide
        assert (margin_mask & body).sum() > 0.9 * (body & ~ndi.binary_erosion(body, iterations=CONFIG.margin_rim_px)).sum()
        assert not (m.footprint & ~ndi.binary_dilation(body, structure=_disk(3))).any()  # nothing beyond the halo
    else:
        outside = margin_mask & ~body  # spicules: thin lines well beyond the border
        assert outside.sum() > 30
        assert reach > 1.3 * radius
        lines = ndi.binary_opening(outside, structure=np.ones((3, 3), bool))
        assert lines.sum() < 0.25 * outside.sum()  # at most 2 px wide almost everywhere
        soft = m.footprint & ~ndi.binary_dilation(body | margin_mask)
        assert soft.any()  # the soft border fades outside the mask …
        near = ndi.binary_dilation(body | margin_mask, structure=_disk(CONFIG.edge_margin_px))
        assert not (m.footprint & ~near).any()  # … but not beyond the documented margin


@pytest.mark.parametrize("morphology", ["fine", "coarse"])
@pytest.mark.parametrize("distribution", ["clustered", "linear"])
def test_calcification_specks(morphology, distribution):
    c = draw_calcification(np.random.default_rng(4), CONFIG, morphology=morphology, distribution=distribution,
                           count=12)
    mask = c.masks["calcification"]
    assert set(c.masks) == {"calcification"} and c.attributes["count"] == 12
    att = c.attenuation
    peaks = (att == ndi.maximum_filter(att, size=3)) & (att > 0.05)
    n_peaks = ndi.label(peaks, structure=np.ones((3, 3), bool))[1]  # plateaus count once
    assert 8 <= n_peaks <= 12  # one bright peak per speck (a few neighbours may merge)
    per_speck = mask.sum() / n_peaks
    if morphology == "fine":
        assert per_speck <= 13  # a 1-px speck dilated by 1 px is 9 px
    else:
        assert per_speck >= 13
    assert c.attenuation.max() > 0.15  # bright specks
    elong = _elongation(mask)
    if distribution == "linear":
        assert elong < 0.4
    else:
        assert elong > 0.4
    assert not (c.footprint & ~ndi.binary_dilation(mask, structure=np.ones((3, 3), bool))).any()


def test_distortion_is_lines_without_a_central_mass():
    d = draw_distortion(np.random.default_rng(6), CONFIG, diameter_mm=20)
    mask = d.masks["architectural_distortion"]
    cy, cx = (int(round(v)) for v in d.center)
    assert not mask[cy - 1:cy + 1, cx - 1:cx + 1].any()  # no density at the point the lines converge on
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    far = mask & (np.hypot(yy + 0.5 - d.center[0], xx + 0.5 - d.center[1]) > 8)  # where the lines have spread out
    assert ndi.binary_opening(far, structure=np.ones((3, 3), bool)).sum() < 0.25 * far.sum()  # thin lines
    ys, xs = np.nonzero(mask)
    angles = np.arctan2(ys + 0.5 - d.center[0], xs + 0.5 - d.center[1])
    assert np.histogram(angles, bins=8, range=(-np.pi, np.pi))[0].min() > 0  # radiating all around


def test_bad_arguments_name_the_value():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="'star'"):
        draw_mass(rng, CONFIG, shape="star")
    with pytest.raises(ValueError, match="'fuzzy'"):
        draw_mass(rng, CONFIG, margin="fuzzy")
    with pytest.raises(ValueError, match="'amorphous'"):
        draw_calcification(rng, CONFIG, morphology="amorphous")
    with pytest.raises(ValueError, match="shape"):
        place_lesions(np.zeros((10, 10), np.float32), np.zeros((10, 11), bool), rng, CONFIG, count=1)


def test_shoulder_is_monotone_invertible_and_below_one():
    v = np.linspace(0, 0.999, 1000)
    assert np.allclose(shoulder(unshoulder(v)), v, atol=1e-9)
    u = np.linspace(0, 5, 1000)
    s = shoulder(u)
    assert (np.diff(s) > 0).all() and s.max() < 1.0


def test_nothing_placed_where_nothing_is_allowed(mammogram):
    display, _, _ = mammogram
    lesions = place_lesions(display, np.zeros(display.shape, bool), np.random.default_rng(0), CONFIG, count=3)
    assert lesions == []
    assert np.array_equal(insert_lesions(display, []), display)
    assert set(LESION_CONCEPTS) >= {"mass", "calcification", "spiculated_margin"}


@pytest.mark.parametrize("width", [2, 3])
def test_circumscribed_margin_follows_the_rim_width(width):
    cfg = replace(CONFIG, margin_rim_px=width)
    m = draw_mass(np.random.default_rng(8), cfg, shape="round", margin="circumscribed", diameter_mm=12, attenuation=0.3)
    body = m.masks["mass"]
    inner = m.masks["circumscribed_margin"] & body
    np.testing.assert_array_equal(inner, body & ~ndi.binary_erosion(body, iterations=width))


@pytest.mark.parametrize("soft", [2.5, 4.0])
def test_spiculated_margin_is_the_fading_band_and_the_spicules(soft):
    cfg = replace(CONFIG, soft_edge_px=soft)
    s = draw_mass(np.random.default_rng(8), cfg, shape="round", margin="spiculated", diameter_mm=12, attenuation=0.3)
    body, margin = s.masks["mass"], s.masks["spiculated_margin"]
    edge = body & ~ndi.binary_erosion(body)  # the body's outermost pixels
    assert (margin & edge).sum() > 0.9 * edge.sum()  # the band follows the whole border …
    depth = ndi.distance_transform_edt(body)  # inside, px from the border: no deeper than the fade reaches
    assert depth[margin & body].max() <= soft / 2 + 0.75
    assert not (margin & ~s.footprint).any()
