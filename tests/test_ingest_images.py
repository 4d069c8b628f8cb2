"""Image handling: allow-list, bombs before decode, RGB normalisation, img2dataset resizing."""

from __future__ import annotations

import dataclasses
import io
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from latentforge.ingest.config import IngestConfig
from latentforge.ingest.images import ImageProcessor, jpeg_is_complete, jpeg_scale
from tests.harness.http_server import bomb_png, jpeg_bytes, make_image


def processor(**overrides) -> ImageProcessor:
    return ImageProcessor(dataclasses.replace(IngestConfig(), **overrides))


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("kind", ["jpeg", "png", "webp", "gif", "bmp", "tiff", "cmyk", "grey", "palette",
                                  "png16", "rgba"])
def test_every_mode_becomes_rgb(kind: str) -> None:
    result = processor(image_size=64, resize_mode="border").process(make_image(kind))
    assert result.status == "ok", result.error
    image = decode(result.data)
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
    assert (result.original_width, result.original_height) == (96, 64)


def test_cmyk_colours_survive() -> None:
    rgb = np.asarray(decode(make_image("jpeg"))).astype(int)
    out = np.asarray(decode(processor(resize_mode="no").process(make_image("cmyk")).data)).astype(int)
    assert out.shape == rgb.shape and np.abs(out - rgb).mean() < 20  # not inverted, not grey


def test_16_bit_is_scaled_not_clipped() -> None:
    out = np.asarray(decode(processor(resize_mode="no", encode_format="png", encode_quality=3)
                            .process(make_image("png16")).data))
    row = out[0, :, 0].astype(int)
    assert row[0] < 10 and row[-1] > 245 and len(set(row.tolist())) > 50  # a full ramp, not 255 everywhere


def test_transparent_pixels_become_white() -> None:
    out = np.asarray(decode(processor(resize_mode="no", encode_format="png", encode_quality=3)
                            .process(make_image("rgba")).data))
    assert out.min() == 255


def test_exif_rotation_is_applied() -> None:
    # stored 96x64 with orientation 6 -> shown (and written) 64 wide, 96 tall
    result = processor(resize_mode="no").process(make_image("exif_rotated"))
    assert result.status == "ok"
    assert decode(result.data).size == (64, 96) and (result.original_width, result.original_height) == (64, 96)


@pytest.mark.parametrize("kind,status", [("truncated", "decode_error"), ("truncated_png", "decode_error"),
                                         ("svg", "not_image"), ("html", "not_image"), ("empty", "not_image")])
def test_broken_and_non_images(kind: str, status: str) -> None:
    assert processor().process(make_image(kind)).status == status


def test_png_bomb_refused_from_header_without_decoding() -> None:
    data = make_image("bomb")  # a valid 50,000 x 50,000 PNG
    assert data[16:24] == (50_000).to_bytes(4, 'big') * 2  # IHDR width, height
    tracemalloc.start()
    started = time.monotonic()
    result = processor().process(data)
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.status == "bomb"
    assert elapsed < 0.5 and peak < 16 << 20  # decoding would take 2.5 GB


def test_bomb_limit_is_configurable() -> None:
    big = make_image("jpeg", 400, 300)
    assert processor(max_image_pixels=100_000).process(big).status == "bomb"
    assert processor(max_image_pixels=200_000).process(big).status == "ok"


