"""Pictures of segmentation results: overlays people want to look at, and colour-mapped label maps.

* Colours are keyed by label *name* (a hue from a hash of the name), so "person" has the same
  colour in every run, model and task; the k-th instance of a label gets another shade. Two
  segments that touch are never given colours closer than ``MIN_ADJACENT_DISTANCE`` (the smaller
  one is moved round the hue circle), so neighbours stay apart even when their names hash close.
* The overlay is the colour map blended over the photo, and its legend shows every colour drawn,
  with the colour the colour map has: one entry per class for semantic maps, one per segment
  (``label #value``, the value in the label PNG) for panoptic and instance maps, whose segments of
  one class are drawn in different shades (before, a panoptic overlay of six segments in seven
  colours listed one entry). "no segment" (panoptic pixels no query won, the instance map's
  background) is black in the colour map, so it darkens the photo in the overlay and its legend
  swatch is black (it was light grey beside a black colour map). "background", a real class of
  some models, is a light grey fill, so the two never look alike.
* The overlay fills each segment with its colour over the photo's *luminance* (a 50/50 blend with
  the colour photo turned yellow into sage green over a blue-grey scene: blending with grey keeps
  the hue), and draws each segment's outline in a darker shade of its colour.
* Size: drawn at the image size, downscaled to at most ``OVERLAY_MAX_SIDE`` px on the long side
  and upscaled (nearest) to at least ``OVERLAY_MIN_SIDE`` on the short side, with a legend panel
  whose font, swatches and line widths scale with the drawing (12 to 48 px text); the label PNGs
  are always full size.

Pillow's embedded font (Aileron) renders a space at 0.2 em, which made "no segment" read as
"nosegment" at legend sizes: the legend draws words separately with a 0.35 em gap.
"""
from __future__ import annotations

import colorsys
import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

NO_SEGMENT = "no segment"
OVERLAY_MAX_SIDE = 4096
OVERLAY_MIN_SIDE = 256
FILL_ALPHA = 150  # of 256: segment colour over the photo's luminance
MIN_ADJACENT_DISTANCE = 80.0  # RGB Euclidean distance between the colours of touching segments
_GREYS = {"background": (176, 176, 176), NO_SEGMENT: (0, 0, 0), "?": (96, 96, 96)}

Colour = Tuple[int, int, int]


def label_colour(name: str, instance: int = 0) -> Colour:
    """A colour per label name, the same in every run, model and task; the k-th instance of a
    label gets a lighter or darker shade. "no segment" is black, "background" light grey."""
    if name in _GREYS:
        return _GREYS[name]
    digest = hashlib.md5(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "little") / 65536.0
    sat = 0.6 + 0.35 * digest[2] / 255.0
    # instances: the same colour family (hue within +-0.06 of the label's), clearly different shades
    hue = (hue + 0.12 * (((instance * 0.618034) % 1.0) - 0.5) * (instance > 0)) % 1.0
    val = 0.95 - 0.4 * ((instance * 0.381966) % 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))


def adjacent_pairs(label_map: np.ndarray, max_pixels: int = 4_000_000) -> np.ndarray:
    """(N, 2) int64 pairs (a < b) of map values that touch (4-neighbourhood). Maps larger than
    ``max_pixels`` are subsampled with a stride first (a pair is only missed where two segments
    touch along less than a stride)."""
    step = max(1, int(np.ceil(np.sqrt(label_map.size / max_pixels))))
    m = np.asarray(label_map[::step, ::step], dtype=np.int64)
    pairs = []
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1, :], m[1:, :])):
        diff = a != b
        if diff.any():
            lo, hi = np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])
            pairs.append(np.stack([lo, hi], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def _rotated(colour: Colour, turn: float) -> Colour:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in colour))
    if s < 0.2:  # a grey has no hue to turn: give it one
        s, v = 0.7, 0.9
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((h + turn) % 1.0, s, v))


