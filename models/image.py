"""Declared image preprocessing: encoded bytes in, one model-ready tensor per image out."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import InputTooLarge, InvalidInput
from models.fields import Fields

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
CHANNELS = {"L": 1, "RGB": 3}
Step = Callable[[Image.Image], Image.Image]


FORMATS = ("PNG", "JPEG")
"""The encoded formats an image input takes unless its spec names others."""


@dataclass(frozen=True)
class ImagePipeline:
    """Decode, orient, convert, resize and normalise images as one model input expects."""

    steps: tuple[Step, ...]
    mode: str
    size: tuple[int, int]
    scale: float
    mean: np.ndarray
    std: np.ndarray
    layout: str
    formats: tuple[str, ...] = FORMATS

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed image, before any reshape to the input's declared shape."""
        w, h = self.size
        c = CHANNELS[self.mode]
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def open(self, data: bytes, max_pixels: int) -> Image.Image:
        """Read one encoded image's header: one of `formats`, of at most `max_pixels`; no pixel is decoded yet."""
        return open_image(data, self.formats, max_pixels)

    def tensor(self, image: Image.Image) -> np.ndarray:
        """Decode an opened image into a float32 array of `item_shape`, then free its pixels."""
        try:
            decoded = load(image)
            for step in self.steps:
                decoded = step(decoded)
            array = np.asarray(decoded, dtype=np.float32).reshape(self.size[1], self.size[0], -1)
        finally:
            image.close()
        array = (array * self.scale - self.mean) / self.std
        return array.transpose(2, 0, 1) if self.layout == "NCHW" else array


class PixelBudget:
    """The pixels the images of one request, job or batch chunk may have together, spent from their headers."""

    def __init__(self, pixels: int, scope: str):
        self.total, self.left, self.scope = pixels, pixels, scope

    def spend(self, pixels: int) -> None:
        """Take `pixels` from what is left, or raise InputTooLarge (taking nothing) when they do not fit."""
        if pixels > self.left:
            left = "" if self.left == self.total else f" ({self.left} left)"
            raise InputTooLarge(f"the images have {pixels} pixels, over the limit of {self.total} pixels "
                                f"per {self.scope}{left}; nothing was decoded")
        self.left -= pixels


