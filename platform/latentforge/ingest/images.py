"""Downloaded bytes -> an RGB sample, resized by img2dataset's own `Resizer`.

Order matters for safety and speed:
1. sniff the format from the bytes (Pillow reads only the header) and refuse what is not on
   the allow-list (HTML, SVG, empty bodies never reach a decoder);
2. refuse decompression bombs from the header dimensions, before any pixel is decoded
   (`max_image_pixels`, either side of Pillow's own default limit: see `admit_in_pillow`);
3. the common case, a complete RGB JPEG without an EXIF rotation, goes straight to the
   resizer (one decode, exactly what img2dataset does) -- unless it is at least twice the
   target size: then libjpeg decodes it at 1/2, 1/4 or 1/8 scale (the DCT-domain reduction,
   far cheaper than decoding every pixel and averaging them away again) and the resizer gets
   that smaller image, chosen so that it still downscales and every size filter decides
   exactly as on the full image (`jpeg_scale`);
4. everything else (CMYK, palette, 16-bit, alpha, EXIF-rotated, grey) is decoded by Pillow,
   rotated upright, converted to 8-bit RGB and handed to the resizer as a lossless BMP.
The output is always a 3-channel RGB image encoded as jpg/png/webp.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from latentforge.light_imports import resizer_class

EXIF_ORIENTATION = 0x0112
JPEG_SCALES = (8, 4, 2)   # the reductions libjpeg (cv2.IMREAD_REDUCED_COLOR_N) decodes directly
_FILTER_ERRORS = ("image too small", "aspect ratio too large", "image area too large")


@dataclass
class ImageResult:
    status: str                    # ok, not_image, decode_error, bomb, filtered_size
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    source_format: str = ""
    error: str = ""


def jpeg_is_complete(data: bytes) -> bool:
    """A JPEG whose last scan is followed by an EOI marker (0xFFD9 never occurs inside scan data)."""
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha is composited on white (as img2dataset does)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.int64)
        bits = 16 if mode.startswith("I;16") or array.max(initial=0) > 255 else 8
        array = (array >> (bits - 8)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray((array * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa") or "A" in mode:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV ...


def jpeg_scale(width: int, height: int, config: Any) -> int:
    """The largest libjpeg reduction whose result the resizer treats like the full image: it
    still downscales (so the output size and interpolation are the same) and the min-size and
    aspect-ratio filters give the same verdict. 1 means decode at full size."""
    if config.resize_mode == "no":
        return 1
    longest_side = config.resize_mode in ("border", "keep_ratio_largest")
    max_ratio = config.max_aspect_ratio or math.inf
    too_elongated = max(width, height) / min(width, height) > max_ratio
    for scale in JPEG_SCALES:
        w, h = -(-width // scale), -(-height // scale)  # libjpeg rounds reduced sizes up
        side = max(w, h) if longest_side else min(w, h)
        if (side > config.image_size and min(w, h) >= config.min_image_size
                and (max(w, h) / min(w, h) > max_ratio) == too_elongated):
            return scale
    return 1


def decode_reduced_jpeg(data: bytes, scale: int) -> io.BytesIO:
    """A JPEG decoded at 1/`scale` by libjpeg, as a lossless BMP stream for the resizer."""
    import cv2

    flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)  # (H/scale, W/scale, 3) BGR, as the resizer reads it
    if image is None:
        raise _Truncated("JPEG could not be decoded")
    ok, encoded = cv2.imencode(".bmp", image)
    if not ok:
        raise _Truncated("reduced JPEG could not be re-encoded")
    return io.BytesIO(encoded.tobytes())


@contextlib.contextmanager
def standard_streams_kept() -> Iterator[None]:
    """Give the process its own stdout/stderr back after a batch of resizer calls.

    img2dataset's `Resizer` silences fds 1 and 2 with dup/dup2 around every image. Called from
    many threads at once those calls interleave, and a thread can "restore" another thread's
    /dev/null: the worker would stay silenced for good and its logs and tracebacks be lost.
    Enter this before the download threads start and leave it after they have all finished.
    """
    saved = [os.dup(1), os.dup(2)]
    try:
        yield
    finally:
        for target, fd in enumerate(saved, start=1):
            os.dup2(fd, target)
            os.close(fd)


class _ReusedTransforms:
    """albumentations as img2dataset's resizer module sees it, except that a transform built
    again with the same arguments is the one built before.

    The resizer builds its `LongestMaxSize`, `PadIfNeeded`, ... afresh for every image, and
    building one (pydantic validation, `inspect.signature`) cost ~10 % of a whole resize of a
    typical web image, all of it holding the GIL. Sharing one across threads is safe: the
    resizer calls them with p=1, so a call draws nothing random, and the one attribute a call
    writes, `params` (a record of the last call), is read by nothing here.
    """

    def __init__(self, albumentations: Any) -> None:
        self._albumentations = albumentations
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        factory = getattr(self._albumentations, name)
        if not (isinstance(factory, type) and issubclass(factory, self._albumentations.BasicTransform)):
            return factory
        return lambda **kwargs: self._transform(factory, kwargs)

    def _transform(self, factory: type, kwargs: dict[str, Any]) -> Any:
        key = f"{factory.__name__}{sorted(kwargs.items())!r}"  # repr: the arguments include lists
        with self._lock:
            if key not in self._built:
                self._built[key] = factory(**kwargs)
            return self._built[key]


def resizer_with_reused_transforms() -> type:
    """img2dataset's `Resizer`, its module switched (once per process) to `_ReusedTransforms`."""
    resizer = resizer_class()
    module = sys.modules[resizer.__module__]
    albumentations = getattr(module, "A", None)  # resizer.py: `import albumentations as A`
    if albumentations is not None and not isinstance(albumentations, _ReusedTransforms):
        module.A = _ReusedTransforms(albumentations)
    return resizer


