"""Streaming per-unit statistics whose memory does not grow with the number of images.

    >>> from store.stats import Float16Histogram, Float16Quantiles, TopK, RunningStats
    >>> h = Float16Histogram(units=64)                # one pass: a counter for each of the 2**16 float16 values
    >>> for maps in blocks():                         # float16 (image, unit, y, x)
    ...     h.add(maps)
    >>> h.quantiles((0.5, 0.99))                      # float32 (unit, level), equal to numpy.quantile
    >>> q = Float16Quantiles(units=64, levels=(0.5, 0.99))   # the same numbers in two passes and ~100× less memory
    >>> for p in range(q.passes):                     # two passes over the same data, in any order
    ...     for maps in blocks():                     # float16 (image, unit, y, x), or (image, unit)
    ...         q.add(maps)
    ...     q.end_pass()
    >>> q.quantile(0.99)                              # float32 (unit,) — equal to numpy.quantile of the values
    >>> top = TopK(units=64, k=8); top.add(pooled_max, start=0); idx, val = top.result()   # (unit, k) each

Each object is created empty, fed with `add(batch)`, read with a verb, saved with `state_dict()` and restored with
`load_state_dict()`; objects fed with disjoint data merge with `merge(other)` (e.g. one per DDP rank).

Both quantile objects are exact, not sketches with an error bound: float16 has 2**16 bit patterns. Float16Histogram
counts every pattern per unit in one pass (units × 256 KiB of uint32 counters, whatever the number of images); it is
what extraction feeds from memory while it writes: its `add` runs a compiled loop (numba, which umap-learn already
brings; compiled once and cached on disk) that releases the GIL, so counting overlaps the forward passes — numpy's
bincount spends its time on 2**16 counters per unit per call instead (about 7× slower for 32-image blocks), and is
the fallback when numba cannot be imported. Float16Quantiles finds the same quantiles by a two-pass radix
select on the 16-bit keys — pass 1 counts the high byte (256 bins per unit), which tells
the bin that holds each rank needed by the levels; pass 2 counts the low byte inside those bins only. Memory is
units × (256 + 2·levels·256) counters whatever the number of images, and the result equals `numpy.quantile(values,
level)` (method "linear") of the float16 values computed in float64 and rounded to float32. The only difference from
quantiles of the float32 activations is float16 rounding of the inputs: relative error ≤ 2**-11 for normal numbers
(absolute ≤ 2**-25 below 2**-14).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Float16Histogram", "Float16Quantiles", "TopK", "RunningStats", "float16_keys", "keys_to_float16"]

_SIGN = np.uint16(0x8000)


def float16_keys(values: np.ndarray) -> np.ndarray:
    """float16 values → uint16 keys whose unsigned order is the numeric order (-inf < … < -0 < +0 < … < +inf)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    negative = (bits & _SIGN) != 0
    return np.where(negative, ~bits, bits | _SIGN).astype(np.uint16, copy=False)


def keys_to_float16(keys: np.ndarray) -> np.ndarray:
    """Inverse of `float16_keys`."""
    keys = np.asarray(keys, dtype=np.uint16)
    positive = (keys & _SIGN) != 0
    return np.where(positive, keys & np.uint16(0x7FFF), ~keys).astype(np.uint16).view(np.float16)


def _as_unit_rows(values: np.ndarray, units: int) -> np.ndarray:
    """(n, unit, ...) → keys (n, unit, rest) with the unit axis second."""
    values = np.asarray(values)
    if values.ndim < 2 or values.shape[1] != units:
        raise ValueError(f"expected values shaped (n, {units}, …) with units on axis 1, got {values.shape}")
    return float16_keys(values).reshape(values.shape[0], units, -1)


def _count_keys(bits: np.ndarray, counts: np.ndarray) -> None:
    """counts[u, key(bits[i, u, p])] += 1 for uint16 float16 bit patterns (n, unit, rest) into uint32 (unit, 2**16).

    The key is float16_keys' order-preserving map, computed inline. Units are the outer loop so that one unit's
    256 KiB of counters stays in cache while its values are counted. (Counting the zeros of ReLU maps apart, in a
    register, was 3× slower: whether a value is zero is a branch the CPU cannot predict.)
    """
    n, units, rest = bits.shape
    for u in range(units):
        row = counts[u]
        for i in range(n):
            for p in range(rest):
                b = bits[i, u, p]
                if b & 0x8000:
                    row[b ^ 0xFFFF] += 1
                else:
                    row[b | 0x8000] += 1


