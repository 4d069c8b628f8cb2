"""What generation leaves on disk: one PNG per request (provenance in PNG text chunks), a
contact-sheet grid and a jsonl index; and the request list (prompts + per-prompt seeds).

`DIR/NNNNNN.png` is named by the request's position in the prompt list, so a rerun knows which
requests are finished (resume) without trusting anything but complete, atomically renamed files;
`index.jsonl` is rebuilt from the PNGs' own metadata.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from latentforge import storage
# DISPLAY_TILE and contact_sheet stay importable from here: the grids' callers (sr_fidelity) use them.
from latentforge.grids import DISPLAY_TILE, contact_sheet, display_scale  # noqa: F401

INDEX_NAME = "index.jsonl"
GRID_NAME = "grid.png"
META_KEY = "latentforge"


@dataclass
class Request:
    """One image to make: its position (file name), prompt and seed."""

    index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.index:06d}.png"


def load_prompts(spec: str, base_seed: int = 0) -> list[Request]:
    """`spec` is a file (.txt: one prompt a line; .jsonl: {"prompt", "seed"?} a line) or a prompt.

    Seeds default to `base_seed + index`, so each prompt's image is fixed by its position.
    """
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle]
        out: list[Request] = []
        if spec.endswith(".jsonl"):
            for line in lines:
                if line.strip():
                    row = json.loads(line)
                    i = len(out)
                    out.append(Request(i, str(row["prompt"]), int(row.get("seed", base_seed + i))))
        else:
            for line in lines:
                if line.strip():
                    out.append(Request(len(out), line.strip(), base_seed + len(out)))
        if not out:
            raise ValueError(f"{spec}: no prompts")
        return out
    if not spec.strip():
        raise ValueError("no prompt given")
    return [Request(0, spec, base_seed)]


def png_bytes(image_u8: np.ndarray, meta: dict[str, Any]) -> bytes:
    """PNG with each scalar in `meta` as a tEXt/iTXt chunk plus the whole record as JSON."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in meta.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            info.add_itxt(key, "" if value is None else str(value))
    info.add_itxt(META_KEY, json.dumps(meta, sort_keys=True, default=str))
    buffer = io.BytesIO()
    Image.fromarray(image_u8).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: str, image_u8: np.ndarray, meta: dict[str, Any]) -> str:
    """Write atomically; returns the file's sha256."""
    data = png_bytes(image_u8, meta)
    storage.atomic_write_bytes(path, data)
    return storage.sha256_bytes(data)


def read_png_meta(path: str) -> dict[str, Any] | None:
    """The record `save_png` stored, or None for a PNG that is not ours / unreadable."""
    from PIL import Image

    try:
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as handle, Image.open(handle) as img:
            text = dict(getattr(img, "text", {}) or {})
    except Exception:  # noqa: BLE001 - a damaged file is simply redone
        return None
    raw = text.get(META_KEY)
    return json.loads(raw) if raw else None


def read_image(uri: str) -> np.ndarray:
    """uint8 (H, W, 3) pixels of the image at `uri` (any fsspec URI)."""
    from PIL import Image

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle, Image.open(handle) as image:
        return np.asarray(image.convert("RGB"))


def save_grid(path: str, images: Sequence[np.ndarray], meta: dict[str, Any] | None = None,
              columns: int | None = None) -> str:
    """A contact sheet of the images, small ones enlarged (nearest, so pixels stay pixels) to be looked at;
    the factor is recorded as `display_scale` in the PNG's metadata. The per-request PNGs keep their size."""
    scale = display_scale(images) if images else 1
    storage.atomic_write_bytes(path, png_bytes(contact_sheet(images, columns, scale),
                                               {**(meta or {}), "display_scale": scale}))
    return path


def write_index(path: str, rows: Iterable[dict[str, Any]]) -> None:
    lines = [json.dumps(r, sort_keys=True, default=str) for r in sorted(rows, key=lambda r: r["index"])]
    storage.atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode())


def request_row(request: Request, meta: dict[str, Any]) -> dict[str, Any]:
    return {"index": request.index, "file": request.file, **meta}


def finished(out_dir: str, requests: Sequence[Request], settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Requests whose PNG exists with the same prompt, seed and settings -> their index row."""
    done: dict[int, dict[str, Any]] = {}
    for req in requests:
        path = storage.join(out_dir, req.file)
        if not storage.exists(path):
            continue
        meta = read_png_meta(path)
        if not meta or meta.get("prompt") != req.prompt or int(meta.get("seed", -1)) != req.seed:
            continue
        if any(meta.get(k) != v for k, v in settings.items()):
            continue
        done[req.index] = {"index": req.index, "file": req.file, **meta}
    return done


def as_dict(request: Request) -> dict[str, Any]:
    return asdict(request)
