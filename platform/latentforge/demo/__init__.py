"""The demo data set (generated captioned scenes), its loopback server and the prompt-adherence metric.

Nothing here imports Ray or MLflow, and torch only inside `untrained.write_untrained_export`, so
the pieces are unit-testable on their own; `config` and `report` hold the demo's settings, layout
and printed summary, and `jobs/demo.py` wires them to the real stage jobs.
"""

from latentforge.demo.adherence import AdherenceResult, classify_pixels, image_adherence, score_images
from latentforge.demo.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    build_scene_set,
    caption_for,
    parse_caption,
    render_scene,
)
from latentforge.demo.server import DemoImageServer

__all__ = [
    "AdherenceResult", "COLOURS", "DemoImageServer", "POSITIONS", "SHAPES", "Scene", "build_scene_set",
    "caption_for", "classify_pixels", "image_adherence", "parse_caption", "render_scene", "score_images",
]
