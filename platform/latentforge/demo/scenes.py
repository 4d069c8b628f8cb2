"""Generated captioned scenes: one coloured shape at a named position on a grey background.

Captions name the colour, the shape and the position ("a red circle on the left"), so a
text-conditioned model has something measurable to learn, and `latentforge.demo.adherence`
can check a generated image against its prompt without any learned classifier.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 190),
    "cyan": (30, 190, 200),
}
"""The palette; every pair is more than 100 apart in RGB, and far from the background."""

BACKGROUND: tuple[int, int, int] = (212, 212, 212)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                             "bottom": "at the bottom"}
"""Position name -> caption phrase."""

_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
_TEMPLATES = (
    "a {colour} {shape} {where}",
    "a {colour} {shape} {where} on a grey background",
    "{Where}, a {colour} {shape}",
    "a picture of a {colour} {shape} {where}",
)
SCENES_FILE = "scenes.jsonl"
BUILD_FILE = "build.json"


@dataclass(frozen=True)
class Scene:
    """One row of the demo data set."""

    index: int
    colour: str
    shape: str
    position: str
    caption: str
    path: str = ""
    """Image path relative to the data set directory (images/NNNNNN.png)."""


def caption_for(colour: str, shape: str, position: str, template: int = 0) -> str:
    where = POSITIONS[position]
    return _TEMPLATES[template % len(_TEMPLATES)].format(colour=colour, shape=shape, where=where,
                                                         Where=where[0].upper() + where[1:])


_WORD = re.compile(r"[a-z]+")


def parse_caption(caption: str) -> tuple[str, str | None, str | None]:
    """(colour, shape, position) named in a caption; ValueError when it names no palette colour."""
    words = _WORD.findall(caption.lower())
    colour = next((w for w in words if w in COLOURS), None)
    if colour is None:
        raise ValueError(f"caption names no colour of the palette {sorted(COLOURS)}: {caption!r}")
    shape = next((w for w in words if w in SHAPES), None)
    position = next((w for w in words if w in POSITIONS), None)
    return colour, shape, position


def render_scene(colour: str, shape: str, position: str, size: int = 64,
                 rng: random.Random | None = None) -> Image.Image:
    """An RGB image: `shape` in `colour` centred near `position`, about 0.44 of the side wide.

    Small random jitter of place, size and tint keeps the samples distinct; the shape's centre
    always stays in the named half of the image.
    """
    rng = rng or random.Random(0)
    tint = rng.randint(-8, 8)
    image = Image.new("RGB", (size, size), tuple(c + tint for c in BACKGROUND))
    cx, cy = _CENTRES[position]
    jitter_along, jitter_across = rng.uniform(-0.04, 0.04), rng.uniform(-0.12, 0.12)
    if position in ("left", "right"):
        cx, cy = cx + jitter_along, cy + jitter_across
    else:
        cx, cy = cx + jitter_across, cy + jitter_along
    r = rng.uniform(0.19, 0.24) * size
    x, y = cx * size, cy * size
    fill = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLOURS[colour])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image


def combinations() -> list[tuple[str, str, str]]:
    return [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def build_scene_set(out_dir: str | Path, rows: int = 4000, seed: int = 0, image_size: int = 64) -> list[Scene]:
    """Write `rows` scenes as `images/NNNNNN.png` plus `scenes.jsonl`; balanced over all combinations.

    Idempotent: a directory already built with the same settings is reused as it is.
    """
    out = Path(out_dir)
    settings = {"rows": rows, "seed": seed, "image_size": image_size, "version": 1}
    build = out / BUILD_FILE
    if build.exists() and json.loads(build.read_text()) == settings and (out / SCENES_FILE).exists():
        return load_scenes(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = combinations()
    order = [combos[i % len(combos)] for i in range(rows)]
    rng.shuffle(order)
    scenes = []
    for index, (colour, shape, position) in enumerate(order):
        rel = f"images/{index:06d}.png"
        render_scene(colour, shape, position, image_size, rng).save(out / rel, optimize=False)
        caption = caption_for(colour, shape, position, rng.randrange(len(_TEMPLATES)))
        scenes.append(Scene(index, colour, shape, position, caption, rel))
    (out / SCENES_FILE).write_text("".join(json.dumps(asdict(s)) + "\n" for s in scenes))
    build.write_text(json.dumps(settings))
    return scenes


def load_scenes(dir_: str | Path) -> list[Scene]:
    lines = (Path(dir_) / SCENES_FILE).read_text().splitlines()
    return [Scene(**json.loads(line)) for line in lines if line.strip()]


def eval_prompts(count: int) -> list[str]:
    """`count` prompts cycling colours fastest, then positions, then shapes (24 cover every
    colour x position pair); the adherence measurement's fixed prompt set."""
    colours, positions = list(COLOURS), list(POSITIONS)
    return [caption_for(colours[i % len(colours)], SHAPES[(i // 24) % len(SHAPES)],
                        positions[(i // len(colours)) % len(positions)], 0) for i in range(count)]
