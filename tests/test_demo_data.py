"""The demo's pieces on their own: scene generator, loopback server, adherence metric."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentforge.demo import (COLOURS, POSITIONS, SHAPES, DemoImageServer, build_scene_set, caption_for,
                              classify_pixels, image_adherence, parse_caption, render_scene, score_images)
from latentforge.demo.adherence import BACKGROUND_LABEL, Z_95, AdherenceResult, format_share, wilson_interval
from latentforge.demo.scenes import BACKGROUND, eval_prompts
from latentforge.demo.server import BROKEN_KINDS, url_rows, write_url_list


def test_captions_round_trip_every_combination() -> None:
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                for template in range(4):
                    assert parse_caption(caption_for(colour, shape, position, template)) == (colour, shape, position)
    with pytest.raises(ValueError, match="no colour"):
        parse_caption("a dog on a sofa")


def test_palette_is_well_separated() -> None:
    colours = np.array(list(COLOURS.values()) + [BACKGROUND], dtype=float)
    dist = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert dist[~np.eye(len(colours), dtype=bool)].min() > 100


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_scene_adheres_to_its_own_caption(shape: str, position: str) -> None:
    rng = random.Random(3)
    for colour in COLOURS:
        image = render_scene(colour, shape, position, 64, rng)
        result = image_adherence(image, caption_for(colour, shape, position))
        assert result == {"colour_ok": True, "position_ok": True, "dominant": colour}


def test_adherence_rejects_wrong_colour_and_wrong_position() -> None:
    image = render_scene("red", "circle", "left", 64, random.Random(0))
    assert image_adherence(image, "a blue circle on the left")["colour_ok"] is False
    assert image_adherence(image, "a blue circle on the left")["dominant"] == "red"
    wrong_place = image_adherence(image, "a red circle on the right")
    assert wrong_place["colour_ok"] is True and wrong_place["position_ok"] is False
    # At 32 px (the demo's training resolution) the checks still hold.
    small = image.resize((32, 32), Image.BICUBIC)
    assert image_adherence(small, "a red circle on the left")["position_ok"] is True


def test_adherence_on_synthetic_arrays() -> None:
    grey = np.full((32, 32, 3), BACKGROUND, np.uint8)
    assert (classify_pixels(grey) == BACKGROUND_LABEL).all()
    assert image_adherence(grey, "a red square at the top") == {"colour_ok": False, "position_ok": False,
                                                                "dominant": None}
    top = grey.copy()
    top[:10, 8:24] = COLOURS["yellow"]
    assert image_adherence(top, "a yellow square at the top")["position_ok"] is True
    assert image_adherence(top, "a yellow square at the bottom")["position_ok"] is False
    # A speck below min_fraction is not a dominant colour.
    speck = grey.copy()
    speck[0, 0] = COLOURS["green"]
    assert image_adherence(speck, "a green circle on the left")["dominant"] is None


def test_score_images_matches_chance_on_noise_and_is_perfect_on_renders() -> None:
    rng = np.random.default_rng(0)
    prompts = eval_prompts(120)
    noise = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), p) for p in prompts]
    chance = score_images(noise)
    assert chance.n == 120 and chance.colour < 0.45
    renders = [(render_scene(*parse_caption(p), 32, random.Random(i)), p) for i, p in enumerate(prompts)]
    perfect = score_images(renders)
    assert (perfect.colour, perfect.position, perfect.both) == (1.0, 1.0, 1.0)
    assert perfect.as_metrics()["adherence_colour"] == 1.0


def test_eval_prompts_are_balanced() -> None:
    prompts = eval_prompts(24)
    parsed = [parse_caption(p) for p in prompts]
    assert {(c, p) for c, _, p in parsed} == {(c, p) for c in COLOURS for p in POSITIONS}


def test_build_scene_set_is_balanced_and_idempotent(tmp_path) -> None:
    scenes = build_scene_set(tmp_path, rows=144, seed=1, image_size=48)
    assert len(scenes) == 144 and len(list((tmp_path / "images").glob("*.png"))) == 144
    counts = {c: sum(s.colour == c for s in scenes) for c in COLOURS}
    assert set(counts.values()) == {24}
    image = Image.open(tmp_path / scenes[5].path)
    assert image.size == (48, 48) and image.mode == "RGB"
    assert image_adherence(image, scenes[5].caption)["colour_ok"]
    mtime = (tmp_path / "scenes.jsonl").stat().st_mtime_ns
    assert build_scene_set(tmp_path, rows=144, seed=1, image_size=48) == scenes
    assert (tmp_path / "scenes.jsonl").stat().st_mtime_ns == mtime


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def test_server_serves_images_and_broken_urls(tmp_path) -> None:
    scenes = build_scene_set(tmp_path, rows=30, image_size=32)
    with DemoImageServer(tmp_path) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        status, body, ctype = _get(server.url_for(scenes[0]))
        assert status == 200 and ctype == "image/png" and body == (tmp_path / scenes[0].path).read_bytes()
        assert _get(server.broken_url("missing", scenes[0]))[0] == 404
        status, body, ctype = _get(server.broken_url("html", scenes[0]))
        assert status == 200 and ctype == "text/html"
        status, body, _ = _get(server.broken_url("truncated", scenes[0]))
        assert status == 200 and 0 < len(body) < (tmp_path / scenes[0].path).stat().st_size
        assert _get(f"{server.base_url}/images/..%2Fscenes.jsonl")[0] == 404
        rows = url_rows(server, scenes, broken_every=10)
        broken = [r for r in rows if "/broken/" in r["url"]]
        assert len(broken) == 3 and {r["url"].split("/")[4] for r in broken} == set(BROKEN_KINDS)
        path = write_url_list(rows, tmp_path / "urls.parquet")
        table = pq.read_table(path).to_pylist()
        assert table[0]["caption"] == scenes[0].caption and set(table[0]) >= {"url", "caption", "colour"}
        assert json.loads((tmp_path / "build.json").read_text())["rows"] == 30
    assert server.requests == 0  # stopped


def test_block_average_removes_pixel_noise_but_keeps_a_shape() -> None:
    from latentforge.demo.adherence import block_average

    rng = np.random.default_rng(1)
    clean = np.asarray(render_scene("blue", "square", "right", 32, random.Random(2))).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 110, clean.shape), 0, 255).astype(np.uint8)
    assert image_adherence(noisy, "a blue square on the right", grid=None)["colour_ok"] is False
    assert image_adherence(noisy, "a blue square on the right")["colour_ok"] is True  # 8 x 8 cells
    assert block_average(noisy, 8).shape == (8, 8, 3)
    assert block_average(noisy, None).shape == (32, 32, 3)


@pytest.mark.parametrize(("share", "n"), [(0.0, 10), (0.3, 20), (0.88, 48), (0.94, 288), (1.0, 288)])
def test_wilson_interval_solves_the_score_equation(share: float, n: int) -> None:
    """Each end p of the Wilson interval is where the share sits z standard errors (at p) away from p."""
    low, high = wilson_interval(share, n)
    assert 0.0 <= low <= share <= high <= 1.0
    for end in (low, high):
        assert abs(share - end) == pytest.approx(Z_95 * (end * (1 - end) / n) ** 0.5, abs=1e-9)
    assert wilson_interval(0.0, 10)[1] == pytest.approx(Z_95 ** 2 / (10 + Z_95 ** 2))  # the closed form at 0 of n
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_adherence_figures_print_their_interval() -> None:
    assert format_share(253 / 288, 288) == "88% [84, 91]"
    assert format_share(42 / 48, 48) == "88% [75, 94]"  # 48 images: the demo measures on more
    result = AdherenceResult(288, colour=0.94, position=0.9, both=0.88)
    assert result.describe().endswith("both 88% [84, 91] of 288 images (95 % intervals)")