def admit_in_pillow(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb limit to `max_pixels` when that is higher; never lower it.

    `Image.open` refuses images above `Image.MAX_IMAGE_PIXELS` (~89 M pixels by default: a
    warning, which `process` treats as an error, and an error from twice that) before our own
    header check runs, so without this a raised `max_image_pixels` would still refuse what
    Pillow's default refuses. Each processor's own check enforces its limit; Pillow's only has
    to admit the largest one in the process.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


class ImageProcessor:
    """Thread-safe; one per worker (the resizer holds only settings)."""

    def __init__(self, config: Any) -> None:
        Resizer = resizer_with_reused_transforms()  # heavy import (cv2, albumentations): only in workers

        self.allowed = {f.upper() for f in config.allowed_formats}
        self.max_pixels = int(config.max_image_pixels)
        admit_in_pillow(self.max_pixels)
        self.resizer = Resizer(
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            resize_only_if_bigger=config.resize_only_if_bigger,
            encode_quality=config.encode_quality,
            encode_format=config.encode_format,
            min_image_size=config.min_image_size,
            max_aspect_ratio=config.max_aspect_ratio if config.max_aspect_ratio else float("inf"),
        )
        self.extension = config.encode_format
        self.config = config

    def process(self, data: bytes) -> ImageResult:
        if not data:
            return ImageResult("not_image", error="empty body")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                fmt = (image.format or "").upper()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return ImageResult("bomb", error=str(exc)[:300])
        except UnidentifiedImageError:
            head = data[:64].lstrip().lower()
            kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else \
                "SVG" if b"<svg" in data[:1024].lower() or head.startswith(b"<?xml") else "unrecognised data"
            return ImageResult("not_image", error=f"not an image ({kind})")
        except Exception as exc:  # noqa: BLE001 - corrupt headers raise anything
            return ImageResult("decode_error", error=f"{type(exc).__name__}: {exc}"[:300])
        if fmt not in self.allowed:
            return ImageResult("not_image", error=f"format {fmt or '?'} is not in allowed_formats", source_format=fmt)
        if width <= 0 or height <= 0:
            return ImageResult("decode_error", error=f"bad dimensions {width}x{height}", source_format=fmt)
        if width * height > self.max_pixels:
            return ImageResult("bomb", error=f"{width}x{height} = {width * height:,} pixels > max_image_pixels "
                                             f"{self.max_pixels:,}", source_format=fmt,
                               original_width=width, original_height=height)
        try:
            stream, reduced = self._normalised_stream(image, fmt, data)
        except _Truncated as exc:
            return ImageResult("decode_error", error=str(exc), source_format=fmt)
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError/ValueError/SyntaxError on bad data
            return ImageResult("decode_error", error=f"{type(exc).__name__}: {exc}"[:300], source_format=fmt)
        encoded, out_w, out_h, orig_w, orig_h, err = self.resizer(stream)
        if reduced:
            orig_w, orig_h = width, height  # the resizer saw the reduced decode
        if err is not None or encoded is None:
            err = err or "resizer returned nothing"
            status = "filtered_size" if any(e in err for e in _FILTER_ERRORS) else "decode_error"
            return ImageResult(status, error=err[:300], source_format=fmt,
                               original_width=width, original_height=height)
        return ImageResult("ok", data=encoded, width=out_w, height=out_h, original_width=orig_w,
                           original_height=orig_h, source_format=fmt)

    def _normalised_stream(self, image: Image.Image, fmt: str, data: bytes) -> tuple[io.BytesIO, bool]:
        """(stream for the resizer, whether it holds a reduced-scale decode)."""
        if fmt == "JPEG" and not jpeg_is_complete(data):
            raise _Truncated("truncated JPEG (no end-of-image marker after the last scan)")
        orientation = 1
        try:
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not worth refusing the image for
            orientation = 1
        if fmt == "JPEG" and image.mode == "RGB" and orientation == 1:
            scale = jpeg_scale(image.width, image.height, self.config)
            if scale == 1:
                return io.BytesIO(data), False  # fast path: the resizer's own single decode
            return decode_reduced_jpeg(data, scale), True
        image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        rgb = to_rgb(image)
        out = io.BytesIO()
        rgb.save(out, format="BMP")
        out.seek(0)
        return out, False


class _Truncated(Exception):
    pass