_COMPILED: dict[str, object] = {}


def _count_kernel():
    """The compiled `_count_keys` (nogil), or None when numba is unavailable (numpy's bincount is used instead)."""
    if "count" not in _COMPILED:
        try:
            import numba

            _COMPILED["count"] = numba.njit(nogil=True, cache=True)(_count_keys)
        except Exception:  # noqa: BLE001 — any import or setup failure means the numpy path, which is exact too
            _COMPILED["count"] = None
    return _COMPILED["count"]


def _lerp(a, b, t):
    """numpy.quantile's linear interpolation (the same formula, so results match it bit for bit)."""
    diff = b - a
    out = a + diff * t
    return np.where(t >= 0.5, b - diff * (1 - t), out)


class Float16Histogram:
    """Per-unit counts of every float16 value: exact quantiles at any level after one pass (see module docstring)."""

    def __init__(self, units: int):
        self.units = int(units)
        self.counts = np.zeros((self.units, 1 << 16), np.uint32)  # (unit, key); keys from float16_keys
        self.n = np.zeros(self.units, np.int64)  # values counted per unit

    @staticmethod
    def nbytes_for(units: int) -> int:
        """Memory of the counters for `units` units (an add briefly needs 512 KiB more)."""
        return int(units) * (1 << 16) * 4

    def add(self, values: np.ndarray, units: slice | None = None) -> None:
        """Count a batch shaped (n, unit, …) (float16, or anything that rounds to it); with `units` (a slice of the
        unit axis, step 1), only those units' values: threads counting disjoint unit ranges of one histogram can run
        at the same time (the compiled loop releases the GIL)."""
        values = np.asarray(values)
        if values.ndim < 2 or values.shape[1] != self.units:
            raise ValueError(f"expected values shaped (n, {self.units}, …) with units on axis 1, got {values.shape}")
        lo, hi, step = (units or slice(None)).indices(self.units)
        if step != 1:
            raise ValueError(f"units must be a slice with step 1, got {units}")
        values = values[:, lo:hi]
        bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16).reshape(values.shape[0], hi - lo, -1)
        if bits.size == 0:
            return
        counts, n = self.counts[lo:hi], self.n[lo:hi]
        per_unit = bits.shape[0] * bits.shape[2]
        if int(n.max(initial=0)) + per_unit >= 2 ** 32:
            raise OverflowError("Float16Histogram: more than 2**32 values per unit")
        kernel = _count_kernel()
        if kernel is not None:
            kernel(bits, counts)
            n += per_unit
            return
        keys = float16_keys(bits.view(np.float16))  # (n, unit, rest)
        for u in range(hi - lo):  # one unit at a time: its 2**16 counters stay in cache (faster than one bincount)
            np.add(counts[u], np.bincount(keys[:, u].ravel(), minlength=1 << 16), out=counts[u], casting="unsafe")
        n += per_unit

    def merge(self, other: "Float16Histogram") -> None:
        if other.units != self.units:
            raise ValueError("Float16Histogram.merge: different units")
        if int((self.n + other.n).max(initial=0)) >= 2 ** 32:
            raise OverflowError("Float16Histogram: more than 2**32 values per unit")
        self.counts += other.counts
        self.n += other.n

    @property
    def count(self) -> np.ndarray:
        """(unit,) number of values seen per unit."""
        return self.n.copy()

    def quantiles(self, levels: Sequence[float]) -> np.ndarray:
        """float32 (unit, level): numpy.quantile (linear) of each unit's values; NaN for a unit with none."""
        levels = tuple(float(q) for q in levels)
        out = np.full((self.units, len(levels)), np.nan, np.float64)
        for u in range(self.units):
            cum = np.cumsum(self.counts[u], dtype=np.int64)
            n = int(cum[-1])
            if n == 0:
                continue
            h = (n - 1) * np.asarray(levels)
            lo = np.floor(h).astype(np.int64)
            hi = np.minimum(lo + 1, n - 1)
            keys = np.searchsorted(cum, np.concatenate([lo, hi]), side="right").astype(np.uint16)
            vals = keys_to_float16(keys).astype(np.float64)
            a, b = vals[:len(levels)], vals[len(levels):]
            out[u] = np.where(a == b, a, _lerp(a, b, h - lo))
        return out.astype(np.float32)

    def quantile(self, q: float) -> np.ndarray:
        """float32 (unit,)."""
        return self.quantiles((q,))[:, 0]

    def state_dict(self) -> dict:
        return {"units": self.units, "counts": self.counts.copy(), "n": self.n.copy()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["units"]) != self.units:
            raise ValueError("Float16Histogram.load_state_dict: units differ")
        self.counts = np.asarray(state["counts"], np.uint32).copy()
        self.n = np.asarray(state["n"], np.int64).copy()


