"""kiln's torchvision-free Phi-4-multimodal image processor: shapes and token counts against the formulas of
transformers' `Phi4MultimodalImageProcessor`, and (where torchvision is installed) its output tensor for tensor."""

from __future__ import annotations

import math

import pytest
import torch
from vlm_checkpoints import random_image

from kiln.errors import RequestError
from kiln.models.vlm.phi4mm_images import Phi4mmImageProcessor, crop_layout

# (height, width): one crop, a tall and a wide grid, an exact crop, 3x2, over 36 crops (the aspect-ratio search)
SIZES = ((40, 60), (500, 300), (30, 1000), (448, 448), (1000, 700), (2700, 3200))


def transformers_token_count(mask: torch.Tensor, side: int) -> int:
    """`_get_num_image_tokens` of transformers' processor (written out: its module imports torchvision)."""
    h, w = mask.shape
    crops = mask.reshape(h // side, side, w // side, side).transpose(1, 2).reshape(-1, side, side)
    half = side // 2 + side % 2
    down = crops[:, 0::2, 0::2].reshape(h // side, w // side, half, half).transpose(1, 2)
    down = down.reshape(down.size(0) * down.size(1), down.size(2) * down.size(3))
    return 256 + 1 + int(down.sum()) + int(down[:, 0].sum()) + 16


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_crops_masks_and_token_counts(height, width):
    proc = Phi4mmImageProcessor()
    out = proc([random_image(height + width, height, width)])
    (cols, rows), (new_w, new_h), (pad_w, pad_h) = crop_layout(height, width, 448, 36)
    if math.ceil(height / 448) * math.ceil(width / 448) <= 36:
        assert (cols, rows) == (math.ceil(width / 448), math.ceil(height / 448))
    assert cols * rows <= 36 and (new_w + pad_w, new_h + pad_h) == (448 * cols, 448 * rows)
    assert pad_w == 0 or pad_h == 0  # the image fills one side of the grid
    pixels, mask = out["image_pixel_values"][0], out["image_attention_mask"][0]
    assert pixels.shape == (1 + rows * cols, 3, 448, 448) and mask.shape == (1 + rows * cols, 32, 32)
    assert out["image_sizes"].tolist() == [[448 * rows, 448 * cols]]
    # the grid's mask, reassembled: zero exactly over the whole padded patches on the right / bottom
    grid = mask[1:].reshape(rows, cols, 32, 32).transpose(1, 2).reshape(rows * 32, cols * 32)
    assert int(grid[0].sum()) == cols * 32 - pad_w // 14 and int(grid[:, 0].sum()) == rows * 32 - pad_h // 14
    assert bool(mask[0].all())  # the global view has no padding
    assert out["num_img_tokens"] == [transformers_token_count(grid, 32)]
    # the padding is white: 1.0 after normalisation
    canvas = pixels[1:].reshape(rows, cols, 3, 448, 448).permute(2, 0, 3, 1, 4).reshape(3, rows * 448, cols * 448)
    assert bool((canvas[:, new_h:, :] == 1.0).all()) and bool((canvas[:, :, new_w:] == 1.0).all())
    assert float(canvas.min()) >= -1.0 and float(canvas.max()) <= 1.0


def test_batch_pads_crops_and_refuses_extreme_aspect():
    out = Phi4mmImageProcessor(dynamic_hd=4)([random_image(0, 40, 60), random_image(1, 900, 1300)])
    assert out["image_pixel_values"].shape == (2, 5, 3, 448, 448)  # 1 + 1 crops, padded to 1 + 4 with zeros
    assert bool((out["image_pixel_values"][0, 2:] == 0).all()) and bool(out["image_attention_mask"][0, 2:].all())
    with pytest.raises(RequestError, match="aspect ratio"):
        Phi4mmImageProcessor(dynamic_hd=4)([random_image(2, 8, 3000)])


@pytest.mark.parametrize("dynamic_hd", [36, 4])
def test_matches_transformers_processor(dynamic_hd):
    pytest.importorskip("torchvision")  # the GPU machine: transformers' own processor runs there
    import transformers

    cls = getattr(transformers, "Phi4MultimodalImageProcessorFast", None) or transformers.Phi4MultimodalImageProcessor
    images = [random_image(i, h, w) for i, (h, w) in enumerate(SIZES)]
    theirs = cls(dynamic_hd=dynamic_hd)(images, return_tensors="pt")
    ours = Phi4mmImageProcessor(dynamic_hd=dynamic_hd)(images)
    pixel_key = "image_pixel_values" if "image_pixel_values" in theirs else "input_image_embeds"
    assert ours["num_img_tokens"] == list(theirs["num_img_tokens"])
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])
    assert torch.equal(ours["image_attention_mask"], theirs["image_attention_mask"].float())
    assert ours["image_pixel_values"].shape == theirs[pixel_key].shape
    assert float((ours["image_pixel_values"] - theirs[pixel_key]).abs().max()) <= 1e-5


def test_processor_matches_transformers(tmp_path):
    # the whole processor on a tiny checkpoint's files: the expanded prompt and the image tensors
    pytest.importorskip("torchvision")
    from phi4mm_checkpoints import IMAGE_TOKEN, make_phi4mm_checkpoint
    from transformers import AutoProcessor

    from kiln.models.vlm.phi4mm_processor import Phi4mmProcessor, processed

    checkpoint = make_phi4mm_checkpoint(tmp_path / "ckpt", variant="last-layer-2-crops")
    prompt, images = f"a {IMAGE_TOKEN} b {IMAGE_TOKEN}", [random_image(0, 40, 60), random_image(1, 30, 1000)]
    theirs = processed(AutoProcessor.from_pretrained(checkpoint), prompt, images)
    ours = processed(Phi4mmProcessor.from_pretrained(checkpoint), prompt, images)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])
    assert float((ours["image_pixel_values"] - theirs["image_pixel_values"]).abs().max()) <= 1e-5