def identify(data: bytes) -> str:
    """The format of an encoded image, read from its header alone; InvalidInput if it is none Pillow reads."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "unknown"
    except Exception:
        raise InvalidInput("not an image in a format that can be decoded") from None


def open_image(data: bytes, formats: tuple[str, ...], max_pixels: int) -> Image.Image:
    """Read an image's header, in one of `formats`, refusing one over `max_pixels` before its pixels are read."""
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard trips before ours for huge images (its warning where warnings are errors)
        raise InputTooLarge(f"image is too large to decode ({exc})") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"not a {_names(formats)} image (the formats this input takes)") from None
    except Exception as exc:
        if server_fault(exc):
            raise
        raise InvalidInput(f"not a decodable image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputTooLarge(f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
    return image


def load(image: Image.Image) -> Image.Image:
    """Decode an opened image's pixels, oriented by its EXIF tag; InvalidInput if they are corrupt or cut short."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        if server_fault(exc):
            raise
        raise InvalidInput(f"image could not be decoded ({exc})") from None


def server_fault(exc: BaseException) -> bool:
    """Whether a failure while reading an image is the server's: memory ran out, or the system refused something.

    Pillow reports what is wrong with the bytes themselves (cut short, corrupt, unknown) as OSError without an
    errno, or as SyntaxError, ValueError, EOFError and the like: those are the client's.
    """
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None)


def _names(formats: tuple[str, ...]) -> str:
    return formats[0] if len(formats) == 1 else f"{', '.join(formats[:-1])} or {formats[-1]}"


def parse(tables: list[Fields]) -> ImagePipeline:
    """Build a pipeline from a spec's `preprocess` steps, checking their order and parameters."""
    state = _Geometry()
    steps: list[Step] = []
    for table in tables:
        name = table.choice("step", [*sorted(_IMAGE_STEPS), "normalize", "layout"])
        if (name == "convert") != (table is tables[0]):
            raise table.fail("step", "the first step, and only the first, must be 'convert' (mode L or RGB)")
        if name in _IMAGE_STEPS:
            if state.tensor_steps:
                raise table.fail("step", f"{name!r} must come before normalize and layout")
            steps.append(_IMAGE_STEPS[name](table, state))
        else:
            state.tensor_step(name, table)
        table.done()
    return state.pipeline(tables[-1], tuple(steps))


class _Geometry:
    """What is known of the image while the steps are read: mode, exact size, normalisation."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.size: tuple[int, int] | None = None
        self.scale, self.mean, self.std, self.layout = 1.0, [0.0], [1.0], "NHWC"
        self.formats = FORMATS
        self.tensor_steps: set[str] = set()

    def tensor_step(self, name: str, table: Fields) -> None:
        if name in self.tensor_steps:
            raise table.fail("step", f"{name!r} appears twice")
        self.tensor_steps.add(name)
        if name == "layout":
            self.layout = table.choice("order", ["NCHW", "NHWC"])
            return
        self.scale = table.number("scale", 1.0)
        self.mean = _per_channel(table, "mean", 0.0)
        self.std = _per_channel(table, "std", 1.0)
        if any(s == 0 for s in self.std):
            raise table.fail("std", "must not be zero")

    def pipeline(self, last: Fields, steps: tuple[Step, ...]) -> ImagePipeline:
        assert self.mode is not None, "parse() checks that the first step is convert"
        if self.size is None:
            raise last.fail("step", "preprocessing must end at a fixed size (resize or center_crop)")
        channels = CHANNELS[self.mode]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise last.fail(name, f"has {len(values)} values for {channels} channel(s)")
        return ImagePipeline(
            steps, self.mode, self.size, self.scale,
            np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32), self.layout, self.formats,
        )


def _per_channel(table: Fields, key: str, default: float) -> list[float]:
    value = table.table.get(key, default)
    table.seen.add(key)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise table.fail(key, "expected a number or a list of numbers")
    return [float(v) for v in values]


def _size(table: Fields, key: str) -> tuple[int, int]:
    value = table.table.get(key)
    table.seen.add(key)
    pair = [value, value] if isinstance(value, int) else value
    if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) is int and 0 < v <= 8192 for v in pair)):
        raise table.fail(key, "expected a side length or [width, height], each 1..8192")
    return pair[0], pair[1]


def _formats(table: Fields) -> tuple[str, ...]:
    """The `formats` the pipeline decodes: Pillow's names, PNG and JPEG when none are given."""
    formats = tuple(dict.fromkeys(table.each("formats", _format)))
    if "formats" in table.table and not formats:
        raise table.fail("formats", "must name at least one format")
    return formats or FORMATS


def _format(value: object) -> str:
    Image.init()  # registers every format Pillow reads (once)
    if not isinstance(value, str) or value.upper() not in Image.OPEN:
        raise ValueError(f"{value!r} is not a format Pillow reads; one of {', '.join(sorted(Image.OPEN))}")
    return value.upper()


def _convert(table: Fields, state: _Geometry) -> Step:
    mode = state.mode = table.choice("mode", list(CHANNELS))
    state.formats = _formats(table)

    def convert(image: Image.Image) -> Image.Image:
        # Pillow decodes images it cannot convert: LAB ones, palettes shorter than their transparency
        try:
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # transparent pixels become white, as they look on a page
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return image.convert(mode)
        except ValueError as exc:
            raise InvalidInput(f"a {image.mode} image cannot be converted to {mode} ({exc})") from None

    return convert


def _autocontrast(table: Fields, state: _Geometry) -> Step:
    cutoff = table.number("cutoff", 0.0, minimum=0.0)
    return lambda image: ImageOps.autocontrast(image, cutoff=cutoff)


def _invert(table: Fields, state: _Geometry) -> Step:
    """Invert always, or only when the background (most of the image) is light."""
    when = table.choice("when", ["always", "light_background"], "always")
    if when == "always":
        return ImageOps.invert
    return lambda image: ImageOps.invert(image) if _mean_level(image) > 127 else image


def _mean_level(image: Image.Image) -> float:
    histogram = image.convert("L").histogram()
    return sum(i * n for i, n in enumerate(histogram)) / max(1, sum(histogram))


def _crop_to_content(table: Fields, state: _Geometry) -> Step:
    """Crop to the bright content's bounding box, squared and with a margin (for ink after `invert`)."""
    threshold = table.int("threshold", 64)
    margin = table.number("margin", 0.1, minimum=0.0)
    state.size = None

    def crop(image: Image.Image) -> Image.Image:
        box = image.convert("L").point(lambda p: 255 if p > threshold else 0).getbbox()
        if box is None:
            return image
        left, top, right, bottom = box
        side = max(right - left, bottom - top) * (1 + 2 * margin)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        square = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        return image.crop(square)  # outside the image Pillow fills with black

    return crop


def _resize(table: Fields, state: _Geometry) -> Step:
    size = _size(table, "size")
    how = table.choice("mode", ["stretch", "crop", "pad", "shorter"], "stretch")
    resample = table.choice("resample", RESAMPLE, "bilinear")
    state.size = None if how == "shorter" else size
    if how == "crop":
        return lambda image: ImageOps.fit(image, size, resample)
    if how == "pad":
        return lambda image: ImageOps.pad(image, size, resample)
    if how == "shorter":
        return lambda image: _shorter_side(image, size[0], resample)
    return lambda image: image.resize(size, resample)


def _shorter_side(image: Image.Image, side: int, resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    ratio = side / min(w, h)
    return image.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), resample)


def _center_crop(table: Fields, state: _Geometry) -> Step:
    size = state.size = _size(table, "size")

    def crop(image: Image.Image) -> Image.Image:
        w, h = image.size
        left, top = (w - size[0]) // 2, (h - size[1]) // 2
        return image.crop((left, top, left + size[0], top + size[1]))

    return crop


_IMAGE_STEPS: dict[str, Callable[[Fields, _Geometry], Step]] = {
    "convert": _convert,
    "autocontrast": _autocontrast,
    "invert": _invert,
    "crop_to_content": _crop_to_content,
    "resize": _resize,
    "center_crop": _center_crop,
}
