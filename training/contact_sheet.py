"""A contact sheet of demo patches: one row per lesion category and one of normal tissue, each patch shown plain and
with its concept masks outlined in colour, zoomed so a reader can judge the lesions.

    >>> from training.contact_sheet import write_contact_sheet
    >>> write_contact_sheet(root / "contact_sheet.png", items, per_kind=4, zoom=3)   # items: (record, patch, masks)

`items` are (PatchRecord, uint8 (y, x) patch, {concept: bool (y, x)}) triples; the sheet picks up to `per_kind`
patches of each category (deterministically from `seed`), preferring patches that hold most of their lesion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

__all__ = ["write_contact_sheet", "COLOURS", "category"]

# Outline colour per concept (background and normal tissue are not outlined: they would hide the image).
COLOURS = {  # drawn in this order: the mass outline goes over the margins' outer edge
    "circumscribed_margin": (255, 220, 0),
    "spiculated_margin": (255, 140, 0),
    "mass": (255, 64, 64),
    "calcification": (0, 230, 255),
    "architectural_distortion": (230, 60, 255),
    "skin": (60, 220, 60),
    "pectoral_muscle": (80, 120, 255),
    "film_label": (200, 120, 255),
}
CATEGORIES = (
    "mass round circumscribed", "mass oval circumscribed", "mass irregular circumscribed",
    "mass round spiculated", "mass oval spiculated", "mass irregular spiculated",
    "calcification fine clustered", "calcification fine linear",
    "calcification coarse clustered", "calcification coarse linear",
    "architectural_distortion", "normal",
)


def category(attributes: dict, label: int) -> str:
    """The sheet row of a patch: its main lesion's type and look, or 'normal'."""
    lesions = attributes.get("lesions") or []
    if not label or not lesions:
        return "normal"
    a = max(lesions, key=lambda x: x.get("share_in_patch", 0))
    if a["type"] == "mass":
        return f"mass {a['shape']} {a['margin']}"
    if a["type"] == "calcification":
        return f"calcification {a['morphology']} {a['distribution']}"
    return a["type"]


def _outlined(patch: np.ndarray, masks: dict[str, np.ndarray], zoom: int) -> np.ndarray:
    """uint8 (y·zoom, x·zoom, rgb): the zoomed patch with a 1-px outline of every coloured concept."""
    big = np.kron(patch, np.ones((zoom, zoom), dtype=np.uint8))
    rgb = np.repeat(big[:, :, None], 3, axis=2)
    for concept, colour in COLOURS.items():
        m = masks.get(concept)
        if m is None or not m.any():
            continue
        mb = np.kron(m.astype(np.uint8), np.ones((zoom, zoom), dtype=np.uint8)).astype(bool)
        edge = mb & ~ndi.binary_erosion(mb, border_value=0)
        rgb[edge] = colour
    return rgb


def write_contact_sheet(path: str | Path, items, *, per_kind: int = 4, zoom: int = 3, seed: int = 0) -> Path:
    """Write the sheet as an RGB PNG at `path`; returns the path. Categories without patches show an empty row."""
    rng = np.random.default_rng([seed, 11])
    by_cat: dict[str, list] = {c: [] for c in CATEGORIES}
    for item in items:
        rec = item[0]
        by_cat.setdefault(category(rec.attributes, rec.label), []).append(item)
    chosen: dict[str, list] = {}
    for cat, group in by_cat.items():
        if cat != "normal":  # the clearest patch of each lesion (most of it inside), then different lesions
            best: dict[tuple, tuple] = {}
            for it in group:
                main = max(it[0].attributes["lesions"], key=lambda x: x["share_in_patch"])
                key = (it[0].source_id, tuple(sorted((k, str(v)) for k, v in main.items() if k != "share_in_patch")))
                if key not in best or main["share_in_patch"] > best[key][0]:
                    best[key] = (main["share_in_patch"], it)
            group = [it for _, it in sorted(best.values(), key=lambda t: (-t[0], t[1][0].id))]
        idx = rng.permutation(len(group))[:per_kind] if group else []
        chosen[cat] = [group[i] for i in sorted(idx)]

    side = items[0][1].shape[0] * zoom if items else 64 * zoom
    pad, label_w, title_h, legend_h = 6, 230, 34, 30
    rows = [c for c in by_cat if chosen.get(c)] or list(CATEGORIES)
    width = label_w + per_kind * (2 * side + 3 * pad)
    height = title_h + legend_h + len(rows) * (side + pad + 16) + pad
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    draw.text((pad, 8), f"ConceptLens demo patches ({zoom}x): each pair = patch | concept outlines", fill=(235, 235,
              235), font=font)
    x = pad
    for concept, colour in COLOURS.items():
        draw.rectangle((x, title_h + 4, x + 12, title_h + 16), fill=colour)
        draw.text((x + 16, title_h + 3), concept.replace("_", " "), fill=(220, 220, 220), font=small)
        x += 22 + int(draw.textlength(concept.replace("_", " "), font=small)) + 10
    y = title_h + legend_h
    for cat in rows:
        draw.text((pad, y + side // 2 - 8), cat.replace("_", " "), fill=(235, 235, 235), font=font)
        x = label_w
        for rec, patch, masks in chosen.get(cat, []):
            plain = np.kron(patch, np.ones((zoom, zoom), dtype=np.uint8))
            sheet.paste(Image.fromarray(plain), (x, y))
            sheet.paste(Image.fromarray(_outlined(patch, masks, zoom)), (x + side + pad, y))
            draw.text((x, y + side + 1), f"{rec.id[-12:]} {rec.split}", fill=(160, 160, 160), font=small)
            x += 2 * side + 3 * pad
        y += side + pad + 16
    path = Path(path)
    sheet.save(path, format="PNG")
    return path
