"""How `kiln run --image/--video/--num-frames/--batch-size` attach media to the prompt."""

from __future__ import annotations

import pytest

from kiln.cli_media import attach_media
from kiln.errors import KilnError


def test_videos_and_images_are_shared_among_copies():
    out = attach_media(["p"], ["a.png", "b.png"], ["x.mp4", "y.mp4"], 4, 2)
    assert out == [
        {"prompt": "p", "images": ["a.png"], "videos": ["x.mp4"], "num_frames": 4},
        {"prompt": "p", "images": ["b.png"], "videos": ["y.mp4"], "num_frames": 4},
    ]
    assert attach_media(["p"], [], ["x.mp4"], None, None) == [
        {"prompt": "p", "images": [], "videos": ["x.mp4"], "num_frames": None}
    ]
    assert attach_media(["p", "q"], [], [], None, None) == ["p", "q"]


@pytest.mark.parametrize(
    ("prompts", "videos", "frames", "batch", "words"),
    [
        (["p", "q"], ["x.mp4"], None, None, "exactly one --prompt"),
        (["p"], ["x.mp4"], None, 2, "1 video(s) cannot be shared evenly"),
        (["p"], ["x.mp4"], 0, None, "--num-frames must be at least 1"),
    ],
)
def test_bad_media_options_are_clear_errors(prompts, videos, frames, batch, words):
    with pytest.raises(KilnError, match=words.replace("(", r"\(").replace(")", r"\)")):
        attach_media(prompts, [], videos, frames, batch)
