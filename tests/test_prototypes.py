"""Prototypes and overlays: exact small cases, then units / probes / classes of a real-data store."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from explain.dissection import unit_masks
from explain.errors import ExplainError, UnknownConceptError, UnknownLayerError, UnknownUnitError
from explain.prototypes import (
    class_prototypes, colorize, mask_outline, probe_prototypes, render_overlay, unit_prototypes,
)

torch.set_num_threads(1)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_mask_outline():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    out = mask_outline(m)
    expected = m.copy()
    expected[2, 2] = False  # the only pixel whose 4 neighbours are all inside
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(mask_outline(np.ones((2, 3), bool)), np.ones((2, 3), bool))  # patch border


def test_render_overlay_mask_and_heatmap():
    img = np.full((4, 4), 100, np.uint8)
    m = np.zeros((4, 4), bool)
    m[0:3, 0:3] = True
    px = _png(render_overlay(img, m, color=(255, 0, 0)))
    assert px.shape == (4, 4, 3)
    assert tuple(px[0, 0]) == (255, 0, 0) and tuple(px[1, 1]) == (100, 100, 100) and tuple(px[3, 3]) == (100,) * 3
    filled = _png(render_overlay(img, m, color=(200, 0, 0), alpha=0.5, outline=False))
    assert tuple(filled[1, 1]) == (150, 50, 50) and tuple(filled[3, 3]) == (100,) * 3
    hm = np.zeros((4, 4), np.float32)
    hm[0, 0] = 1.0
    px = _png(render_overlay(img, hm, alpha=1.0))
    assert tuple(px[0, 0]) == tuple(colorize(np.array(1.0))) == (252, 253, 191)
    assert tuple(px[3, 3]) == (100, 100, 100)  # zero heat leaves the tissue as it is
    assert _png(render_overlay(img, scale=3)).shape == (12, 12, 3)
    with pytest.raises(ExplainError, match=r"\(2, 2\)"):
        render_overlay(img, np.zeros((2, 2), bool))
    with pytest.raises(ExplainError, match="uint8"):
        render_overlay(img.astype(np.float32))


@pytest.fixture(scope="module")
def lesion(tmp_path_factory, real_dicoms):
    from helpers_probes import build_lesion_store

    return build_lesion_store(tmp_path_factory.mktemp("protos") / "lesion.zarr", real_dicoms[0])


def test_unit_prototypes_are_the_top_k_with_masks(lesion):
    store, layer = lesion.store, lesion.layers[-1]
    ids, values = store.topk(layer)
    protos = unit_prototypes(store, layer, 3, k=4)
    assert [p.image for p in protos] == ids[3, :4].tolist()
    assert [p.value for p in protos] == pytest.approx(values[3, :4].tolist())
    assert all(p.image_id == store.image_ids[p.image] for p in protos)
    p = protos[0]
    assert p.mask.shape == (32, 32) and p.mask.dtype == bool
    expected = unit_masks(store.maps(layer, p.image), store.thresholds(layer), (32, 32))[3]
    np.testing.assert_array_equal(p.mask, expected)
    assert p.value == pytest.approx(float(store.maps(layer, p.image)[3].max()), rel=1e-3)
    assert len(unit_prototypes(store, layer, 3)) == ids.shape[1]
    with pytest.raises(UnknownUnitError):
        unit_prototypes(store, layer, 10_000)
    with pytest.raises(UnknownLayerError):
        unit_prototypes(store, "nope", 0)


def test_probe_and_class_prototypes(lesion):
    store, layer = lesion.store, lesion.layers[-1]
    scores = np.linspace(0, 1, store.n_images).astype(np.float32)[::-1].copy()
    maps = np.random.default_rng(0).uniform(size=(store.n_images, *store.layer_shape(layer)[1:])).astype(np.float32)
    store.write_probe("calcification", layer, scores=scores, maps=maps, run_id="r1")
    protos = probe_prototypes(store, "calcification", layer, k=3)
    assert [p.image for p in protos] == [0, 1, 2]
    assert protos[0].value == pytest.approx(1.0) and protos[0].heatmap.shape == (32, 32)
    with pytest.raises(UnknownConceptError, match="architectural_distortion"):
        probe_prototypes(store, "architectural_distortion", layer)

    per_class = class_prototypes(store, k=5)
    assert set(per_class) == {"normal", "lesion"}
    probs, labels = store.probs(), store.labels()
    for c, name in enumerate(["normal", "lesion"]):
        got = per_class[name]
        assert len(got) == 5
        assert all(labels[p.image] == c and probs[p.image].argmax() == c for p in got)
        vals = [p.value for p in got]
        assert vals == sorted(vals, reverse=True)
        correct = (labels == c) & (probs.argmax(1) == c)
        assert vals[0] == pytest.approx(probs[correct, c].max())
