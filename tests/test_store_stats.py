"""store.stats: exact float16 quantiles against numpy.quantile, top-k against a full sort, running stats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.stats import Float16Histogram, Float16Quantiles, RunningStats, TopK, float16_keys, keys_to_float16

LEVELS = (0.0, 0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


def numpy_quantiles(values: np.ndarray, levels) -> np.ndarray:
    """(n, unit, …) → float32 (unit, level), numpy's linear method over all values of each unit."""
    rows = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1).astype(np.float64)
    return np.quantile(rows, levels, axis=1).T.astype(np.float32)


def feed(q: Float16Quantiles, values: np.ndarray, batch: int) -> None:
    for _ in range(q.passes):
        for i in range(0, len(values), batch):
            q.add(values[i:i + batch])
        q.end_pass()


def test_keys_order_every_float16():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    keys = float16_keys(finite)
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(finite[order].astype(np.float64)) >= 0)
    np.testing.assert_array_equal(keys_to_float16(float16_keys(every)).view(np.uint16), every.view(np.uint16))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_quantiles_equal_numpy_on_relu_like_maps(scale):
    rng = np.random.default_rng(7)
    maps = np.maximum(rng.standard_normal((37, 6, 5, 4)) * scale, 0).astype(np.float16)  # (image, unit, y, x)
    maps[:, 3] = 0  # a dead unit
    maps[:, 4] = -maps[:, 4]  # a negative unit
    q = Float16Quantiles(units=6, levels=LEVELS)
    feed(q, maps, batch=8)
    np.testing.assert_array_equal(q.quantiles(), numpy_quantiles(maps, LEVELS))
    np.testing.assert_array_equal(q.quantile(0.99), numpy_quantiles(maps, LEVELS)[:, 5])
    assert q.count.tolist() == [37 * 20] * 6


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), units=st.integers(1, 4), rest=st.integers(1, 6), seed=st.integers(0, 10_000),
       batch=st.integers(1, 5))
def test_quantiles_equal_numpy_for_any_split_into_batches(n, units, rest, seed, batch):
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((n, units, rest)) * rng.uniform(1e-3, 1e3)).astype(np.float16)
    q = Float16Quantiles(units=units, levels=LEVELS)
    feed(q, values, batch=batch)
    np.testing.assert_array_equal(q.quantiles(), numpy_quantiles(values, LEVELS))


def test_state_dict_resumes_mid_stream_and_merge_equals_one_stream():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((20, 3, 9)).astype(np.float16)
    one = Float16Quantiles(3, LEVELS)
    feed(one, values, batch=4)

    a, b = Float16Quantiles(3, LEVELS), Float16Quantiles(3, LEVELS)
    a.add(values[:10]); b.add(values[10:])
    a.merge(b); a.end_pass()
    restored = Float16Quantiles(3, LEVELS)
    restored.load_state_dict(a.state_dict())
    restored.add(values[:5]); restored.add(values[5:])
    restored.end_pass()
    np.testing.assert_array_equal(restored.quantiles(), one.quantiles())
    with pytest.raises(RuntimeError):
        restored.add(values)


def test_memory_does_not_grow_with_images():
    q = Float16Quantiles(units=4, levels=LEVELS)
    rng = np.random.default_rng(0)
    for _ in range(2):
        for _ in range(50):
            q.add(rng.standard_normal((16, 4, 8, 8)).astype(np.float16))
        q.end_pass()
    size = sum(v.nbytes for v in q.state_dict().values() if isinstance(v, np.ndarray))
    assert size <= 4 * 256 * 8 * (2 + 2 * len(LEVELS)), size  # counters only, whatever the image count


def test_levels_not_requested_and_reading_too_early_are_errors():
    q = Float16Quantiles(2, (0.5,))
    q.add(np.zeros((1, 2, 3), np.float16))
    with pytest.raises(RuntimeError, match="pass"):
        q.quantiles()
    q.end_pass(); q.add(np.zeros((1, 2, 3), np.float16)); q.end_pass()
    with pytest.raises(ValueError, match="0.99"):
        q.quantile(0.99)
    with pytest.raises(ValueError, match="units on axis 1"):
        Float16Quantiles(3, (0.5,)).add(np.zeros((2, 4)))


