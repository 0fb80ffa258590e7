"""Synthetic lesions with exact masks, drawn into real mammograms at display resolution.

    >>> import numpy as np
    >>> from training.synth import LesionConfig, draw_lesion, place_lesions, insert_lesions
    >>> rng = np.random.default_rng(0)
    >>> lesions = place_lesions(display, allowed, rng, LesionConfig(), count=6)   # non-overlapping, inside `allowed`
    >>> with_lesions = insert_lesions(display, lesions)                         # float32 (y, x) in [0, 1]
    >>> lesions[0].kind, sorted(lesions[0].masks), lesions[0].attributes["size_mm"]

Image model. The display image is windowed, digitized film: bright = dense, and a digitizer's value is close to
linear in optical density, i.e. in the logarithm of the transmitted X-rays. Extra tissue of attenuation A (in
display units) therefore ADDS to the value: ``I' = I + A``, so the tissue's own texture shows through a lesion
unchanged. A is negative only in the radiolucent halo around a circumscribed mass (fat pushed aside by it: the
"halo sign"), where a pixel darkens, at most to half its value. Dense (bright) surroundings hide a lesion, because
a mass replaces fibroglandular tissue of similar attenuation rather than adding to fat: the added value is scaled by
``1 - MASKING · local density`` (the image smoothed over ≈3 mm). Film saturates towards white, so values above
`SHOULDER` follow a soft shoulder (``shoulder(I)``) that approaches 1 without reaching it: nothing leaves [0, 1].
Pixels where A = 0 are copied bit for bit, so the changed pixels are exactly the lesion's footprint (A ≠ 0), which
lies within `LesionConfig.edge_margin_px` of the lesion's masks.

Lesion kinds and their masks (boolean (y, x), concept ids of docs/CONTRACTS.md):
- ``mass``: round / oval / irregular body (radial boundary with harmonics), denser in the centre (a sphere-like
  thickness profile) with mottled internal texture. Masks: ``mass`` (the body), and the margin:
  ``circumscribed_margin`` (sharp border with a thin dark halo just outside it; mask = the body's inner rim plus the
  halo, a band across the border) or ``spiculated_margin`` (soft border fading over `soft_edge_px`, thin tapered
  spicules radiating outward; mask = the band across the border where the edge fades, plus the spicules).
- ``calcification``: 5–20 bright specks, fine (≈1 px ≈ 0.4 mm) or coarse (2–3 px), in a round cluster or a linear
  (segmental) run; each speck blurred by a 3×3 point-spread kernel. Mask = the specks dilated by 1 px.
- ``architectural_distortion``: thin lines converging on a point, no central mass. Mask = the lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "LesionConfig",
    "Lesion",
    "LESION_KINDS",
    "LESION_CONCEPTS",
    "draw_lesion",
    "draw_mass",
    "draw_calcification",
    "draw_distortion",
    "place_lesions",
    "insert_lesions",
    "attenuation_map",
    "shoulder",
    "unshoulder",
    "SHOULDER",
    "MASKING",
]

LESION_KINDS = ("mass", "calcification", "architectural_distortion")
# Every concept a lesion can carry; the first mask of each kind is its "body" (what labels a patch positive).
LESION_CONCEPTS = ("mass", "circumscribed_margin", "spiculated_margin", "calcification", "architectural_distortion")
_MIN_ATTENUATION = 1e-3  # below this a pixel is left untouched, so "changed" and "footprint" agree exactly
_SUPERSAMPLE = 4  # sub-pixels per pixel side for anti-aliased mass borders and speck coverage


@dataclass(frozen=True)
class LesionConfig:
    """Sizes in millimetres (converted with `mm_per_px`), attenuations in the units of the image model above.

        >>> LesionConfig(mm_per_px=0.4, kind_weights=(1.0, 0.0, 0.0))   # masses only
    """

    mm_per_px: float = 0.4  # display pixel size: CBIS-DDSM films at ≈50 µm, displayed at 1/8
    kind_weights: tuple[float, float, float] = (0.45, 0.3, 0.25)  # mass, calcification, architectural distortion
    # masses
    mass_diameter_mm: tuple[float, float] = (7.0, 18.0)  # drawn log-uniformly (5–18 until 2026-11-29: docs/DATA.md)
    mass_attenuation: tuple[float, float] = (0.3, 0.5)  # at the centre of the body, display units
    shape_weights: tuple[float, float, float] = (0.3, 0.3, 0.4)  # round, oval, irregular
    spiculated_given_shape: tuple[float, float, float] = (0.25, 0.3, 0.7)  # P(spiculated | round, oval, irregular)
    soft_edge_px: float = 2.5  # width of the fading border of non-circumscribed masses
    spicule_count: tuple[int, int] = (6, 14)
    spicule_length: tuple[float, float] = (0.5, 1.8)  # beyond the border, × the mass radius
    spicule_strength: tuple[float, float] = (0.6, 0.9)  # × the mass's central attenuation, at the spicule's root
    spicule_sigma_px: tuple[float, float] = (0.9, 0.5)  # gaussian cross-section of a spicule, root → tip
    margin_rim_px: int = 2  # width of the body's inner rim in the circumscribed margin mask (3 until 2026-11-29)
    halo_px: float = 2.0  # width of the radiolucent ring just outside a circumscribed border
    halo_strength: tuple[float, float] = (0.25, 0.4)  # darkening there, × the mass's central attenuation
    # calcifications
    calc_count: tuple[int, int] = (5, 20)
    calc_attenuation: tuple[float, float] = (0.2, 0.45)  # median peak of a speck after the point-spread kernel
    fine_radius_px: tuple[float, float] = (0.45, 0.7)
    coarse_radius_px: tuple[float, float] = (0.9, 1.5)
    cluster_radius_mm: tuple[float, float] = (2.5, 5.0)  # for 10 specks; grows with √count
    segment_length_mm: tuple[float, float] = (8.0, 16.0)
    # architectural distortion
    distortion_lines: tuple[int, int] = (7, 14)
    distortion_radius_mm: tuple[float, float] = (7.0, 13.0)
    distortion_attenuation: tuple[float, float] = (0.15, 0.25)

    @property
    def edge_margin_px(self) -> int:
        """How far (px) changed pixels may lie outside the union of a lesion's masks."""
        return int(math.ceil(max(self.soft_edge_px, self.halo_px))) + 1