def colour_table(label_map: np.ndarray, names: Dict[int, str], areas: Optional[Dict[int, int]] = None) -> np.ndarray:
    """(max value + 1, 3) uint8 colours for a map whose value v is labelled ``names[v]``.

    Each value gets ``label_colour(name, k)`` (k counts earlier values of the same name), then
    touching segments closer than ``MIN_ADJACENT_DISTANCE`` are separated: the smaller segment's
    hue is turned by golden-ratio steps until it is far enough from every neighbour (deterministic:
    it depends only on the map and the names). Values without a name get a golden-ratio hue.
    """
    top = int(label_map.max()) if label_map.size else 0
    table = np.zeros((top + 1, 3), dtype=np.uint8)
    for v in range(top + 1):
        table[v] = [int(round(255 * c)) for c in colorsys.hsv_to_rgb((v * 0.618033988749895) % 1.0, 0.65, 0.95)]
    seen: Dict[str, int] = {}
    for v in sorted(names):
        if 0 <= v <= top:
            name = names[v]
            table[v] = label_colour(name, seen.get(name, 0))
            seen[name] = seen.get(name, 0) + 1
    if areas is None:
        counts = np.bincount(np.asarray(label_map, dtype=np.int64).ravel(), minlength=top + 1)
        areas = {v: int(c) for v, c in enumerate(counts)}
    neighbours: Dict[int, set] = {}
    for a, b in adjacent_pairs(label_map).tolist():
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    fixed = {v for v in range(top + 1) if names.get(v) == NO_SEGMENT}  # never filled: no clash
    for v in sorted(neighbours, key=lambda v: (-areas.get(v, 0), v)):  # the largest keeps its colour
        if v in fixed:
            continue
        others = [table[u] for u in neighbours[v] if u not in fixed and names.get(u) != NO_SEGMENT]
        colour = tuple(int(c) for c in table[v])
        for step in range(1, 13):
            if all(_distance(colour, o) >= MIN_ADJACENT_DISTANCE for o in others):
                break
            colour = _rotated(tuple(int(c) for c in table[v]), step * 0.381966)
        table[v] = colour
        fixed.add(v)
    return table


def color_map_image(label_map: np.ndarray, table: np.ndarray):
    """The label map in colour, full size: a palette PNG image (mode "P") when the values fit in
    a byte (a viewer shows the colours, small files), else RGB."""
    from PIL import Image

    if label_map.size and int(label_map.max()) < 256 and int(label_map.min()) >= 0:
        img = Image.fromarray(np.asarray(label_map, dtype=np.uint8), mode="P")
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: len(table)] = table[:256]
        img.putpalette(palette.ravel().tolist())
        return img
    return Image.fromarray(table[np.clip(label_map, 0, len(table) - 1)])


