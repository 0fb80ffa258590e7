"""Drawn regions → masks: hand-checked examples, bad input (RELIABILITY.md #6-7), plotly shapes, and properties."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explain.errors import ExplainError, RegionError
from explain.regions import (
    DisplayView,
    Ellipse,
    MaskRegion,
    Polygon,
    Rect,
    RegionConfig,
    apply_relayout,
    parse_plotly_shape,
    parse_plotly_shapes,
    parse_svg_path,
    rasterize_polygon,
    rasterize_regions,
    regions_from_json,
    regions_to_json,
    shoelace_area,
)

# -- hand-checked examples ---------------------------------------------------------------------------------------------


def test_rectangle_covers_the_pixels_whose_centres_are_inside():
    mask = rasterize_polygon([(1, 1), (4, 1), (4, 3), (1, 3)], (4, 6))
    expected = np.zeros((4, 6), bool)
    expected[1:3, 1:4] = True  # centres x ∈ {1.5, 2.5, 3.5}, y ∈ {1.5, 2.5}
    np.testing.assert_array_equal(mask, expected)


def test_half_open_edges_neighbours_share_no_pixel_and_tile_exactly():
    left = rasterize_regions([Rect(0, 0, 2.5, 3)], (3, 5))
    right = rasterize_regions([Rect(2.5, 0, 5, 3)], (3, 5))
    assert not (left & right).any()
    assert (left | right).all()
    # pixel 2's centre (x = 2.5) lies on the shared edge: out of the left rect (its right edge), in the right one
    assert left[:, :2].all() and not left[:, 2:].any()
    assert right[:, 2:].all()


def test_triangle_by_hand():
    # right triangle (0,0) (4,0) (0,4): centre (j+.5, i+.5) inside when j + i + 1 < 4
    mask = rasterize_polygon([(0, 0), (4, 0), (0, 4)], (4, 4))
    expected = np.array([[j + i + 1 < 4 for j in range(4)] for i in range(4)])
    np.testing.assert_array_equal(mask, expected)


def test_self_intersecting_bow_tie_uses_even_odd():
    mask = rasterize_polygon([(0, 0), (4, 4), (4, 0), (0, 4)], (4, 4))
    # row 0 (y = .5) crosses at x = 0, .5, 3.5, 4 → pixel 3; row 1 at 0, 1.5, 2.5, 4 → pixels 0, 2, 3; symmetric
    expected = np.array([[0, 0, 0, 1], [1, 0, 1, 1], [1, 0, 1, 1], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_even_odd_loop_drawn_twice_is_a_hole():
    outer = [(0, 0), (8, 0), (8, 8), (0, 8)]
    inner = [(2, 2), (6, 2), (6, 6), (2, 6)]
    # one path: outer square, a connecting edge, the inner square, back — the inner part is covered twice
    mask = rasterize_polygon(outer + [(0, 0)] + inner + [(2, 2)], (8, 8))
    assert mask.sum() == 64 - 16
    assert not mask[2:6, 2:6].any()


def test_ellipse_is_the_inscribed_ellipse():
    mask = rasterize_regions([Ellipse(0, 0, 4, 4)], (4, 4))
    # centres at distance ≤ 2 from (2, 2): the 4 corner pixels are at √(1.5² + 1.5²) ≈ 2.12 and are out
    expected = np.ones((4, 4), bool)
    expected[[0, 0, 3, 3], [0, 3, 0, 3]] = False
    np.testing.assert_array_equal(mask, expected)


def test_region_list_adds_and_erases_in_order():
    specs = [Rect(0, 0, 4, 4), Rect(0, 0, 2, 2, erase=True), Rect(1, 1, 2, 2)]
    mask = rasterize_regions(specs, (4, 4))
    assert mask.sum() == 16 - 4 + 1
    assert mask[1, 1] and not mask[0, 0]


def test_clipping_keeps_the_part_inside_the_image():
    # a triangle reaching 1e8 pixels to the right: clipped, its part inside the 10×10 image is exact
    far = rasterize_polygon([(0, 0), (1e8, 0), (0, 10)], (10, 10))
    # inside the image the hypotenuse is nearly horizontal: y < 10 - 1e-7 x → every pixel with centre y < 10
    assert far.all()
    cover = rasterize_polygon([(-1e9, -1e9), (1e9, -1e9), (1e9, 1e9), (-1e9, 1e9)], (7, 5))
    assert cover.all()


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "points, words",
    [
        ([(0, 0), (3, 3)], "at least 3"),
        ([(1, 1), (1, 1), (1, 1), (1, 1)], "at least 3"),
        ([(0, 0), (5, float("nan")), (0, 5)], "vertex 1 is not finite"),
        ([(0, 0), (5, 0), (float("inf"), 5)], "vertex 2 is not finite"),
        ([(0, 0), (5, 0), (0, 1e12)], "beyond"),
        ([(0, 0), (2, 2), (4, 4)], "covers no pixel"),  # collinear: zero area
        ([(100, 100), (120, 100), (110, 130)], "covers no pixel"),  # outside the image
        ([(1.1, 1.1), (1.4, 1.1), (1.2, 1.4)], "covers no pixel"),  # between pixel centres
        ("not points", "sequence of (x, y) pairs, got str"),
        ([(0, 0, 1), (1, 2, 3), (3, 4, 5)], "(n, 2)"),
        ([("a", "b"), (1, 2), (3, 4)], "numeric"),
    ],
)
def test_bad_polygons_raise_region_error_naming_the_problem(points, words):
    with pytest.raises(RegionError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        rasterize_polygon(points, (10, 10))
    assert isinstance(err.value, ExplainError) and isinstance(err.value, ValueError)


def test_vertex_cap_refuses_a_million_vertices_before_any_work():
    pts = [(float(i % 50), float(i % 37)) for i in range(1_000_000)]
    t0 = time.perf_counter()
    with pytest.raises(RegionError, match="1000000 vertices exceed the limit of 10000"):
        rasterize_polygon(pts, (64, 64))
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(RegionError, match="exceed"):
        parse_svg_path("M0,0" + "L1,1L2,0" * 600_000 + "Z")
    with pytest.raises(RegionError, match="exceed the limit of 100"):
        rasterize_regions([Polygon([(0, 0), (9, 0), (0, 9)] * 20), Polygon([(0, 0), (9, 0), (0, 9)] * 20)],
                          (10, 10), config=RegionConfig(max_vertices=100))


def test_a_cap_sized_zigzag_finishes_in_bounded_time_and_memory():
    n = 10_000
    zig = np.c_[np.arange(n) * 0.05, np.where(np.arange(n) % 2, -1e6, 1e6)]
    t0 = time.perf_counter()
    mask = rasterize_polygon(zig, (512, 512), allow_empty=True)
    assert time.perf_counter() - t0 < 10
    assert mask.shape == (512, 512)


def test_empty_and_erased_regions_are_errors():
    with pytest.raises(RegionError, match="no region drawn"):
        rasterize_regions([], (8, 8))
    with pytest.raises(RegionError, match="covers no pixel"):
        rasterize_regions([Rect(0, 0, 8, 8), Rect(-1, -1, 9, 9, erase=True)], (8, 8))
    with pytest.raises(RegionError, match="zero width"):
        rasterize_regions([Ellipse(2, 2, 2, 6)], (8, 8))
    with pytest.raises(RegionError, match="does not match"):
        rasterize_regions([MaskRegion.from_mask(np.ones((4, 4), bool))], (8, 8))
    with pytest.raises(RegionError, match="image shape"):
        rasterize_polygon([(0, 0), (1, 0), (0, 1)], (0, 8))


# -- plotly shapes -----------------------------------------------------------------------------------------------------
def test_svg_paths_with_absolute_relative_and_several_subpaths():
    (p,) = parse_svg_path("M10,20L30,40L25,60Z")
    np.testing.assert_array_equal(p, [[10, 20], [30, 40], [25, 60]])
    a, b = parse_svg_path("M 1 2 l 3 4 h 5 v -2 z M0,0 L1,1 L0,1")
    np.testing.assert_array_equal(a, [[1, 2], [4, 6], [9, 6], [9, 4]])
    np.testing.assert_array_equal(b, [[0, 0], [1, 1], [0, 1]])
    assert parse_svg_path("M1e1,2.5E0L-3,.5L4,4")[0][0].tolist() == [10.0, 2.5]


@pytest.mark.parametrize(
    "path, words",
    [("M1,2C3,4,5,6,7,8", "unsupported path syntax"), ("M1,NaNL2,3Z", "non-finite"), ("M1,2L3", "multiple of 2"),
     ("10,20L3,4", "before the first command"), ("", "no vertices"), ("M1,2L3,4Z5", "after Z")],
)
def test_bad_paths(path, words):
    with pytest.raises(RegionError, match=words):
        parse_svg_path(path)


def test_plotly_shapes_become_specs_in_patch_coordinates():
    view = DisplayView.for_image((64, 64), (128, 128))  # shown at 2×: display pixel centres at integers
    shapes = [
        {"type": "path", "path": "M9.5,9.5L49.5,9.5L49.5,29.5Z", "xref": "x", "yref": "y"},
        {"type": "rect", "x0": 19.5, "y0": 19.5, "x1": 59.5, "y1": 39.5},
        {"type": "circle", "x0": 19.5, "y0": 19.5, "x1": 39.5, "y1": 39.5, "name": "erase"},
    ]
    specs = parse_plotly_shapes(shapes, view=view)
    assert isinstance(specs[0], Polygon) and specs[0].points[0] == (5.0, 5.0) and specs[0].points[1] == (25.0, 5.0)
    assert specs[1] == Rect(10.0, 10.0, 30.0, 20.0)
    assert specs[2] == Ellipse(10.0, 10.0, 20.0, 20.0, erase=True)
    mask = rasterize_regions(specs, (64, 64))
    assert mask[6, 20] and mask[19, 29] and not mask[0, 0]  # triangle, rect
    assert not mask[15, 15] and mask[10, 10]  # erased inside the ellipse, kept at the rect's corner outside it
    with pytest.raises(RegionError, match="line"):
        parse_plotly_shape({"type": "line", "x0": 0, "y0": 0, "x1": 5, "y1": 5})
    with pytest.raises(RegionError, match="x1='abc' is not a number"):
        parse_plotly_shape({"type": "rect", "x0": 0, "y0": 0, "x1": "abc", "y1": 5})
    with pytest.raises(RegionError, match="no region drawn"):
        parse_plotly_shapes([])


def test_apply_relayout_replaces_or_edits_shapes_without_mutating_input():
    shapes = [{"type": "rect", "x0": 0, "y0": 0, "x1": 2, "y1": 2}]
    new = apply_relayout(shapes, {"shapes[0].x1": 5, "xaxis.range[0]": 3})
    assert new[0]["x1"] == 5 and shapes[0]["x1"] == 2
    full = apply_relayout(shapes, {"shapes": [{"type": "path", "path": "M0,0L1,0L0,1Z"}]})
    assert full == [{"type": "path", "path": "M0,0L1,0L0,1Z"}]
    assert apply_relayout(shapes, {"autosize": True}) == shapes
    with pytest.raises(RegionError, match="has 1 shapes"):
        apply_relayout(shapes, {"shapes[3].path": "M0,0L1,1L0,1Z"})


def test_json_round_trip_and_validation():
    specs = [Polygon([(1, 2), (5, 2), (3, 7)]), Rect(0, 0, 2, 2, erase=True), Ellipse(1, 1, 5, 3),
             MaskRegion.from_mask(np.eye(4, dtype=bool))]
    back = regions_from_json(regions_to_json(specs))
    assert back == specs
    np.testing.assert_array_equal(rasterize_regions(back, (4, 4)), rasterize_regions(specs, (4, 4)))
    for bad, words in [({"type": "rect"}, "must be a list"), ([{"type": "hexagon"}], "unknown type"),
                       ([{"type": "rect", "x0": 1}], "malformed"), (["x"], "not an object")]:
        with pytest.raises(RegionError, match=words):
            regions_from_json(bad)


# -- properties --------------------------------------------------------------------------------------------------------
def _star(center, radii, phase):
    """A star-shaped (hence simple) polygon: vertices at increasing angles around `center`."""
    n = len(radii)
    ang = phase + 2 * np.pi * np.arange(n) / n
    return np.c_[center[0] + np.asarray(radii) * np.cos(ang), center[1] + np.asarray(radii) * np.sin(ang)]


stars = st.builds(
    _star,
    st.tuples(st.floats(28, 36), st.floats(28, 36)),  # inside the 64×64 image with any radius ≤ 27
    st.lists(st.floats(0.5, 27), min_size=3, max_size=40),
    st.floats(0, 2 * np.pi),
)
dyadic = st.integers(-40 * 8, 100 * 8).map(lambda v: v / 8)
dyadic_polys = st.lists(st.tuples(dyadic, dyadic), min_size=3, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stars)
def test_area_of_simple_polygons_is_close_to_the_shoelace_area(poly):
    area = abs(shoelace_area(poly))
    mask = rasterize_polygon(poly, (64, 64), allow_empty=True)
    perimeter = np.linalg.norm(np.diff(np.vstack([poly, poly[:1]]), axis=0), axis=1).sum()
    # only pixels that the boundary passes through can be miscounted
    assert abs(int(mask.sum()) - area) <= 2 * perimeter + 4
    # and the mask lies within the polygon's bounding box
    ys, xs = np.nonzero(mask)
    if ys.size:
        assert xs.min() + 0.5 >= poly[:, 0].min() and xs.max() + 0.5 <= poly[:, 0].max()
        assert ys.min() + 0.5 >= poly[:, 1].min() and ys.max() + 0.5 <= poly[:, 1].max()


@settings(max_examples=200, deadline=None)
@given(dyadic_polys, st.integers(0, 20), st.integers(0, 20))
def test_translation_by_whole_pixels_moves_the_mask_exactly(poly, dx, dy):
    p = np.asarray(poly, dtype=np.float64)
    try:
        base = rasterize_polygon(p, (48, 48), allow_empty=True)
    except RegionError:  # fewer than 3 distinct points
        return
    moved = rasterize_polygon(p + [dx, dy], (48 + dy, 48 + dx), allow_empty=True)
    np.testing.assert_array_equal(moved[dy:, dx:], base)


@settings(max_examples=100, deadline=None)
@given(dyadic_polys, st.integers(-30, 30), st.integers(-30, 30))
def test_clipped_mask_equals_the_crop_of_a_larger_canvas(poly, ox, oy):
    p = np.asarray(poly, dtype=np.float64)
    try:
        big = rasterize_polygon(p + [200, 200], (500, 500), allow_empty=True)
    except RegionError:
        return
    small = rasterize_polygon(p + [200 - (200 + ox), 200 - (200 + oy)], (40, 40), allow_empty=True)
    np.testing.assert_array_equal(small, big[200 + oy:240 + oy, 200 + ox:240 + ox])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(1, 20))
def test_mask_region_run_length_round_trip(bits, width):
    flat = np.resize(np.asarray(bits, bool), width * max(1, len(bits) // width))
    mask = flat.reshape(-1, width)
    back = MaskRegion.from_mask(mask).to_mask()
    np.testing.assert_array_equal(back, mask)


sizes = st.tuples(st.integers(1, 4096), st.integers(1, 4096))


@settings(max_examples=300, deadline=None)
@given(sizes, st.floats(0.05, 20), st.floats(0.05, 20), st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)),
                                                                    min_size=1, max_size=20))
def test_display_patch_round_trip_within_half_a_pixel(patch, zx, zy, fractions):
    h, w = patch
    display = (max(1, round(h * zy)), max(1, round(w * zx)))
    view = DisplayView.for_image((h, w), display)
    pts = np.asarray(fractions) * [w, h]  # anywhere on the patch, patch coordinates
    disp = view.to_display(pts)
    np.testing.assert_allclose(view.to_patch(disp), pts, atol=1e-6 * max(h, w))
    # a click lands on a whole display pixel: its patch position is within half a display pixel of the true one
    clicked = view.to_patch(np.round(disp))
    sx, sy = view.scale  # patch px per display px
    assert (np.abs(clicked - pts) <= 0.5 * np.array([sx, sy]) + 1e-9).all()
    # and when the patch is shown at least 1:1, within half a patch pixel
    if display[0] >= h and display[1] >= w:
        assert (np.abs(clicked - pts) <= 0.5 + 1e-9).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 31), st.integers(0, 31)), min_size=3, max_size=8), st.sampled_from([1, 2, 4]))
def test_drawing_on_a_zoomed_display_gives_the_patch_mask(poly, zoom):
    view = DisplayView.for_image((32, 32), (32 * zoom, 32 * zoom))
    p = np.asarray(poly, dtype=np.float64)
    disp = view.to_display(p)
    shape = {"type": "path", "path": "M" + "L".join(f"{x!r},{y!r}" for x, y in disp) + "Z"}
    try:
        direct = rasterize_polygon(p, (32, 32), allow_empty=True)
        drawn = rasterize_regions(parse_plotly_shapes([shape], view=view), (32, 32), allow_empty=True)
    except RegionError:
        return
    np.testing.assert_array_equal(drawn, direct)