@dataclass(eq=False)
class Lesion:
    """One lesion: local arrays over the box [y0, y0 + h) × [x0, x0 + w) of the mammogram it is placed on."""

    kind: str  # one of LESION_KINDS
    attenuation: np.ndarray  # float32 (y, x) local; < 0 only in a halo; 0 outside the footprint
    masks: dict[str, np.ndarray]  # concept → bool (y, x) local, same shape as `attenuation`
    center: tuple[float, float]  # (y, x) local, sub-pixel
    attributes: dict = field(default_factory=dict)  # type, shape, margin, size_mm, morphology, distribution, …
    origin: tuple[int, int] = (0, 0)  # (y0, x0) of the local box on the mammogram, set by place_lesions

    @property
    def footprint(self) -> np.ndarray:
        """bool (y, x) local: the pixels this lesion changes."""
        return self.attenuation != 0

    @property
    def body(self) -> np.ndarray:
        """bool (y, x) local: the mask that makes a patch positive (mass body, specks, or distortion lines)."""
        return self.masks[self.kind]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) on the mammogram."""
        h, w = self.attenuation.shape
        return self.origin[0], self.origin[1], self.origin[0] + h, self.origin[1] + w

    @property
    def global_center(self) -> tuple[float, float]:
        return self.origin[0] + self.center[0], self.origin[1] + self.center[1]

    def full(self, concept_or_array: str | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A local mask (by concept id) or array pasted into a zero (y, x) array of the mammogram's shape."""
        local = self.masks[concept_or_array] if isinstance(concept_or_array, str) else concept_or_array
        out = np.zeros(shape, dtype=local.dtype)
        y0, x0, y1, x1 = self.box
        out[y0:y1, x0:x1] = local
        return out