class Float16Quantiles:
    """Exact per-unit quantiles of float16 values at fixed levels, in two streaming passes (see module docstring)."""

    passes = 2

    def __init__(self, units: int, levels: Sequence[float]):
        levels = tuple(float(q) for q in levels)
        if not levels or any(not 0.0 <= q <= 1.0 for q in levels):
            raise ValueError(f"levels must be in [0, 1], got {levels}")
        self.units = int(units)
        self.levels = levels
        self.pass_index = 0  # 0: counting high bytes, 1: counting low bytes in selected bins, 2: done
        self.coarse = np.zeros((self.units, 256), np.int64)  # (unit, high byte)
        self.slots = np.full((self.units, 256), -1, np.int32)  # (unit, high byte) → slot in `fine`, -1 if unused
        self.fine = np.zeros((self.units, 0, 256), np.int64)  # (unit, slot, low byte)

    # -- feeding --------------------------------------------------------------------------------------------------
    def add(self, values: np.ndarray) -> None:
        """Count a batch shaped (n, unit, …) (float16, or anything that rounds to it) in the current pass."""
        keys = _as_unit_rows(values, self.units)  # (n, unit, rest)
        offsets = np.arange(self.units, dtype=np.int64)[None, :, None]
        if self.pass_index == 0:
            idx = offsets * 256 + (keys >> 8)
            self.coarse += np.bincount(idx.ravel(), minlength=self.units * 256).reshape(self.units, 256)
        elif self.pass_index == 1:
            n_slots = self.fine.shape[1]
            slot = self.slots[offsets, keys >> 8]  # (n, unit, rest)
            keep = slot >= 0
            idx = ((offsets * n_slots + slot) * 256 + (keys & 0xFF))[keep]
            self.fine += np.bincount(idx, minlength=self.units * n_slots * 256).reshape(self.units, n_slots, 256)
        else:
            raise RuntimeError("Float16Quantiles: both passes are done; create a new object for new data")

    def end_pass(self) -> None:
        """Close the current pass: after pass 1, choose the high-byte bins that pass 2 must resolve."""
        if self.pass_index == 0:
            needed = [sorted({b for _, b in self._bins(u)}) for u in range(self.units)]
            n_slots = max((len(b) for b in needed), default=0)
            self.fine = np.zeros((self.units, n_slots, 256), np.int64)
            for u, bins in enumerate(needed):
                self.slots[u, bins] = np.arange(len(bins), dtype=np.int32)
        elif self.pass_index > 1:
            raise RuntimeError("Float16Quantiles: no pass left to end")
        self.pass_index += 1

    def merge(self, other: "Float16Quantiles") -> None:
        """Add the counts of an object fed with other data in the same pass (after the same pass-1 merge)."""
        if (other.units, other.levels, other.pass_index) != (self.units, self.levels, self.pass_index):
            raise ValueError("Float16Quantiles.merge: different units, levels or pass")
        if self.pass_index == 0:
            self.coarse += other.coarse
        else:
            if not np.array_equal(self.slots, other.slots):
                raise ValueError("Float16Quantiles.merge: pass-2 bins differ; merge after pass 1, then end_pass")
            self.fine += other.fine

    # -- reading --------------------------------------------------------------------------------------------------
    @property
    def count(self) -> np.ndarray:
        """(unit,) number of values seen per unit in pass 1."""
        return self.coarse.sum(axis=1)

    def _ranks(self, u: int):
        n = int(self.coarse[u].sum())
        for q in self.levels:
            h = (n - 1) * q
            lo = int(np.floor(h))
            yield q, h, lo, min(lo + 1, n - 1)

    def _bins(self, u: int):
        """(rank, high-byte bin) for each rank the levels of unit u need."""
        cum = np.cumsum(self.coarse[u])
        if cum[-1] == 0:
            return
        for _, _, lo, hi in self._ranks(u):
            for r in (lo, hi):
                yield r, int(np.searchsorted(cum, r, side="right"))

    def _value_at(self, u: int, rank: int, cum_coarse: np.ndarray) -> np.float64:
        b = int(np.searchsorted(cum_coarse, rank, side="right"))
        before = int(cum_coarse[b - 1]) if b else 0
        fine = np.cumsum(self.fine[u, self.slots[u, b]])
        low = int(np.searchsorted(fine, rank - before, side="right"))
        return np.float64(keys_to_float16(np.uint16((b << 8) | low)))

    def quantiles(self) -> np.ndarray:
        """float32 (unit, level): every level for every unit (NaN for a unit that saw no values)."""
        if self.pass_index < 2:
            raise RuntimeError(f"Float16Quantiles: {2 - self.pass_index} pass(es) still to feed before reading")
        out = np.full((self.units, len(self.levels)), np.nan, np.float64)
        for u in range(self.units):
            cum = np.cumsum(self.coarse[u])
            if cum[-1] == 0:
                continue
            for j, (_, h, lo, hi) in enumerate(self._ranks(u)):
                a, b = self._value_at(u, lo, cum), self._value_at(u, hi, cum)
                out[u, j] = _lerp(a, b, np.float64(h - lo)) if a != b else a
        return out.astype(np.float32)

    def quantile(self, q: float) -> np.ndarray:
        """float32 (unit,) at one of the levels given at construction."""
        try:
            j = self.levels.index(float(q))
        except ValueError:
            raise ValueError(f"level {q} was not requested (levels: {self.levels})") from None
        return self.quantiles()[:, j]

    # -- saving ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"units": self.units, "levels": list(self.levels), "pass_index": self.pass_index,
                "coarse": self.coarse.copy(), "slots": self.slots.copy(), "fine": self.fine.copy()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["units"]) != self.units or tuple(state["levels"]) != self.levels:
            raise ValueError("Float16Quantiles.load_state_dict: units or levels differ")
        self.pass_index = int(state["pass_index"])
        self.coarse = np.asarray(state["coarse"], np.int64).copy()
        self.slots = np.asarray(state["slots"], np.int32).copy()
        self.fine = np.asarray(state["fine"], np.int64).copy()


