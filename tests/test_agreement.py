"""Agreement between readers: Cohen's kappa on unit labels checked against scikit-learn, Dice of regions checked
against a count made by hand, and the pairs table of a session."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_dissection import build_real_store
from sklearn.metrics import cohen_kappa_score

from explain.agreement import agreement, cohen_kappa, dice, label_kappa, region_dice
from explain.errors import LabelError
from explain.labels import apply_ious, name_unit, undo
from explain.regions import Rect
from store.annotations import open_database

L4 = "features.4"  # 6 units


@pytest.fixture(scope="module")
def store(real_dicoms, tmp_path_factory):
    return build_real_store(tmp_path_factory.mktemp("agreement"), real_dicoms)


def test_cohen_kappa_matches_scikit_learn():
    rng = np.random.default_rng(0)
    cats = ["none", "mass", "calcification", "skin"]
    for n in (5, 40, 300):
        a = list(rng.choice(cats, n, p=[0.6, 0.2, 0.15, 0.05]))
        b = [x if rng.random() < 0.7 else rng.choice(cats) for x in a]
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert cohen_kappa(["mass", "none"], ["mass", "none"]) == pytest.approx(1.0)
    assert cohen_kappa(["none"] * 4, ["none"] * 4) is None  # undefined: p_e = 1 (sklearn: nan)
    assert cohen_kappa([], []) is None
    with pytest.raises(LabelError, match="two ratings per item"):
        cohen_kappa(["a"], [])


def test_dice_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 px
    b[1:3, 1:3] = True  # 4 px, 1 px shared with a
    assert dice(a, b) == pytest.approx(2 * 1 / (4 + 4))
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(a & ~a, a & ~a) is None


def test_label_kappa_and_region_dice_from_the_database(workspace, store):
    db = open_database(workspace.database_url)
    # ana: units 0, 1 mass; 2 calcification.  ben: 0 mass, 1 calcification, 3 mass.  units 4, 5: none for both
    for unit, concept in ((0, "mass"), (1, "mass"), (2, "calcification")):
        name_unit(db, store, layer=L4, unit=unit, concept=concept, author="ana")
    for unit, concept in ((0, "mass"), (1, "calcification"), (3, "mass")):
        name_unit(db, store, layer=L4, unit=unit, concept=concept, author="ben")
    ana = ["mass", "mass", "calcification", "none", "none", "none"]
    ben = ["mass", "calcification", "none", "mass", "none", "none"]
    k = label_kappa(db, session=1, layer=L4, a="ana", b="ben", n_units=6)
    assert k == pytest.approx(cohen_kappa_score(ana, ben))
    assert label_kappa(db, session=1, layer=L4, a="ana", b="nobody", n_units=0) is None
    with pytest.raises(LabelError, match="only 2 units"):
        label_kappa(db, session=1, layer=L4, a="ana", b="ben", n_units=2)

    # regions of 'mass' on image 0: ana a 32×32 square at (8, 8); ben a 32×32 square at (24, 8): 16×32 shared
    zeros = np.zeros(6, np.float32)
    apply_ious(db, store, layer=L4, image=0, concept="mass", author="ana", ious=zeros, specs=[Rect(8, 8, 40, 40)])
    apply_ious(db, store, layer=L4, image=0, concept="mass", author="ben", ious=zeros, specs=[Rect(24, 8, 56, 40)])
    image = store.image_ids[0]
    expected = 2 * (16 * 32) / (32 * 32 + 32 * 32)
    assert region_dice(db, session=1, image=image, concept="mass", a="ana", b="ben") == pytest.approx(expected)
    assert region_dice(db, session=1, image=image, concept="skin", a="ana", b="ben") is None
    extra = apply_ious(db, store, layer=L4, image=0, concept="mass", author="ben", ious=zeros,
                       specs=[Rect(8, 8, 24, 40)])
    # ben's union now covers x 8 … 56: all of ana's 32×32 inside his 48×32
    assert region_dice(db, session=1, image=image, concept="mass", a="ana", b="ben") == \
        pytest.approx(2 * 1024 / (1024 + 48 * 32))
    undo(db, extra.action_id, author="ben")  # an undone drawing no longer counts
    assert region_dice(db, session=1, image=image, concept="mass", a="ana", b="ben") == pytest.approx(expected)

    table = agreement(db, session=1, layers={L4: 6})
    assert table["annotators"] == ["ana", "ben"]
    [pair] = table["pairs"]
    assert (pair["a"], pair["b"], pair["n_images"]) == ("ana", "ben", 1)
    assert pair["kappa"] == {L4: pytest.approx(k)} and pair["dice"] == pytest.approx(expected)