def test_a_raised_bomb_limit_admits_images_above_pillows_default(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    # 9,500 x 9,500 = 90.25 M pixels, just above Pillow's default (89.5 M). With PNG off the allow-list
    # the verdict comes from the header alone: past both bomb checks it is `not_image`, never decoded.
    big = bomb_png(9_500, 9_500)
    assert processor(allowed_formats=["JPEG"]).process(big).status == "bomb"
    assert processor(max_image_pixels=100_000_000, allowed_formats=["JPEG"]).process(big).status == "not_image"
    assert processor(max_image_pixels=10).process(make_image("jpeg")).status == "bomb"
    assert Image.MAX_IMAGE_PIXELS == 100_000_000  # a lower limit elsewhere does not lower Pillow's


@pytest.mark.parametrize("size", [(320, 240), (400, 300)])  # Pillow's warning and error ranges
def test_a_raised_bomb_limit_admits_and_processes_images(monkeypatch, size) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # Pillow's default, scaled down to decode fast
    data = make_image("jpeg", *size)
    assert processor(max_image_pixels=60_000).process(data).status == "bomb"
    assert processor(max_image_pixels=200_000).process(data).status == "ok"


def test_format_allow_list() -> None:
    assert processor(allowed_formats=["JPEG", "PNG"]).process(make_image("gif")).status == "not_image"
    assert processor(allowed_formats=["JPEG", "PNG"]).process(make_image("png")).status == "ok"


@pytest.mark.parametrize("mode,size", [("no", (96, 64)), ("border", (48, 48)), ("center_crop", (48, 48)),
                                       ("keep_ratio", (72, 48)), ("keep_ratio_largest", (48, 32))])
def test_resize_modes_use_img2dataset_resizer(mode: str, size: tuple[int, int]) -> None:
    result = processor(image_size=48, resize_mode=mode).process(make_image("jpeg"))
    assert result.status == "ok" and decode(result.data).size == size == (result.width, result.height)


def test_resizer_is_img2dataset_s() -> None:
    from img2dataset.resizer import Resizer

    assert isinstance(processor().resizer, Resizer)


def test_size_filters() -> None:
    assert processor(min_image_size=100).process(make_image("jpeg")).status == "filtered_size"
    assert processor(max_aspect_ratio=1.2).process(make_image("jpeg")).status == "filtered_size"
    assert processor(max_aspect_ratio=1.6, min_image_size=64).process(make_image("jpeg")).status == "ok"


@pytest.mark.parametrize("fmt,quality,pil", [("png", 6, "PNG"), ("webp", 80, "WEBP"), ("jpg", 50, "JPEG")])
def test_encode_formats(fmt: str, quality: int, pil: str) -> None:
    result = processor(encode_format=fmt, encode_quality=quality, image_size=32).process(make_image("palette"))
    image = decode(result.data)
    assert image.format == pil and image.mode == "RGB"


def test_jpeg_completeness_marker() -> None:
    data = make_image("jpeg")
    assert jpeg_is_complete(data) and jpeg_is_complete(data + b"trailing junk")
    assert not jpeg_is_complete(data[:-100]) and not jpeg_is_complete(b"")


@pytest.mark.parametrize("size,overrides,scale", [
    ((1000, 800), {}, 2),                                   # 500 px long side still > 256
    ((2100, 1000), {}, 8),                                  # 263 > 256 even at 1/8
    ((500, 400), {}, 1),                                    # 250 at 1/2 would upscale
    ((1000, 600), {"resize_mode": "keep_ratio"}, 2),        # the short side decides here
    ((1000, 600), {"resize_mode": "keep_ratio", "min_image_size": 400}, 1),  # 300 < min size
    ((4000, 3000), {"resize_mode": "no"}, 1),               # no resize: full pixels wanted
    # 2041x204 is 10.005:1 (> 10); at 1/8 it is 256x26 = 9.85:1, which would pass the filter
    ((2041, 204), {"image_size": 200, "max_aspect_ratio": 10.0}, 4),
])
def test_jpeg_scale_keeps_every_resizer_decision(size: tuple[int, int], overrides: dict, scale: int) -> None:
    assert jpeg_scale(*size, dataclasses.replace(IngestConfig(), **overrides)) == scale


def test_large_jpeg_reduced_decode_matches_the_full_decode() -> None:
    data = jpeg_bytes(1200, 900, seed=3, quality=90)
    proc = processor(image_size=256, resize_mode="border")
    result = proc.process(data)
    full, width, height, orig_w, orig_h, err = proc.resizer(io.BytesIO(data))  # img2dataset's own path
    assert err is None and result.status == "ok"
    assert (result.width, result.height) == (width, height) == (256, 256)
    assert (result.original_width, result.original_height) == (orig_w, orig_h) == (1200, 900)
    ours = np.asarray(decode(result.data), dtype=np.float64)
    theirs = np.asarray(decode(full), dtype=np.float64)
    psnr = 10 * np.log10(255 ** 2 / np.mean((ours - theirs) ** 2))
    assert psnr > 32, f"reduced-scale decode differs from the full decode: PSNR {psnr:.1f} dB"


@pytest.mark.parametrize("mode", ["border", "center_crop"])
def test_resizer_transforms_are_built_once_and_give_the_same_bytes(mode: str) -> None:
    # img2dataset's resizer builds its albumentations transforms for every image (~1/4 of a
    # small image's resize CPU); ours are built once per argument set and shared by all calls.
    import sys

    proc = processor(image_size=64, resize_mode=mode)
    transforms = sys.modules[type(proc.resizer).__module__].A
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate([(320, 240), (200, 300), (40, 30)])]
    transforms._built.clear()  # what earlier tests in this process built
    reused = [proc.process(data).data for data in images]
    first_pass = dict(transforms._built)
    assert len(first_pass) == 3  # the resize down, the resize up, the pad or crop
    assert [proc.process(data).data for data in images] == reused
    assert transforms._built.keys() == first_pass.keys()
    assert all(transforms._built[key] is first_pass[key] for key in first_pass)
    module = sys.modules[type(proc.resizer).__module__]
    module.A = transforms._albumentations  # img2dataset's own way: new transforms for every image
    try:
        assert [proc.process(data).data for data in images] == reused
    finally:
        module.A = transforms
