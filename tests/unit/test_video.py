"""Video decoding and frame sampling (kiln.runtime.video) on tiny clips encoded here."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import RequestError
from kiln.runtime.video import frame_count, load_video, sample_indices

pytest.importorskip("av")


@pytest.mark.parametrize(("total", "count"), [(8, 4), (12, 6), (10, 4), (7, 7), (100, 8), (5, 2)])
def test_frames_are_sampled_as_transformers_samples_them(total, count):
    assert sample_indices(total, count) == torch.arange(0, total, total / count).int().tolist()


def test_frame_count_rounds_to_the_temporal_patch_and_the_clip():
    assert [frame_count(n, 8, 2) for n in (1, 4, 5, 7)] == [2, 4, 4, 8]
    assert frame_count(8, 3, 2) == 3 and frame_count(7, 100, 1) == 7
    with pytest.raises(RequestError, match="at least 1"):
        frame_count(0, 8, 2)


def test_a_clip_decodes_to_its_sampled_frames():
    from video_clips import tiny_video

    data = tiny_video(0, 56, 84, frames=8)
    clip = load_video(data, 4, 2)
    assert clip.indices == (0, 2, 4, 6) and clip.total_frames == 8 and clip.fps == 4.0 and clip.sampled_fps == 2.0
    assert [f.size for f in clip.frames] == [(84, 56)] * 4 and clip.frames[0].mode == "RGB"
    assert clip.digest() == load_video(data, 4, 2).digest() != load_video(data, 2, 2).digest()
    for bad, words in ((data[: len(data) // 3], "corrupt or unsupported"), (b"\x00" * 64, "corrupt or unsupported")):
        with pytest.raises(RequestError, match=words):
            load_video(bad, 4, 2)
    with pytest.raises(RequestError, match="data:video"):
        load_video("data:image/png;base64,AAAA", 4)
    with pytest.raises(RequestError, match="does not download"):
        load_video("https://example.com/a.mp4", 4)
