"""Image preparation for MaskFormer: what `MaskFormerImageProcessor.preprocess` does to pixels.

Output size with transformers' rounding, any input (PIL image of any mode, numpy array or tensor,
channels first or last) to a `(3, H, W)` array, Pillow resize after transformers' uint8 round trip,
rescale, normalise, and bottom/right zero padding to one batch with its `pixel_mask`. Each step is
bit-identical to transformers' PIL backend (see `maskformer.processing` for the deviations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# transformers 4.x's default `max_size`: what an int `size` without one meant when the hub configs that
# carry one (facebook/mask2former-*: "size": 384) were written.
LEGACY_MAX_SIZE = 1333
_VALID_SIZE_KEY_SETS = (
    frozenset({"shortest_edge", "longest_edge"}),
    frozenset({"shortest_edge"}),
    frozenset({"height", "width"}),
    frozenset({"max_height", "max_width"}),
)


# ---------------------------------------------------------------------------------------------
# Output container
# ---------------------------------------------------------------------------------------------
class BatchFeature(dict):
    """A dict whose keys are also attributes: `out["pixel_values"]` == `out.pixel_values`.

    Being a real `dict`, it unpacks into a model call: `model(**out)`.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no key {name!r}; keys: {sorted(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move every tensor (and every tensor inside a list value) with `Tensor.to(*args, **kwargs)`.

        Integer tensors are only moved between devices, never cast to a float dtype, so
        `out.to(torch.float16)` leaves `pixel_mask` and `class_labels` int64.
        """

        def move(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device")
            for a in args:
                if isinstance(a, (str, torch.device)):
                    device = a
            return t.to(device) if device is not None else t

        for key, value in list(self.items()):
            if isinstance(value, list):
                self[key] = [move(v) for v in value]
            else:
                self[key] = move(value)
        return self


# ---------------------------------------------------------------------------------------------
# Size arithmetic (transformers' rounding, reproduced exactly)
# ---------------------------------------------------------------------------------------------

def _normalize_size(size: Any, max_size: int | None = None, param: str = "size") -> dict[str, int]:
    """Turn an int / (h, w) / dict / SizeDict-like `size` into one of the supported dicts.

    Returns a new dict with one of the key sets `{shortest_edge, longest_edge}`, `{shortest_edge}`,
    `{height, width}`, `{max_height, max_width}`; values are positive ints. An int `n` is
    `{shortest_edge: n, longest_edge: max_size}`, with transformers 4.x's `max_size` default of 1333
    when none is given. A `{shortest_edge}` dict alone is kept as given (as transformers does); the
    resize refuses it (`get_output_image_size`).
    """
    if isinstance(size, bool):
        raise TypeError(f"`{param}` must be an int, a (height, width) pair or a dict, got a bool.")
    if isinstance(size, int):
        out = {"shortest_edge": size, "longest_edge": LEGACY_MAX_SIZE if max_size is None else max_size}
    elif isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"`{param}` as a sequence must be (height, width), got {size!r}.")
        out = {"height": size[0], "width": size[1]}
    else:
        if not isinstance(size, Mapping):
            try:  # transformers' SizeDict iterates as (key, value) pairs of its set fields
                size = dict(size)
            except (TypeError, ValueError):
                raise TypeError(
                    f"`{param}` must be an int, a (height, width) pair or a dict, got {type(size).__name__}."
                ) from None
        out = {k: v for k, v in size.items() if v is not None}
        if set(out) == {"shortest_edge"} and max_size is not None:
            out["longest_edge"] = max_size
    keys = frozenset(out)
    if keys not in _VALID_SIZE_KEY_SETS:
        raise ValueError(
            f"`{param}` must have the keys {{'shortest_edge', 'longest_edge'}}, {{'shortest_edge'}}, "
            f"{{'height', 'width'}} or {{'max_height', 'max_width'}}; got {sorted(out)}. "
            "A `longest_edge` alone is not supported: add a `shortest_edge`."
        )
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"`{param}[{k!r}]` must be a positive int, got {v!r}.")
        out[k] = int(v)
    return out


def _normalize_pad_size(pad_size: Any) -> dict[str, int] | None:
    if pad_size is None:
        return None
    if isinstance(pad_size, int) and not isinstance(pad_size, bool):
        pad_size = {"height": pad_size, "width": pad_size}
    out = _normalize_size(pad_size, param="pad_size")
    if set(out) != {"height", "width"}:
        raise ValueError(f"`pad_size` must have the keys 'height' and 'width', got {sorted(out)}.")
    return out


def _shortest_longest_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    # Same float expressions as transformers' get_size_with_aspect_ratio: the order of the
    # multiplications and the int()/round() calls decide the last pixel.
    short_target = shortest
    raw_short = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * short_target > longest:
        raw_short = longest * lo / hi
        short_target = int(round(raw_short))
    if (height <= width and height == short_target) or (width <= height and width == short_target):
        return height, width
    if width < height:
        new_w = short_target
        new_h = int(raw_short * height / width) if raw_short is not None else int(short_target * height / width)
    else:
        new_h = short_target
        new_w = int(raw_short * width / height) if raw_short is not None else int(short_target * width / height)
    return new_h, new_w


def get_output_image_size(height: int, width: int, size: Mapping[str, int], size_divisor: int = 0) -> tuple[int, int]:
    """Size `(new_height, new_width)` an `(height, width)` image is resized to.

    Args:
        height, width: input size in pixels (>= 1).
        size: a normalised size dict (see `MaskFormerImageProcessor`).
        size_divisor: when > 0, each side is rounded *up* to a multiple of it (the image is
            stretched to that size, as transformers does).
    """
    keys = set(size)
    if keys == {"shortest_edge", "longest_edge"}:
        new_h, new_w = _shortest_longest_size(height, width, size["shortest_edge"], size["longest_edge"])
    elif keys == {"shortest_edge"}:
        # As transformers (4.x and 5.x): MaskFormer's resize caps the long side, so it needs both.
        raise ValueError(
            f"Size must contain 'height' and 'width' keys or 'shortest_edge' and 'longest_edge' keys. Got {dict(size)}. "
            f"Add a longest_edge (transformers' default is {LEGACY_MAX_SIZE}: size={{'shortest_edge': "
            f"{size['shortest_edge']}, 'longest_edge': {LEGACY_MAX_SIZE}}}), or pass do_resize=False."
        )
    elif keys == {"max_height", "max_width"}:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        new_h, new_w = int(height * scale), int(width * scale)
    elif keys == {"height", "width"}:
        new_h, new_w = size["height"], size["width"]
    else:
        raise ValueError(f"Unsupported size dict {dict(size)}.")
    if size_divisor and size_divisor > 0:
        new_h = int(math.ceil(new_h / size_divisor) * size_divisor)
        new_w = int(math.ceil(new_w / size_divisor) * size_divisor)
    return new_h, new_w


# ---------------------------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------------------------
def _is_image_like(x: Any) -> bool:
    return isinstance(x, (PIL.Image.Image, np.ndarray, torch.Tensor))


def _flatten_inputs(items: Any, expected_ndim: int, what: str) -> list[Any]:
    """One image / one batch array / a (nested) list of them -> flat list of single items."""
    if _is_image_like(items):
        items = [items]
    elif not isinstance(items, (list, tuple)):
        raise TypeError(
            f"{what} must be a PIL image, a numpy array, a torch tensor or a list of them; "
            f"got {type(items).__name__}."
        )
    flat: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten_inputs(item, expected_ndim, f"{what}[{i}]") if len(item) else [])
            continue
        if isinstance(item, PIL.Image.Image):
            flat.append(item)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            if item.ndim == expected_ndim:
                flat.append(item)
            elif item.ndim == expected_ndim + 1:
                flat.extend(list(item))
            else:
                layout = "(C, H, W) or (H, W, C)" if expected_ndim == 3 else "(H, W)"
                raise ValueError(
                    f"{what}[{i}] has shape {tuple(item.shape)} (rank {item.ndim}); expected rank {expected_ndim} "
                    f"{layout}, or rank {expected_ndim + 1} for a batch of them."
                )
        else:
            raise TypeError(
                f"{what}[{i}] is a {type(item).__name__}; expected a PIL image, a numpy array or a torch tensor."
            )
    return flat


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _pil_to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    # transformers' convert_to_rgb: any transparency is composited onto white first.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# Pillow modes that hold more than 8 bits per sample. `convert("RGB")` clips them at 255 (a 16-bit
# photo becomes 99% white), so they are scaled to 8 bits first (`to_8bit`).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(img: PIL.Image.Image, where: str = "image") -> PIL.Image.Image:
    """A single-channel image of more than 8 bits per sample as an 8-bit "L" image; other images as
    they are.

    "I;16*" (16-bit PNG and TIFF) maps 0..65535 onto 0..255 (divide by 257, round). "I" (32-bit
    integer, what Pillow makes of some 16-bit files) holding 0..255 is taken as it is and 0..65535
    as 16-bit; larger values raise. "F" (float) in [0, 1] is scaled by 255, in [0, 255] taken as it
    is; anything else (negative, NaN, above 255) raises: there is no way to know its range.
    """
    if img.mode not in _WIDE_MODES:
        return img
    arr = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise ValueError(
                f"{where} is a floating-point image (Pillow mode 'F') with values in [{arr.min()}, {arr.max()}]; "
                "only [0, 1] or [0, 255] can be mapped to 8 bits. Convert it to an 8-bit image first."
            )
        scaled = arr * 255.0 if arr.max() <= 1.0 else arr
    else:
        arr = arr.astype(np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if img.mode.startswith("I;16") or (img.mode == "I" and 255 < hi <= 65535 and lo >= 0):
            scaled = arr / 257.0
        elif lo >= 0 and hi <= 255:
            scaled = arr
        else:
            raise ValueError(
                f"{where} is a 32-bit integer image (Pillow mode 'I') with values in [{lo}, {hi}]; only 0..255 "
                "(8-bit) or 0..65535 (16-bit) can be mapped to 8 bits. Convert it to an 8-bit image first."
            )
    return PIL.Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")


def prepare_pil_image(img: PIL.Image.Image, where: str = "image") -> PIL.Image.Image:
    """What we do to a PIL image before transformers' conversion: apply its EXIF orientation
    (Pillow's `ImageOps.exif_transpose`: a phone JPEG tagged "rotate 90" is segmented the way every
    viewer shows it) and scale more-than-8-bit single-channel images to 8 bits (`to_8bit`).
    Both differ from transformers, which ignores the tag and clips 16-bit values at 255."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        orientation = 1
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    return to_8bit(img, where)


def _infer_channel_axis(shape: tuple[int, ...], where: str) -> int:
    # transformers' rule with num_channels=(1, 3, 4): channels-first wins when both ends fit.
    first_ok, last_ok = shape[0] in (1, 3, 4), shape[2] in (1, 3, 4)
    if first_ok:
        return 0
    if last_ok:
        return 2
    raise ValueError(
        f"{where} has shape {shape}: cannot find a channel axis of size 1, 3 or 4 first or last. "
        "Images must be RGB (3 channels), grayscale (1) or RGBA (4) in (C, H, W) or (H, W, C) layout; "
        "convert other channel counts (e.g. 2 or 5) to RGB first, or say where the channels are with "
        "input_data_format='channels_first' or 'channels_last' (more than 4 channels also need do_resize=False)."
    )


def _image_to_chw(image: Any, do_convert_rgb: bool | None, input_data_format: str | None, where: str) -> np.ndarray:
    """One input image -> `(C, H, W)` numpy array, dtype as given (bool becomes uint8).

    `do_convert_rgb`: True converts every image to RGB, None converts non-RGB images (C = 3 then),
    False keeps the image's own channels (any number for arrays, as transformers: more than 4 cannot
    be resized, see `_resize_image`; PIL images as `np.array` gives them).
    """
    if isinstance(image, PIL.Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{where} is a PIL image of size {image.width}x{image.height}; an image needs at least one pixel.")
        image = prepare_pil_image(image, where)
        if do_convert_rgb or (do_convert_rgb is None and image.mode != "RGB"):
            image = _pil_to_rgb(image)
        arr = np.array(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return np.moveaxis(arr, -1, 0)

    arr = _tensor_to_numpy(image) if isinstance(image, torch.Tensor) else image
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{where} has dtype {arr.dtype}; expected an integer or floating dtype.")
    if input_data_format is None:
        axis = _infer_channel_axis(tuple(arr.shape), where)
    elif input_data_format in ("channels_first", "first"):
        axis = 0
    elif input_data_format in ("channels_last", "last"):
        axis = 2
    else:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}.")
    hwc = np.moveaxis(arr, axis, -1)
    channels = hwc.shape[-1]
    if channels < 1:
        raise ValueError(f"{where} has no channel (shape {tuple(arr.shape)}).")
    if channels > 4 and do_convert_rgb is not False:
        raise ValueError(
            f"{where} has {channels} channels (shape {tuple(arr.shape)}): only 1 to 4 channels convert to RGB. Keep "
            f"them with a {channels}-value (or scalar) image_mean/image_std, or do_normalize=False (and "
            "do_convert_rgb=False), as transformers does."
        )
    if np.issubdtype(hwc.dtype, np.floating) and not np.isfinite(hwc).all():
        raise ValueError(f"{where} contains NaN or infinite values; clean the image before preprocessing.")
    if channels != 3 and do_convert_rgb is not False:
        if channels == 1:
            hwc = np.repeat(hwc, 3, axis=-1)
        elif channels == 2:
            raise ValueError(
                f"{where} has 2 channels and do_convert_rgb={do_convert_rgb}: 2-channel arrays are not converted to RGB "
                "(transformers neither). Pass do_convert_rgb=False with a 2-value (or scalar) image_mean/image_std to "
                "keep them, or convert the image to RGB first."
            )
        else:
            # Blend onto white with transformers' numpy arithmetic (rounding for integer dtypes).
            if np.issubdtype(hwc.dtype, np.floating) and (hwc.min() < 0.0 or hwc.max() > 1.0):
                raise ValueError(
                    f"{where} is a float RGBA image with values in [{hwc.min()}, {hwc.max()}]; "
                    "float RGBA images must lie in [0, 1]."
                )
            white = 255 if np.issubdtype(hwc.dtype, np.integer) else 1.0
            alpha = hwc[..., 3:4] / white
            blended = alpha * hwc[..., :3] + (1 - alpha) * white
            hwc = np.round(blended).astype(hwc.dtype) if white == 255 else blended.astype(hwc.dtype)
    if hwc.shape[0] < 1 or hwc.shape[1] < 1:
        raise ValueError(f"{where} has an empty spatial size {hwc.shape[:2]}.")
    return np.moveaxis(hwc, -1, 0)


def resolve_convert_rgb(do_convert_rgb: bool | None, do_normalize: bool, image_mean: Any, image_std: Any) -> bool | None:
    """The `do_convert_rgb` to apply to a batch. None (the default) converts non-RGB images only when
    the normalisation needs three channels (a 3-value `image_mean` or `image_std`), where transformers
    fails; with scalar or per-channel values, or `do_normalize=False`, images keep their channels, as
    transformers keeps them."""
    if do_convert_rgb is not None:
        return do_convert_rgb
    three = [v for v in (image_mean, image_std) if not isinstance(v, float) and len(v) == 3]
    return None if do_normalize and three else False


# ---------------------------------------------------------------------------------------------
# Pixel operations
# ---------------------------------------------------------------------------------------------
def _resize_image(chw: np.ndarray, size_hw: tuple[int, int], resample: int, where: str) -> np.ndarray:
    """Resize a `(C, H, W)` image (C in 1..4) with Pillow exactly as transformers' PIL backend does.

    Non-uint8 input goes through uint8 first (transformers' `to_pil_image`): integer-valued data in
    [0, 255] is cast, data in [0, 1] is multiplied by 255 (float64, then float32) and truncated, and
    the result is scaled back by 1/255 (float32). Returns `(C, h, w)` uint8 or float32.
    """
    new_h, new_w = size_hw
    if chw.shape[0] > 4:
        raise ValueError(
            f"{where} has {chw.shape[0]} channels, and Pillow resizes images of 1 to 4 (L, LA, RGB, RGBA); pass "
            "do_resize=False (resizing the images beforehand), as transformers needs for such images too."
        )
    if new_h <= 0 or new_w <= 0:
        raise ValueError(
            f"{where} of size {tuple(chw.shape[1:])} would be resized to {size_hw}: a side is 0. The image's aspect "
            "ratio is too extreme for `size`; crop or pad it first, or use a larger `longest_edge`."
        )
    hwc = np.moveaxis(chw, 0, -1)
    scaled_to_255 = False
    if hwc.dtype != np.uint8:
        if np.allclose(hwc, hwc.astype(int)):
            if hwc.min() < 0 or hwc.max() > 255:
                raise ValueError(
                    f"{where} has integer values in [{hwc.min()}, {hwc.max()}]; resizing needs them in [0, 255]."
                )
        elif hwc.min() >= 0 and hwc.max() <= 1:
            scaled_to_255 = True
            hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
        else:
            raise ValueError(
                f"{where} has float values in [{hwc.min()}, {hwc.max()}]; float images must be in [0, 1] "
                "or hold integer values in [0, 255]."
            )
        hwc = hwc.astype(np.uint8)
    # (H, W, 1) goes through Pillow as mode L, (H, W, 2) as LA, 3 as RGB, 4 as RGBA (as transformers)
    pil = PIL.Image.fromarray(np.ascontiguousarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc))
    out = np.array(pil.resize((new_w, new_h), resample=resample))
    out = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)
    if scaled_to_255:
        out = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    return out


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    # float64 product then float32, as transformers (avoids float32 double rounding of x * 1/255).
    return (image.astype(np.float64) * scale).astype(np.float32)


def _normalize(image: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """`(image - mean) / std` per channel of a `(C, H, W)` image; a scalar applies to every channel."""
    # Float input keeps its dtype (as transformers); integer input is computed in float32.
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    channels = image.shape[0]
    for name, value in (("image_mean", mean), ("image_std", std)):
        if not isinstance(value, float) and len(value) != channels:
            raise ValueError(
                f"{name} has {len(value)} values but the image has {channels} channel(s); give one value per channel "
                "(or one number for all); or, for a 3-value one, have the image converted to RGB (do_convert_rgb=True "
                "or None instead of do_convert_rgb=False)."
            )
    m = np.asarray(mean, dtype=image.dtype).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=image.dtype).reshape(-1, 1, 1)
    return (image - m) / s


def _check_resample(resample: Any) -> PIL.Image.Resampling:
    try:
        return PIL.Image.Resampling(int(resample))
    except (TypeError, ValueError):
        raise ValueError(
            f"resample must be a PIL.Image.Resampling value (0..5, e.g. 2 = BILINEAR), got {resample!r}."
        ) from None


def _check_mean_std(value: Any, name: str) -> float | tuple[float, ...]:
    """A number (kept as one float: it applies to every channel) or one value per channel."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        checked: float | tuple[float, ...] = float(value)
        values: tuple[float, ...] = (checked,)
    else:
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or one number per channel, got {value!r}.") from None
        if not values:
            raise ValueError(f"{name} must have one value per channel, got none.")
        checked = values
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}.")
    if name == "image_std" and any(v == 0 for v in values):
        raise ValueError(f"image_std must be non-zero, got {value}.")
    return checked


# ---------------------------------------------------------------------------------------------
# Batch
# ---------------------------------------------------------------------------------------------
def pad_images(images: list[np.ndarray], pad_size: dict[str, int] | None) -> dict[str, Any]:
    """Pad `(C, h_i, w_i)` images bottom/right with zeros to the batch maximum (or `pad_size`).

    Returns `{"pixel_values": (B, C, H, W) float32, "pixel_mask": (B, H, W) int64}` numpy arrays,
    the mask 1 on image pixels and 0 on padding. Every image must have the same C.
    """
    channels = {img.shape[0] for img in images}
    if len(channels) > 1:
        counts = [img.shape[0] for img in images]
        raise ValueError(
            f"the images of one batch must have the same number of channels, got {counts}; convert them to RGB "
            "(do_convert_rgb=True) or process them in separate batches."
        )
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    if pad_size is not None:
        if pad_size["height"] < max_h or pad_size["width"] < max_w:
            raise ValueError(
                f"pad_size {pad_size} is smaller than the largest processed image ({max_h}, {max_w}); "
                "increase pad_size or reduce `size`."
            )
        max_h, max_w = pad_size["height"], pad_size["width"]
    pixel_values = np.zeros((len(images), channels.pop(), max_h, max_w), dtype=np.float32)
    pixel_mask = np.zeros((len(images), max_h, max_w), dtype=np.int64)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        pixel_values[i, :, :h, :w] = img
        pixel_mask[i, :h, :w] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

def _finalize(encoded: dict[str, Any], return_tensors: str | None, device: Any) -> BatchFeature:
    if return_tensors not in ("pt", "np", None):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
    if return_tensors is None:
        encoded["pixel_values"] = list(encoded["pixel_values"])
        encoded["pixel_mask"] = list(encoded["pixel_mask"])
        return BatchFeature(encoded)
    if return_tensors == "np":
        return BatchFeature(encoded)
    out = BatchFeature(
        {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else [torch.from_numpy(x) for x in v]
            for k, v in encoded.items()
        }
    )
    if device is not None:
        out.to(device)
    return out
