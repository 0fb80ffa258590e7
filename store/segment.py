"""Breast segmentation of an oriented, windowed mammogram: breast, background, skin line, film labels, pectoral muscle.

    >>> from store.images import read_image
    >>> from store.segment import segment_breast
    >>> img = read_image("1-131.dcm")
    >>> seg = segment_breast(img.display(scale=0.2), view=img.view)
    >>> seg.breast.shape, seg.breast.dtype, seg.pectoral.any()      # ((893, 570), dtype('bool'), True)

Classic image processing (scipy.ndimage), no learned model: the masks are the "natural" concepts of the demo
dataset, so they must be explainable and deterministic. The input follows store.images' orientation contract:
chest wall on the LEFT edge, bright = dense, values in [0, 1]. Every size parameter is a fraction of the image
width, so any display scale works.

Masks (boolean (y, x), same shape as the input):
- `breast`: the largest bright region touching the left (chest wall) edge, holes filled.
- `background`: everything that is neither breast nor film label nor film edge.
- `skin`: a band `skin_frac` × width wide inside the breast along its outline (not along the image's own edges).
- `film_label`: bright objects outside the breast — burned-in text, laterality markers, tape.
- `film_edge`: bright strips along the sides of a scanned film (light leaks, film borders), kept apart from labels.
- `pectoral`: MLO only, the pectoral muscle triangle at the top-left; empty (with `pectoral_reason` saying why)
  when no straight, bright, top-left edge is found that passes the shape checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = ["SegmentConfig", "Segmentation", "segment_breast"]


@dataclass(frozen=True)
class SegmentConfig:
    """Tunable fractions; the defaults were chosen by looking at overlays of the 8 CBIS-DDSM films.

        >>> segment_breast(disp, config=SegmentConfig(skin_frac=0.01))
    """

    smooth_frac: float = 0.002  # gaussian sigma before thresholding (noise, film grain)
    threshold_frac: float = 0.25  # breast threshold = this × Otsu threshold (keeps the faint fatty periphery)
    min_threshold: float = 0.02  # … but at least this far above black
    open_frac: float = 0.02  # opening radius: cuts film-edge strips and text that touch the breast
    skin_frac: float = 0.008  # skin band width
    label_level: float = 0.2  # film labels: at least this bright (and 2.5 × the breast threshold) …
    label_min_px: int = 4  # … and at least this many pixels
    label_grow_frac: float = 0.003  # labels grown by this to cover anti-aliased glyph edges
    edge_min_frac: float = 0.08  # a film-edge strip runs along ≥ this fraction of an image side …
    edge_elongation: float = 6.0  # … and is at least this many times longer than thick
    wall_strip_frac: float = 0.06  # rows whose tissue reaches < this far from the left edge are edge glow
    pectoral_smooth_frac: float = 0.01  # smoothing before looking for the muscle's edge
    pectoral_max_rows: float = 0.8  # the muscle ends above this fraction of the height
    pectoral_tol_frac: float = 0.012  # a straight edge: candidates within this of the line
    pectoral_x_top: tuple[float, float] = (0.05, 0.8)  # where the edge may meet the top, fraction of the width
    pectoral_min_contrast: float = 0.03  # muscle at least this much brighter than the tissue beside it


@dataclass
class Segmentation:
    """Boolean (y, x) masks of one oriented mammogram; see the module docstring for their meaning."""

    breast: np.ndarray  # bool (y, x)
    background: np.ndarray  # bool (y, x)
    skin: np.ndarray  # bool (y, x)
    film_label: np.ndarray  # bool (y, x)
    film_edge: np.ndarray  # bool (y, x): bright strips along the film's sides (scanner/film edge), not labels
    pectoral: np.ndarray  # bool (y, x); empty unless an MLO pectoral muscle was found
    threshold: float = 0.0  # the breast threshold used, in display units
    pectoral_reason: str = ""  # why `pectoral` is empty ("" when found)
    pectoral_line: tuple[float, float] | None = field(default=None)  # (x at top, y at left edge) of the muscle edge

    def masks(self) -> dict[str, np.ndarray]:
        """Concept id → mask, with the concept ids of docs/CONTRACTS.md."""
        return {
            "background": self.background,
            "skin": self.skin,
            "film_label": self.film_label,
            "film_edge": self.film_edge,
            "pectoral_muscle": self.pectoral,
        }


def _disk(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r


def segment_breast(display: np.ndarray, *, view: str = "", config: SegmentConfig | None = None) -> Segmentation:
    """Segment an oriented display image (float32 (y, x) in [0, 1], chest wall left) into concept masks.

        >>> seg = segment_breast(img.display(scale=0.25), view="MLO")
    """
    from .images import otsu_threshold

    cfg = config or SegmentConfig()
    img = np.asarray(display, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"display has shape {img.shape}: expected a 2-D (y, x) image at least 16×16")
    if not np.isfinite(img).all():
        raise ValueError("display contains NaN or infinite values")
    h, w = img.shape
    px = lambda frac: max(1, int(round(frac * w)))  # noqa: E731 — size fractions → pixels

    smooth = ndi.gaussian_filter(img, sigma=max(0.5, cfg.smooth_frac * w))  # (y, x)
    otsu = otsu_threshold(smooth)
    thr = max(cfg.min_threshold, cfg.threshold_frac * otsu)
    fg = smooth > thr

    # Opening detaches thin strips (film edges, text) that touch the breast; the breast survives it whole.
    opened = ndi.binary_opening(fg, structure=_disk(px(cfg.open_frac)))
    # Scanned films glow along the chest wall side above and below the breast: rows whose run of "tissue" from the
    # left edge is short are cut from the seed (the breast's own narrow tips come back with the dilation below).
    run = np.argmin(np.pad(opened, ((0, 0), (0, 1))), axis=1)  # (y,) length of the run from x = 0
    opened &= (run >= px(cfg.wall_strip_frac))[:, None] | ~_left_run(opened)
    labels, n = ndi.label(opened)
    breast = np.zeros_like(fg)
    if n:
        left = np.unique(labels[:, 0])
        left = left[left > 0]
        sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        if left.size:
            best = left[np.argmax(sizes[left - 1])]
        else:  # nothing touches the chest wall edge (unusual crop): fall back to the largest region
            best = int(np.argmax(sizes)) + 1
        breast = labels == best
        # Give back what the opening shaved off the outline, but only where the threshold said "tissue".
        breast = ndi.binary_dilation(breast, structure=_disk(px(cfg.open_frac))) & fg
        breast = _largest(breast)
        breast = ndi.binary_fill_holes(breast)

    # Skin: the outline band. Erosion with border_value=1 treats the image edges as tissue so that the chest wall
    # cut and the top/bottom film edges are not called skin.
    inner = ndi.binary_erosion(breast, structure=_disk(px(cfg.skin_frac)), border_value=1)
    skin = breast & ~inner

    # Film labels: bright objects outside the (slightly grown) breast; long thin strips along a side are film edges.
    grown = ndi.binary_dilation(breast, structure=_disk(px(2 * cfg.skin_frac)))
    bright = (smooth > max(cfg.label_level, 2.5 * thr)) & ~grown
    film, edge = _split_edges(bright, cfg)
    grow = _disk(px(cfg.label_grow_frac))
    film = ndi.binary_dilation(film, structure=grow) & ~breast
    edge = ndi.binary_dilation(edge, structure=grow) & ~breast & ~film

    pectoral = np.zeros_like(breast)
    reason, line = "not an MLO view", None
    if view.upper() in ("MLO", "ML", "LM", "LMO"):
        pectoral, reason, line = _pectoral(img, breast, cfg)
    background = ~breast & ~film & ~edge
    return Segmentation(
        breast=breast,
        background=background,
        skin=skin,
        film_label=film,
        film_edge=edge,
        pectoral=pectoral,
        threshold=float(thr),
        pectoral_reason=reason,
        pectoral_line=line,
    )


def _split_edges(bright: np.ndarray, cfg: SegmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """(labels, film edges) among the bright components: edges run along a side and are thin."""
    h, w = bright.shape
    lab, n = ndi.label(bright)
    film = np.zeros_like(bright)
    edge = np.zeros_like(bright)
    if not n:
        return film, edge
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        comp = lab[sl] == i
        area = int(comp.sum())
        if area < cfg.label_min_px:
            continue
        ys, xs = sl
        runs = []  # (length along the side, side length) for each side the component touches
        if ys.start == 0 or ys.stop == h:
            runs.append((xs.stop - xs.start, w))
        if xs.start == 0 or xs.stop == w:
            runs.append((ys.stop - ys.start, h))
        is_edge = any(
            length >= cfg.edge_min_frac * side and length * length >= cfg.edge_elongation * area
            for length, side in runs
        )
        (edge if is_edge else film)[sl] |= comp
    return film, edge


def _left_run(mask: np.ndarray) -> np.ndarray:
    """Bool (y, x): pixels of `mask` connected to the left edge along their own row."""
    return np.cumprod(mask, axis=1, dtype=np.uint8).astype(bool)


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def _pectoral(
    img: np.ndarray, breast: np.ndarray, cfg: SegmentConfig
) -> tuple[np.ndarray, str, tuple[float, float] | None]:
    """The pectoral muscle of an MLO view: the breast region left of a straight, bright-to-dark edge at the top-left.

    Edge candidates are the strongest bright→dark steps along each upper row (inside the breast, away from the skin
    line); a Hough vote over lines x = a + b·y picks the straight edge with the most support. The result is kept
    only when it passes shape and contrast checks; otherwise the mask is empty and the reason says which check failed.
    """
    h, w = img.shape
    empty = np.zeros_like(breast)
    sm = ndi.gaussian_filter(img, sigma=max(1.0, cfg.pectoral_smooth_frac * w))  # (y, x)
    gx = ndi.sobel(sm, axis=1)  # (y, x); bright → dark going right is negative
    rows = np.flatnonzero(breast.any(axis=1))
    if rows.size == 0 or not breast[0].any():
        return empty, "breast does not reach the top edge (no axilla in view)", None
    right = w - 1 - np.argmax(breast[:, ::-1], axis=1)  # (y,) rightmost breast column per row
    margin = max(2, int(round(cfg.skin_frac * 4 * w)))
    ys, xs, ws = [], [], []
    for y in range(0, int(cfg.pectoral_max_rows * h)):
        lim = int(right[y]) - margin
        if not breast[y].any() or lim < 8:
            continue
        g = gx[y, 2:lim]
        strong = -g.min()
        if strong <= 0:
            continue
        # local minima of the gradient that are at least a third as strong as the row's strongest step
        loc = np.flatnonzero((g[1:-1] < g[:-2]) & (g[1:-1] <= g[2:]) & (g[1:-1] < -strong / 3)) + 1
        for x in loc[np.argsort(g[loc])][:3]:
            ys.append(y)
            xs.append(x + 2)
            ws.append(-g[x])
    if len(ys) < 10:
        return empty, "too few edge candidates at the top-left", None
    ys, xs, ws = np.asarray(ys, float), np.asarray(xs, float), np.asarray(ws, float)
    tol = max(1.5, cfg.pectoral_tol_frac * w)
    best = (0.0, 0.0, 0.0)  # (score, a, b)
    for b in np.linspace(-2.0, -0.05, 80):  # x decreases going down: the muscle narrows toward the bottom
        a_i = xs - b * ys
        bins = np.floor(a_i / tol).astype(int)
        lo = bins.min()
        votes = np.bincount(bins - lo, weights=ws)
        votes[:-1] += votes[1:]  # each candidate line also counts its neighbour bin: no split votes
        k = int(np.argmax(votes))
        if votes[k] > best[0]:
            best = (float(votes[k]), (lo + k + 1) * tol, float(b))
    _, a, b = best
    inl = np.abs(xs - (a + b * ys)) <= 1.5 * tol
    if inl.sum() >= 3:  # least-squares refinement on the inliers
        b, a = np.polyfit(ys[inl], xs[inl], 1, w=ws[inl])
    if not b < 0:
        return empty, "the strongest straight edge does not slope like a pectoral muscle", None
    y0 = -a / b  # where the edge meets the left (chest wall) edge
    if not (cfg.pectoral_x_top[0] * w <= a <= min(cfg.pectoral_x_top[1] * w, right[0])):
        return empty, f"edge meets the top at x={a:.0f}, outside the plausible range", None
    if not (0.1 * h <= y0 <= cfg.pectoral_max_rows * h):
        return empty, f"edge meets the chest wall at y={y0:.0f}, outside the plausible range", None
    span = np.unique(ys[inl & (ys < y0)]).size
    if span < 0.5 * (min(y0, h) / 1.0):
        return empty, f"straight edge supported on only {span} of {int(min(y0, h))} rows", None
    yy, xx = np.mgrid[0:h, 0:w]
    line = a + b * yy  # (y, x) the edge's x on each row
    pect = breast & (xx < line)
    band = breast & (xx >= line) & (xx < line + 0.1 * w) & (yy < y0)
    if pect.sum() < 0.01 * breast.sum() or band.sum() == 0:
        return empty, "pectoral region too small", None
    contrast = float(img[pect].mean() - img[band].mean())
    if contrast < cfg.pectoral_min_contrast:
        return empty, f"muscle only {contrast:.3f} brighter than the tissue beside it", None
    return pect, "", (float(a), float(y0))