def test_topk_equals_a_full_sort_with_ties_to_the_lower_index():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 6, (40, 5)).astype(np.float32)  # many ties
    values[7, 2] = np.nan
    top = TopK(units=5, k=6)
    for s in range(0, 40, 7):
        top.add(values[s:s + 7], start=s)
    idx, val = top.result()
    for u in range(5):
        col = np.where(np.isnan(values[:, u]), -np.inf, values[:, u])
        order = sorted(range(40), key=lambda i: (-col[i], i))[:6]
        assert idx[u].tolist() == order
        np.testing.assert_array_equal(val[u], values[order, u])
    halves = TopK(5, 6), TopK(5, 6)
    halves[0].add(values[:20], start=0); halves[1].add(values[20:], indices=np.arange(20, 40))
    halves[0].merge(halves[1])
    np.testing.assert_array_equal(halves[0].result()[0], idx)


def test_topk_with_fewer_images_than_k_pads():
    top = TopK(units=2, k=3)
    top.add(np.array([[1.0, 2.0]]), start=4)
    idx, val = top.result()
    assert idx.tolist() == [[4, -1, -1], [4, -1, -1]]
    assert np.isnan(val[:, 1:]).all()


def test_running_stats():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 3, 4, 4))
    s = RunningStats(3)
    for i in range(0, 30, 8):
        s.add(x[i:i + 8])
    rows = np.moveaxis(x, 1, 0).reshape(3, -1)
    np.testing.assert_allclose(s.mean(), rows.mean(1), rtol=1e-12)
    np.testing.assert_array_equal(s.max(), rows.max(1))
    np.testing.assert_array_equal(s.min(), rows.min(1))
    t = RunningStats(3)
    t.load_state_dict(s.state_dict())
    assert np.array_equal(t.max(), s.max())
    assert np.isnan(RunningStats(2).mean()).all()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 500.0])
def test_histogram_quantiles_equal_numpy_in_one_pass(scale):
    rng = np.random.default_rng(11)
    maps = (rng.standard_normal((29, 5, 6, 3)) * scale).astype(np.float16)  # (image, unit, y, x)
    maps[:, 1] = np.maximum(maps[:, 1], 0)
    maps[:, 2] = 0
    h = Float16Histogram(units=5)
    for i in range(0, 29, 6):
        h.add(maps[i:i + 6])
    np.testing.assert_array_equal(h.quantiles(LEVELS), numpy_quantiles(maps, LEVELS))
    radix = Float16Quantiles(5, LEVELS)
    feed(radix, maps, batch=29)
    np.testing.assert_array_equal(h.quantiles(LEVELS), radix.quantiles())  # the two methods agree exactly
    assert h.count.tolist() == [29 * 18] * 5


def test_histogram_merge_state_and_bounded_memory():
    rng = np.random.default_rng(2)
    a, b, whole = Float16Histogram(3), Float16Histogram(3), Float16Histogram(3)
    x = rng.standard_normal((40, 3, 7)).astype(np.float16)
    a.add(x[:25]); b.add(x[25:]); whole.add(x)
    a.merge(b)
    np.testing.assert_array_equal(a.counts, whole.counts)
    c = Float16Histogram(3)
    c.load_state_dict(whole.state_dict())
    np.testing.assert_array_equal(c.quantile(0.99), numpy_quantiles(x, (0.99,))[:, 0])
    for _ in range(20):
        c.add(rng.standard_normal((64, 3, 7)).astype(np.float16))
    assert c.counts.nbytes == Float16Histogram.nbytes_for(3) == 3 * 65536 * 4
    assert np.isnan(Float16Histogram(2).quantiles((0.5,))).all()


def test_histogram_counted_in_unit_stripes_by_threads_equals_one_count():
    """Disjoint unit ranges counted at once by several threads (how extraction's writers count one layer) give the
    counts of one whole add; a range only touches its own units."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    maps = np.maximum(rng.standard_normal((16, 10, 4, 4)), 0).astype(np.float16)  # (image, unit, y, x)
    whole, striped = Float16Histogram(10), Float16Histogram(10)
    whole.add(maps)
    stripes = [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: striped.add(maps, s), stripes))
    np.testing.assert_array_equal(striped.counts, whole.counts)
    np.testing.assert_array_equal(striped.count, whole.count)
    one = Float16Histogram(10)
    one.add(maps, slice(3, 6))
    assert one.count.tolist() == [0] * 3 + [16 * 16] * 3 + [0] * 4
    assert not one.counts[:3].any() and not one.counts[6:].any()
    with pytest.raises(ValueError, match="step 1"):
        one.add(maps, slice(0, 10, 2))