def _display_size(height: int, width: int) -> Tuple[int, int]:
    scale = 1.0
    if max(height, width) > OVERLAY_MAX_SIDE:
        scale = OVERLAY_MAX_SIDE / max(height, width)
    elif min(height, width) < OVERLAY_MIN_SIDE:
        scale = min(OVERLAY_MIN_SIDE / min(height, width), OVERLAY_MAX_SIDE / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _nearest(label_map: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    h, w = label_map.shape
    if (h, w) == tuple(size):
        return label_map
    rows = np.minimum((np.arange(size[0]) * h) // size[0], h - 1)
    cols = np.minimum((np.arange(size[1]) * w) // size[1], w - 1)
    return label_map[rows][:, cols]


def _outline(labels: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within ``width`` px of a boundary between two different values."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    grown = edge.copy()
    for _ in range(width - 1):  # grow by one pixel per pass (cheap: width is a few px)
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown.copy()
    return grown


def _draw_words(draw, xy, text: str, font, fill) -> None:
    x, y = xy
    gap = font.size * 0.35
    for word in text.split(" "):
        draw.text((x, y), word, font=font, fill=fill)
        x += font.getlength(word) + gap


def _words_length(text: str, font) -> float:
    words = text.split(" ")
    return sum(font.getlength(w) for w in words) + font.size * 0.35 * (len(words) - 1)


def legend_entries(label_map: np.ndarray, names: Dict[int, str], table: np.ndarray,
                   per_segment: bool = False) -> List[Tuple[str, Colour, int]]:
    """(text, colour, area) for every colour drawn, largest area first; colours are ``table``'s,
    i.e. those of the colour map (``color_map_image``) and of the overlay's fills.

    Args:
        label_map: (H, W) integer map; value v is labelled ``names[v]`` ("?" when missing).
        names: {value: label name}; "no segment" is listed with its own colour (black).
        table: (max value + 1, 3) uint8 colours from ``colour_table``.
        per_segment: one entry per value present, as ``"label #value"`` (panoptic and instance
            maps: the value is the segment's ``png_value``); otherwise one per label name and
            colour (semantic maps: one per class).
    """
    counts = np.bincount(np.asarray(label_map, dtype=np.int64).ravel(), minlength=len(table))
    entries: Dict[Tuple[str, Colour], int] = {}
    for v in np.flatnonzero(counts).tolist():
        name = names.get(v, "?")
        text = f"{name} #{v}" if per_segment and name != NO_SEGMENT else name
        key = (text, tuple(int(c) for c in table[min(v, len(table) - 1)]))
        entries[key] = entries.get(key, 0) + int(counts[v])
    return sorted(((t, c, a) for (t, c), a in entries.items()), key=lambda e: (-e[2], e[0]))


def render_overlay(image, label_map: np.ndarray, names: Dict[int, str], table: Optional[np.ndarray] = None,
                   legend: Optional[List[Tuple[str, Colour, int]]] = None, per_segment: bool = False):
    """Overlay of an (H, W) label map on the RGB PIL ``image`` of the same size, plus a legend.

    Args:
        image: PIL image of the map's scene (any mode and size, e.g. decoded at a reduced scale; it is
            resized to the drawing's size and shown in grey under the fills).
        label_map: (H, W) integer map; value v is labelled ``names[v]`` (``"no segment"`` stays unfilled).
        table: colours from ``colour_table`` (computed when None); the colour map uses the same.
        legend: (text, colour, area) entries; by default ``legend_entries(..., per_segment)``.
        per_segment: one legend entry per segment (panoptic, instance) instead of per class.

    Returns:
        PIL RGB image: the overlay at its display size (see module docstring) with the legend panel on
        the right.
    """
    from PIL import Image, ImageDraw, ImageFont

    label_map = np.asarray(label_map)
    if table is None:
        table = colour_table(label_map, names)
    dh, dw = _display_size(*label_map.shape)
    resample = Image.Resampling.NEAREST if dh > image.height else Image.Resampling.BILINEAR
    gray = np.asarray(image.convert("L").resize((dw, dh), resample), dtype=np.uint16)
    labels = _nearest(label_map, (dh, dw))
    no_segment = np.array([names.get(v) == NO_SEGMENT for v in range(len(table))], dtype=bool)
    colours = table.astype(np.uint16)[labels]  # (dh, dw, 3): the colour map's colour of each pixel
    fill = (colours * FILL_ALPHA + gray[..., None] * (256 - FILL_ALPHA)) >> 8
    line = max(1, int(round(min(dh, dw) / 250)))
    edge = _outline(labels, line) & ~no_segment[labels]  # "no segment" is not a segment: no outline
    fill[edge] = (colours[edge] * 140) >> 8  # outlines: the segment's own colour, darker
    drawing = Image.fromarray(fill.astype(np.uint8))

    if legend is None:
        legend = legend_entries(label_map, names, table, per_segment=per_segment)
    size = int(min(48, max(12, round(dh / 28))))
    font = ImageFont.load_default(size=size)
    row, pad = int(size * 1.5), size // 2
    rows_per_col = max(1, (max(dh, 8 * row) - 2 * pad) // row)
    shown = legend  # every entry, in as many columns as it takes: each colour drawn is explained
    texts = [f"{name}" for name, _, _ in shown]
    col_w = int(max(_words_length(t, font) for t in texts) + size * 1.6 + 2 * pad) if texts else 0
    n_cols = (len(shown) + rows_per_col - 1) // rows_per_col
    legend_h = 2 * pad + row * min(len(shown), rows_per_col)
    canvas = Image.new("RGB", (dw + col_w * n_cols, max(dh, legend_h)), (255, 255, 255))
    canvas.paste(drawing, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, ((name, colour, _), text) in enumerate(zip(shown, texts)):
        x = dw + (k // rows_per_col) * col_w + pad
        y = pad + (k % rows_per_col) * row
        draw.rectangle([x, y + size // 6, x + size, y + size + size // 6], fill=tuple(colour), outline=(0, 0, 0))
        _draw_words(draw, (x + int(size * 1.4), y), text, font, (0, 0, 0))
    return canvas