class TopK:
    """Per-unit k largest values over images, with their image indices; ties go to the lower index.

        >>> top = TopK(units=3, k=2)
        >>> top.add(np.array([[1., 5., 2.], [4., 5., 0.]]), start=10)   # values (image, unit), images 10 and 11
        >>> top.result()[0]                            # int32 (unit, k): [[11, 10], [10, 11], [10, 11]]

    Until k images are seen the tail is index -1, value NaN. NaN values rank below every number.
    """

    def __init__(self, units: int, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.units, self.k = int(units), int(k)
        self.indices = np.full((self.units, self.k), -1, np.int64)  # (unit, k)
        self.values = np.full((self.units, self.k), np.nan, np.float64)  # (unit, k)

    def add(self, values: np.ndarray, *, start: int | None = None, indices: np.ndarray | None = None) -> None:
        """values (image, unit); image indices are `start + row` or the given `indices` (image,)."""
        values = np.asarray(values, np.float64)
        if values.ndim != 2 or values.shape[1] != self.units:
            raise ValueError(f"expected values shaped (image, {self.units}), got {values.shape}")
        if indices is None:
            if start is None:
                raise ValueError("TopK.add needs start= or indices=")
            indices = np.arange(start, start + values.shape[0])
        indices = np.asarray(indices, np.int64)
        self._combine(values.T, np.broadcast_to(indices, (self.units, indices.size)))

    @classmethod
    def of(cls, indices: np.ndarray, values: np.ndarray) -> "TopK":
        """A TopK holding the given (unit, k) indices and values (e.g. another process's `indices` and `values`)."""
        top = cls(*np.shape(indices))
        top.load_state_dict({"units": top.units, "k": top.k, "indices": indices, "values": values})
        return top

    def merge(self, other: "TopK") -> None:
        """Fold in the best values of an object fed with other images."""
        if (other.units, other.k) != (self.units, self.k):
            raise ValueError("TopK.merge: different units or k")
        self._combine(other.values, other.indices)

    def _combine(self, values: np.ndarray, indices: np.ndarray) -> None:
        """Keep the k best of the current best and values/indices (unit, m)."""
        vals = np.concatenate([self.values, values], axis=1)  # (unit, k + m)
        idx = np.concatenate([self.indices, indices], axis=1)
        rank_val = np.where(np.isnan(vals), -np.inf, vals)
        missing = idx < 0  # empty slots sort last
        order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, idx), -rank_val, missing), axis=-1)[:, :self.k]
        self.values = np.take_along_axis(vals, order, axis=1)
        self.indices = np.take_along_axis(idx, order, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices int32 (unit, k), values float32 (unit, k)), best first."""
        return self.indices.astype(np.int32), self.values.astype(np.float32)

    def state_dict(self) -> dict:
        return {"units": self.units, "k": self.k, "indices": self.indices.copy(), "values": self.values.copy()}

    def load_state_dict(self, state: dict) -> None:
        if (int(state["units"]), int(state["k"])) != (self.units, self.k):
            raise ValueError("TopK.load_state_dict: units or k differ")
        self.indices = np.asarray(state["indices"], np.int64).copy()
        self.values = np.asarray(state["values"], np.float64).copy()


class RunningStats:
    """Per-unit count, mean, minimum and maximum over every value of a stream of (n, unit, …) batches.

        >>> s = RunningStats(units=64); s.add(maps); s.mean(), s.max()       # float64 (unit,) each
    """

    def __init__(self, units: int):
        self.units = int(units)
        self.n = np.zeros(self.units, np.int64)
        self.total = np.zeros(self.units, np.float64)
        self.low = np.full(self.units, np.inf)
        self.high = np.full(self.units, -np.inf)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.ndim < 2 or values.shape[1] != self.units:
            raise ValueError(f"expected values shaped (n, {self.units}, …), got {values.shape}")
        rows = np.moveaxis(values, 1, 0).reshape(self.units, -1)  # (unit, n·rest)
        if rows.shape[1] == 0:
            return
        self.n += rows.shape[1]
        self.total += rows.sum(axis=1, dtype=np.float64)
        self.low = np.minimum(self.low, rows.min(axis=1))
        self.high = np.maximum(self.high, rows.max(axis=1))

    def merge(self, other: "RunningStats") -> None:
        self.n += other.n
        self.total += other.total
        self.low = np.minimum(self.low, other.low)
        self.high = np.maximum(self.high, other.high)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.total / np.maximum(self.n, 1), np.nan)

    def max(self) -> np.ndarray:
        return np.where(self.n > 0, self.high, np.nan)

    def min(self) -> np.ndarray:
        return np.where(self.n > 0, self.low, np.nan)

    def state_dict(self) -> dict:
        return {"units": self.units, "n": self.n.copy(), "total": self.total.copy(), "low": self.low.copy(),
                "high": self.high.copy()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["units"]) != self.units:
            raise ValueError("RunningStats.load_state_dict: units differ")
        self.n, self.total = np.asarray(state["n"]).copy(), np.asarray(state["total"], np.float64).copy()
        self.low, self.high = np.asarray(state["low"]).copy(), np.asarray(state["high"]).copy()
