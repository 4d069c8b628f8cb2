"""The one grid maker (latentforge.grids): its layout and enlargement against the libraries of
record (torchvision's make_grid, PIL's nearest resize), and both of its users."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from latentforge.autoencoder.losses import reconstruction_grid, to_unit
from latentforge.generation.outputs import read_png_meta, save_grid
from latentforge.grids import contact_sheet, display_scale, enlarge


def _images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _torchvision_grid(images: list[np.ndarray], columns: int, scale: int) -> np.ndarray:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    batch = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="nearest")
    return make_grid(batch, nrow=columns, padding=2, pad_value=255).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("count", "columns", "scale"), [(5, None, 1), (5, 2, 3), (6, 3, 8), (7, 4, 2)])
def test_sheet_is_torchvisions_grid(count, columns, scale) -> None:
    images = _images(count, 6)
    cols = columns or 3  # ceil(sqrt(5)): a near-square sheet
    np.testing.assert_array_equal(contact_sheet(images, columns, scale), _torchvision_grid(images, cols, scale))


def test_enlarge_is_pil_nearest() -> None:
    image = _images(1, 7)[0][:, :5]
    expected = np.asarray(Image.fromarray(image).resize((5 * 4, 7 * 4), Image.NEAREST))
    np.testing.assert_array_equal(enlarge(image, 4), expected)
    assert enlarge(image, 1) is image


def test_mixed_sizes_sit_top_left_in_cells_of_the_largest() -> None:
    small, tall = np.zeros((4, 6, 3), np.uint8), np.full((10, 3, 3), 7, np.uint8)
    sheet = contact_sheet([small, tall], columns=2, pad=1)
    assert sheet.shape == (1 * 10 + 2, 2 * 6 + 3, 3)
    assert (sheet[1:5, 1:7] == 0).all() and (sheet[5:11, 1:7] == 255).all()  # below `small`: background
    assert (sheet[1:11, 8:11] == 7).all() and (sheet[1:11, 11:14] == 255).all()
    with pytest.raises(ValueError, match="no images"):
        contact_sheet([])


def test_display_scale_brings_small_images_to_a_viewable_size() -> None:
    assert display_scale(_images(2, 16)) == 8
    assert display_scale([np.zeros((16, 50, 3), np.uint8)]) == 2  # the largest side decides
    assert display_scale(_images(1, 300)) == 1


def test_save_grid_records_its_enlargement(tmp_path) -> None:
    images = _images(4, 16)
    save_grid(str(tmp_path / "grid.png"), images, {"files": "a,b"}, columns=2)
    with Image.open(tmp_path / "grid.png") as png:
        np.testing.assert_array_equal(np.asarray(png), _torchvision_grid(images, 2, 8))
    assert read_png_meta(str(tmp_path / "grid.png")) == {"files": "a,b", "display_scale": 8}


def test_reconstruction_grid_rows_are_originals_then_reconstructions() -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    reconstruction = torch.rand(3, 3, 8, 8, generator=generator) * 2.4 - 1.2  # out of range: clamped
    as_u8 = [np.ascontiguousarray(t) for t in
             torch.cat([to_unit(pixels), to_unit(reconstruction)]).mul(255).round().byte().permute(0, 2, 3, 1).numpy()]
    grid = reconstruction_grid(pixels, reconstruction, scale=4)
    assert isinstance(grid, Image.Image)
    np.testing.assert_array_equal(np.asarray(grid), _torchvision_grid(as_u8, 3, 4))