# -- helpers ------------------------------------------------------------------------------------------------------
def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _grid(size: int, center: tuple[float, float], ss: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of (sub-)pixel centres relative to `center`, for a size×size local box. # (y·ss, x·ss)"""
    c = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss
    return c[:, None] - center[0], c[None, :] - center[1]


def _block_mean(a: np.ndarray, ss: int) -> np.ndarray:
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-pass noise: the mottled inner texture of a mass."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (n - n.mean()) / max(float(n.std()), 1e-9)


def _segment_distance(dy: np.ndarray, dx: np.ndarray, p0, p1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance from grid points to the segment p0→p1 ((y, x) relative to the grid's centre); also the clipped
    and raw position along it (0 at p0, 1 at p1)."""
    vy, vx = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(vy * vy + vx * vx, 1e-12)
    t_raw = ((dy - p0[0]) * vy + (dx - p0[1]) * vx) / length2
    t = np.clip(t_raw, 0.0, 1.0)
    d = np.hypot(dy - (p0[0] + t * vy), dx - (p0[1] + t * vx))
    return d, t, t_raw


def _line(dy, dx, points, *, amplitude: tuple[float, float], sigma: tuple[float, float], cut: float = 1.5):
    """A thin tapered line along a polyline of (y, x) points (relative to the grid's centre): a gaussian
    cross-section whose amplitude and width go linearly from the first point to the last.

    Returns (attenuation, mask): the attenuation is cut to 0 beyond `cut` px from the axis; the mask holds the
    pixels whose value is at least a quarter of the axis value there (≈ the visible line, 1–2 px wide).
    """
    n = len(points) - 1
    att = np.zeros(np.broadcast_shapes(dy.shape, dx.shape))
    mask = np.zeros(att.shape, dtype=bool)
    for i in range(n):
        d, t, t_raw = _segment_distance(dy, dx, points[i], points[i + 1])
        first, last = i == 0, i == n - 1
        u = (i + t) / n  # position along the whole line, 0 → 1
        a = amplitude[0] + (amplitude[1] - amplitude[0]) * u
        s = sigma[0] + (sigma[1] - sigma[0]) * u
        # segments join without gaps; only the two ends of the whole line get short caps
        lo, hi = (-0.2 if first else -np.inf), (1.2 if last else np.inf)
        inside = (d <= cut) & (t_raw >= lo) & (t_raw <= hi)
        np.maximum(att, np.where(inside, a * np.exp(-0.5 * (d / s) ** 2), 0.0), out=att)
        on_axis = (t_raw >= (0.0 if first else -np.inf)) & (t_raw <= (1.0 if last else np.inf))
        mask |= inside & on_axis & (d <= s * math.sqrt(2 * math.log(4.0)))
    return att, mask


def _bent(p0, p1, bend: float, pieces: int = 3) -> list[tuple[float, float]]:
    """Points of a gentle arc from p0 to p1 whose middle is pushed sideways by `bend` × its length."""
    vy, vx = p1[0] - p0[0], p1[1] - p0[1]
    pts = []
    for k in range(pieces + 1):
        u = k / pieces
        off = bend * 4 * u * (1 - u)  # parabola: 0 at the ends, `bend` at the middle
        pts.append((p0[0] + u * vy + off * vx, p0[1] + u * vx - off * vy))
    return pts


def _spread_angles(rng: np.random.Generator, n: int) -> np.ndarray:
    """n directions all around the circle: evenly spaced, each jittered by up to ±40 % of the spacing."""
    step = 2 * math.pi / n
    return rng.uniform(0, 2 * math.pi) + step * (np.arange(n) + rng.uniform(-0.4, 0.4, n))


def _rim(body: np.ndarray, width: int) -> np.ndarray:
    return body & ~ndi.binary_erosion(body, iterations=width, border_value=0)


def _finish(kind: str, att: np.ndarray, masks: dict[str, np.ndarray], center, attributes: dict) -> Lesion:
    """Drop negligible attenuation, check the mask/footprint invariants, crop to the lesion's extent."""
    att = np.where(np.abs(att) >= _MIN_ATTENUATION, att, 0.0).astype(np.float32)
    foot = att != 0
    for concept, m in masks.items():
        if not m.any():
            raise AssertionError(f"synth: {kind} produced an empty {concept} mask")
        if (m & ~foot).any():
            raise AssertionError(f"synth: {kind} mask {concept} has pixels the lesion does not change")
    ys, xs = np.nonzero(foot)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = (slice(y0, y1), slice(x0, x1))
    return Lesion(
        kind=kind,
        attenuation=att[crop],
        masks={c: m[crop].copy() for c, m in masks.items()},
        center=(center[0] - y0, center[1] - x0),
        attributes=attributes,
    )


# -- masses -------------------------------------------------------------------------------------------------------
def _boundary(rng: np.random.Generator, shape: str, radius: float):
    """Radius of the mass border as a function of angle: an ellipse times a few harmonics (lobulation)."""
    if shape == "round":
        q, amps = rng.uniform(0.88, 1.0), [rng.uniform(0.0, 0.03) for _ in range(2)]
    elif shape == "oval":
        q, amps = rng.uniform(0.5, 0.72), [rng.uniform(0.0, 0.03) for _ in range(2)]
    else:  # irregular: lobulated, angular
        q, amps = rng.uniform(0.65, 0.95), [0.0] + [rng.uniform(0.05, 0.13) / math.sqrt(k) for k in range(1, 6)]
    rot = rng.uniform(0, math.pi)
    phases = rng.uniform(0, 2 * math.pi, len(amps))
    a, b = radius / math.sqrt(q), radius * math.sqrt(q)  # same area as the circle of `radius`

    def r_of(theta: np.ndarray) -> np.ndarray:
        c, s = np.cos(theta - rot), np.sin(theta - rot)
        r = a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)
        wobble = sum(amp * np.cos((k + 2) * theta + ph) for k, (amp, ph) in enumerate(zip(amps, phases)))
        return r * (1.0 + wobble)

    return r_of, max(a, b) * (1.0 + sum(amps))


def draw_mass(
    rng: np.random.Generator,
    config: LesionConfig,
    *,
    shape: str | None = None,
    margin: str | None = None,
    diameter_mm: float | None = None,
    attenuation: float | None = None,
) -> Lesion:
    """A mass in its own local box. Unset options are drawn from `config`'s ranges.

        >>> m = draw_mass(np.random.default_rng(1), LesionConfig(), shape="oval", margin="circumscribed")
        >>> m.masks.keys()   # mass, circumscribed_margin
    """
    shapes = ("round", "oval", "irregular")
    if shape is None:
        shape = shapes[int(rng.choice(3, p=np.asarray(config.shape_weights) / sum(config.shape_weights)))]
    if shape not in shapes:
        raise ValueError(f"mass shape {shape!r}: expected one of {', '.join(shapes)}")
    if margin is None:
        margin = "spiculated" if rng.random() < config.spiculated_given_shape[shapes.index(shape)] else "circumscribed"
    if margin not in ("circumscribed", "spiculated"):
        raise ValueError(f"mass margin {margin!r}: expected circumscribed or spiculated")
    if diameter_mm is None:  # log-uniform: small masses are more common than large ones
        lo, hi = config.mass_diameter_mm
        diameter_mm = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    diameter_mm = float(diameter_mm)
    a0 = _uniform(rng, config.mass_attenuation) if attenuation is None else float(attenuation)
    radius = diameter_mm / 2.0 / config.mm_per_px
    r_of, r_max = _boundary(rng, shape, radius)
    spiculated = margin == "spiculated"

    spicules = []
    if spiculated:
        n = int(rng.integers(config.spicule_count[0], config.spicule_count[1] + 1))
        angles = _spread_angles(rng, n)
        for th in angles:
            length = _uniform(rng, config.spicule_length) * radius + 2.0
            tilt, bend, weight = rng.uniform(-0.35, 0.35), rng.uniform(-0.15, 0.15), rng.uniform(0.45, 1.0)
            rb = float(r_of(np.array([th]))[0])
            spicules.append((th, tilt, bend, weight, rb, length))
    reach = r_max + max(config.soft_edge_px, config.halo_px) + 2 + max((s[5] for s in spicules), default=0.0)
    size = int(2 * math.ceil(reach) + 3)
    center = (size / 2 + rng.uniform(-0.5, 0.5), size / 2 + rng.uniform(-0.5, 0.5))

    ss = _SUPERSAMPLE
    dy, dx = _grid(size, center, ss)
    r = np.hypot(dy, dx)
    rb = r_of(np.arctan2(dy, dx))
    core = np.sqrt(np.clip(1.0 - (r / rb) ** 2, 0.0, 1.0))  # sphere-like thickness: densest in the centre
    if spiculated:  # soft border: the profile fades linearly from soft/2 inside to soft/2 outside the border
        soft = config.soft_edge_px
        fade = np.clip(0.5 - (r - rb) / soft, 0.0, 1.0)
        profile_ss = (0.3 + 0.7 * core) * fade
        fading = _block_mean((np.abs(r - rb) < soft / 2).astype(np.float64), ss) >= 0.5
    else:  # circumscribed: a dense rim that stops sharply at the border, where the halo begins
        profile_ss = np.where(r <= rb, 0.3 + 0.7 * core, 0.0)
    profile = _block_mean(profile_ss, ss)
    body = _block_mean((r <= rb).astype(np.float64), ss) >= 0.5
    texture = np.clip(1.0 + 0.25 * _smooth_noise(rng, profile.shape, max(1.0, radius / 6)), 0.55, 1.45)
    att = a0 * profile * texture

    masks = {"mass": body}
    rim = _rim(body, config.margin_rim_px)
    if spiculated:
        dy1, dx1 = _grid(size, center, 1)
        spic_att = np.zeros_like(att)
        spic_mask = np.zeros_like(body)
        strength = _uniform(rng, config.spicule_strength) * a0
        for th, tilt, bend, weight, rb0, length in spicules:
            root = 0.75 * rb0
            p0 = (root * math.sin(th), root * math.cos(th))
            tip = rb0 + length
            p1 = (tip * math.sin(th + tilt * rb0 / tip), tip * math.cos(th + tilt * rb0 / tip))
            a_i, m_i = _line(dy1, dx1, _bent(p0, p1, bend), amplitude=(weight * strength, 0.15 * weight * strength),
                             sigma=config.spicule_sigma_px, cut=max(1.5, 2.0 * max(config.spicule_sigma_px)))
            np.maximum(spic_att, a_i, out=spic_att)
            spic_mask |= m_i
        att = np.maximum(att, spic_att)
        border = fading & (body | (att >= _MIN_ATTENUATION))  # the band across the border where the edge fades
        masks["spiculated_margin"] = border | (spic_mask & ~body)
    else:  # the halo: a dark ring of width halo_px just outside the border, its last pixel fading
        cover = _block_mean(np.clip(config.halo_px - (r - rb), 0.0, 1.0) * (r > rb), ss)
        att = np.where(body, att, -_uniform(rng, config.halo_strength) * a0 * cover)
        masks["circumscribed_margin"] = rim | (~body & (cover >= 0.5))
    attributes = {
        "type": "mass",
        "shape": shape,
        "margin": margin,
        "size_mm": round(diameter_mm, 1),
        "attenuation": round(a0, 3),
    }
    if spiculated:
        attributes["spicules"] = len(spicules)
    return _finish("mass", att, masks, center, attributes)


# -- calcifications -----------------------------------------------------------------------------------------------
_PSF = np.array([[0.04, 0.12, 0.04], [0.12, 0.36, 0.12], [0.04, 0.12, 0.04]])  # film/scanner blur of a speck


def _speck_positions(rng, config: LesionConfig, n: int, distribution: str, min_gap: float) -> list[tuple]:
    """Speck centres (y, x) relative to the cluster centre, at least `min_gap` px apart."""
    pts: list[tuple[float, float]] = []
    if distribution == "clustered":
        radius = _uniform(rng, config.cluster_radius_mm) / config.mm_per_px * math.sqrt(max(n, 1) / 10)

        def propose():
            rho, th = radius * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            return rho * math.sin(th), rho * math.cos(th)
    else:  # linear / segmental: clumps along a gently curving path, like calcium cast in a duct
        length = max(_uniform(rng, config.segment_length_mm) / config.mm_per_px, 1.4 * n * min_gap)  # room for all
        th0, bend = rng.uniform(0, math.pi), rng.uniform(-0.5, 0.5)
        clumps = rng.uniform(-0.5, 0.5, int(rng.integers(2, 5)))

        def propose():
            # mostly around the clumps, some anywhere along the duct (so long runs still fit every speck)
            s = float(np.clip(rng.choice(clumps) + rng.normal(0, 0.12), -0.5, 0.5)) if rng.random() < 0.7 \
                else rng.uniform(-0.5, 0.5)
            th = th0 + bend * s
            jitter = rng.normal(0, 0.7)
            along = s * length
            return along * math.sin(th) + jitter * math.cos(th), along * math.cos(th) - jitter * math.sin(th)

    for _ in range(n * 60):
        if len(pts) == n:
            break
        p = propose()
        if all(math.hypot(p[0] - q[0], p[1] - q[1]) >= min_gap for q in pts):
            pts.append(p)
    return pts


def draw_calcification(
    rng: np.random.Generator,
    config: LesionConfig,
    *,
    morphology: str | None = None,
    distribution: str | None = None,
    count: int | None = None,
) -> Lesion:
    """A cluster of calcium specks. morphology: fine | coarse; distribution: clustered | linear.

        >>> c = draw_calcification(np.random.default_rng(2), LesionConfig(), morphology="fine", distribution="linear")
    """
    morphology = morphology or ("fine" if rng.random() < 0.5 else "coarse")
    distribution = distribution or ("clustered" if rng.random() < 0.6 else "linear")
    if morphology not in ("fine", "coarse"):
        raise ValueError(f"calcification morphology {morphology!r}: expected fine or coarse")
    if distribution not in ("clustered", "linear"):
        raise ValueError(f"calcification distribution {distribution!r}: expected clustered or linear")
    n = int(rng.integers(config.calc_count[0], config.calc_count[1] + 1)) if count is None else int(count)
    radii = config.fine_radius_px if morphology == "fine" else config.coarse_radius_px
    gap = 2.0 if morphology == "fine" else 3.5
    pts = _speck_positions(rng, config, n, distribution, gap)
    reach = max(math.hypot(*p) for p in pts) + radii[1] + 4
    size = int(2 * math.ceil(reach) + 3)
    center = (size / 2 + rng.uniform(-0.5, 0.5), size / 2 + rng.uniform(-0.5, 0.5))
    ss = _SUPERSAMPLE
    dy, dx = _grid(size, center, ss)
    median_peak = _uniform(rng, config.calc_attenuation)
    att = np.zeros((size, size))
    core = np.zeros((size, size), dtype=bool)
    for py, px in pts:
        # pleomorphic: coarse specks are irregular ellipses of varied size; brightness varies speck to speck
        coarse = morphology == "coarse" and rng.random() < 0.75  # coarse clusters hold some fine specks too
        rad = _uniform(rng, radii if coarse or morphology == "fine" else config.fine_radius_px)
        elong = rng.uniform(1.0, 2.0) if coarse else 1.0
        rot = rng.uniform(0, math.pi)
        u = (dy - py) * math.cos(rot) + (dx - px) * math.sin(rot)
        v = -(dy - py) * math.sin(rot) + (dx - px) * math.cos(rot)
        disk = _block_mean(((u / (rad * math.sqrt(elong))) ** 2 + (v * math.sqrt(elong) / rad) ** 2 <= 1.0)
                           .astype(np.float64), ss)
        # a speck smaller than a pixel still darkens the film: its pixel gets at least a third of the peak
        iy, ix = int(center[0] + py), int(center[1] + px)
        disk[iy, ix] = max(disk[iy, ix], 1 / 3)
        speck = ndi.convolve(disk, _PSF, mode="constant")  # the film/scanner blur
        peak = median_peak * math.exp(rng.normal(0.0, 0.35))
        np.maximum(att, speck * (peak / speck.max()), out=att)
        core |= disk >= 0.3
    mask = ndi.binary_dilation(core, structure=np.ones((3, 3), bool))
    attributes = {
        "type": "calcification",
        "morphology": morphology,
        "distribution": distribution,
        "count": len(pts),
        "attenuation": round(median_peak, 3),
        "size_mm": round(2 * (max(math.hypot(*p) for p in pts) + radii[1]) * config.mm_per_px, 1),
    }
    return _finish("calcification", att, {"calcification": mask & (att >= _MIN_ATTENUATION)}, center, attributes)


# -- architectural distortion -------------------------------------------------------------------------------------
def draw_distortion(rng: np.random.Generator, config: LesionConfig, *, diameter_mm: float | None = None) -> Lesion:
    """Thin lines converging on one point, with no mass at the centre.

        >>> d = draw_distortion(np.random.default_rng(3), LesionConfig())
    """
    radius = (diameter_mm / 2 if diameter_mm else _uniform(rng, config.distortion_radius_mm)) / config.mm_per_px
    n = int(rng.integers(config.distortion_lines[0], config.distortion_lines[1] + 1))
    strength = _uniform(rng, config.distortion_attenuation)
    size = int(2 * math.ceil(radius) + 7)
    center = (size / 2 + rng.uniform(-0.5, 0.5), size / 2 + rng.uniform(-0.5, 0.5))
    dy, dx = _grid(size, center, 1)
    att = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    angles = _spread_angles(rng, n)
    for th in angles:
        # lines aim near, not exactly at, the centre and stop short of it: no central density, no perfect star
        r0 = rng.uniform(1.5, 4.0)
        r1 = radius * rng.uniform(0.35, 1.0)
        off, tilt = rng.uniform(-0.5, 0.5), rng.uniform(-0.15, 0.15)
        bend, weight = rng.uniform(-0.2, 0.2), rng.uniform(0.45, 1.0)
        p0 = (r0 * math.sin(th + off), r0 * math.cos(th + off))
        p1 = (r1 * math.sin(th + tilt), r1 * math.cos(th + tilt))
        a_i, m_i = _line(dy, dx, _bent(p0, p1, bend), amplitude=(weight * strength, 0.3 * weight * strength),
                         sigma=(0.65, 0.4))
        np.maximum(att, a_i, out=att)
        mask |= m_i
    attributes = {"type": "architectural_distortion", "size_mm": round(2 * radius * config.mm_per_px, 1),
                  "lines": n, "attenuation": round(strength, 3)}
    return _finish("architectural_distortion", att, {"architectural_distortion": mask}, center, attributes)


def draw_lesion(rng: np.random.Generator, config: LesionConfig, kind: str | None = None) -> Lesion:
    """A lesion of `kind` (drawn from `config.kind_weights` when None), in its own local box."""
    if kind is None:
        w = np.asarray(config.kind_weights, dtype=float)
        kind = LESION_KINDS[int(rng.choice(len(LESION_KINDS), p=w / w.sum()))]
    if kind == "mass":
        return draw_mass(rng, config)
    if kind == "calcification":
        return draw_calcification(rng, config)
    if kind == "architectural_distortion":
        return draw_distortion(rng, config)
    raise ValueError(f"lesion kind {kind!r}: expected one of {', '.join(LESION_KINDS)}")


# -- placing and inserting ----------------------------------------------------------------------------------------
def place_lesions(
    display: np.ndarray,
    allowed: np.ndarray,
    rng: np.random.Generator,
    config: LesionConfig,
    *,
    count: int,
    gap_px: int = 6,
    max_level: float = 0.97,
    min_level: float = 0.02,
    tries: int = 80,
    kinds: list[str] | None = None,
) -> list[Lesion]:
    """Draw up to `count` lesions and place them so each footprint lies inside `allowed`, on tissue darker than
    `max_level` (a lesion on saturated tissue would change nothing) and brighter than `min_level` (nor would a halo
    on black), at least `gap_px` from every other lesion.

    display: float32 (y, x) in [0, 1]; allowed: bool (y, x). A lesion that finds no room after `tries` positions is
    redrawn smaller once, then dropped: the result may hold fewer than `count` lesions.
    """
    if display.shape != allowed.shape:
        raise ValueError(f"display {display.shape} and allowed {allowed.shape} differ in shape")
    room = allowed & (display < max_level) & (display > min_level)
    dist = ndi.distance_transform_edt(room)  # room for a lesion of that radius centred here
    occupied = np.zeros(display.shape, dtype=bool)
    placed: list[Lesion] = []
    for i in range(count):
        kind = kinds[i % len(kinds)] if kinds else None
        for attempt in range(2):
            cfg = config if attempt == 0 else _smaller(config)
            lesion = draw_lesion(rng, cfg, kind)
            foot = lesion.footprint
            ys, xs = np.nonzero(foot)
            cy, cx = lesion.center
            reach = float(np.sqrt((ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2).max())
            cand_y, cand_x = np.nonzero((dist >= reach) & ~occupied)
            if cand_y.size == 0:
                continue
            ok = False
            for _ in range(tries):
                j = int(rng.integers(cand_y.size))
                y0, x0 = int(cand_y[j] - round(cy)), int(cand_x[j] - round(cx))
                h, w = foot.shape
                if y0 < 0 or x0 < 0 or y0 + h > display.shape[0] or x0 + w > display.shape[1]:
                    continue
                window = (slice(y0, y0 + h), slice(x0, x0 + w))
                if (foot & ~room[window]).any() or (foot & occupied[window]).any():
                    continue
                lesion.origin = (y0, x0)
                ok = True
                break
            if ok:
                grown = ndi.binary_dilation(lesion.full(foot, display.shape), iterations=gap_px)
                occupied |= grown
                placed.append(lesion)
                break
    return placed


def _smaller(config: LesionConfig) -> LesionConfig:
    from dataclasses import replace

    lo, hi = config.mass_diameter_mm
    rlo, rhi = config.distortion_radius_mm
    return replace(config, mass_diameter_mm=(lo, (lo + hi) / 2), distortion_radius_mm=(rlo, (rlo + rhi) / 2),
                   spicule_length=(config.spicule_length[0], sum(config.spicule_length) / 2),
                   segment_length_mm=(config.segment_length_mm[0], sum(config.segment_length_mm) / 2))


def attenuation_map(shape: tuple[int, int], lesions: list[Lesion]) -> np.ndarray:
    """float32 (y, x): the lesions' added attenuation on a mammogram of `shape` (0 outside every footprint)."""
    att = np.zeros(shape, dtype=np.float32)
    for lesion in lesions:
        y0, x0, y1, x1 = lesion.box
        window = att[y0:y1, x0:x1]
        np.copyto(window, lesion.attenuation, where=lesion.footprint)  # footprints never overlap (place_lesions)
    return att


SHOULDER = 0.8  # display values above this saturate softly towards 1 (the film's shoulder)


def shoulder(u: np.ndarray) -> np.ndarray:
    """Film response: identity up to SHOULDER, then 1 - (1 - SHOULDER)·exp(-(u - SHOULDER)/(1 - SHOULDER)) → 1."""
    u = np.asarray(u, dtype=np.float64)
    k = 1.0 - SHOULDER
    return np.where(u <= SHOULDER, u, 1.0 - k * np.exp(-(u - SHOULDER) / k))


def unshoulder(v: np.ndarray) -> np.ndarray:
    """The inverse of `shoulder` on [0, 1) (1 maps to +inf: saturated film has no recoverable density)."""
    v = np.asarray(v, dtype=np.float64)
    k = 1.0 - SHOULDER
    with np.errstate(divide="ignore"):
        return np.where(v <= SHOULDER, v, SHOULDER - k * np.log(np.maximum((1.0 - v) / k, 0.0)))


MASKING = 0.3  # how much dense surroundings reduce a lesion's contrast (0: not at all)


def insert_lesions(display: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    """float32 (y, x) in [0, 1]: `display` with the lesions' attenuation added (see the module docstring).

    Pixels outside every footprint are copied unchanged, bit for bit; a halo pixel keeps at least half its value.
    """
    display = np.asarray(display, dtype=np.float32)
    att = attenuation_map(display.shape, lesions)
    out = display.copy()
    foot = att != 0
    if not foot.any():
        return out
    density = ndi.gaussian_filter(display.astype(np.float64), 8.0, mode="nearest")[foot]  # (pixel,) ≈3 mm context
    added = att[foot] * (1.0 - MASKING * np.clip(density, 0.0, 1.0))
    before = display[foot].astype(np.float64)
    after = shoulder(unshoulder(before) + added)
    out[foot] = np.where(added < 0, np.maximum(after, 0.5 * before), after).astype(np.float32)  # a halo: at most half
    return out
