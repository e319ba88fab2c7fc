"""`kiln run`'s video options, and how --image/--video attach to the prompt."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.errors import KilnError


def add_media_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--video",
        action="append",
        default=[],
        help="video file (MP4, WebM...) for the prompt (repeatable; one video token per video; needs kiln[video])",
    )
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="with --video: frames sampled evenly from each video (default: the processor's, else 8)",
    )


def attach_media(
    prompts: list[Any], images: list[str], videos: list[str], num_frames: int | None, batch_size: int | None
) -> list[Any]:
    """With --image/--video: the single prompt, with all of them or (--batch-size B) as B copies sharing them out."""
    if batch_size is not None and batch_size < 1:
        raise KilnError("--batch-size must be at least 1")
    if num_frames is not None and num_frames < 1:
        raise KilnError("--num-frames must be at least 1")
    if not images and not videos:
        if batch_size is not None:
            return prompts * batch_size
        return prompts
    if len(prompts) != 1:
        raise KilnError("--image/--video go with exactly one --prompt (use --batch-size to run it on several)")
    copies = batch_size or 1
    for what, items in (("image", images), ("video", videos)):
        if len(items) % copies:
            raise KilnError(f"{len(items)} {what}(s) cannot be shared evenly by --batch-size {copies}")
    per_image, per_video = len(images) // copies, len(videos) // copies
    out = []
    for i in range(copies):
        request: dict[str, Any] = {"prompt": prompts[0], "images": images[i * per_image : (i + 1) * per_image]}
        if videos:
            request["videos"] = videos[i * per_video : (i + 1) * per_video]
            request["num_frames"] = num_frames
        out.append(request)
    return out
