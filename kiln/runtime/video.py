"""Videos a request may carry: decoded with PyAV (the optional extra `kiln[video]`), frames sampled evenly.

A source is a local path, a `data:video/...;base64,` URL or raw bytes. `load_video` decodes only the
frames it keeps: `num_frames` indices spread evenly over the clip, as transformers' video processors
sample them (`arange(0, total, total / num_frames)`), rounded to a multiple of the model's temporal
patch. A corrupt, truncated or unsupported file is a `RequestError` (HTTP 400 in the server).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import RequestError

if TYPE_CHECKING:
    from PIL import Image

VideoSource = Any  # str (path or data URL) | Path | bytes | VideoClip


@dataclass(frozen=True)
class VideoClip:
    """The sampled frames of one video (RGB) and where they came from in the clip."""

    frames: tuple["Image.Image", ...]
    fps: float  # the stream's average frame rate
    total_frames: int
    indices: tuple[int, ...]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (transformers' `VideoMetadata.sampled_fps`)."""
        return len(self.indices) / self.total_frames * self.fps

    def digest(self) -> str:
        """A content hash of the sampled pixels (the prefix-cache key of the video's tokens)."""
        h = hashlib.sha256(f"video:{len(self.frames)}:{self.indices}".encode())
        for frame in self.frames:
            h.update(f"{frame.size}".encode())
            h.update(frame.tobytes())
        return h.hexdigest()[:32]


def frame_count(requested: int, total: int, multiple: int) -> int:
    """How many frames to sample: `requested` rounded to `multiple` (at least one multiple), at most the clip's."""
    if requested < 1:
        raise RequestError(f"num_frames must be at least 1, got {requested}")
    count = max(multiple, round(requested / multiple) * multiple)
    return min(count, total)  # a shorter clip: every frame it has (the processor repeats the last to a whole patch)


def sample_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames (transformers' `sample_frames`)."""
    step = total / count
    return [int(i * step) for i in range(count)]


def _bytes_of(source: VideoSource) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), "the video bytes"
    if isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.startswith("data:video/") or ";base64" not in header:
            raise RequestError("a video data URL must look like data:video/<type>;base64,<data>")
        try:
            return base64.b64decode(payload, validate=True), "the video data URL"
        except (binascii.Error, ValueError) as exc:
            raise RequestError("the video data URL does not hold valid base64") from exc
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise RequestError(f"video {source[:60]!r}: kiln does not download videos here; give a local path or data URL")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RequestError(f"video file {path} does not exist")
        return path.read_bytes(), f"video file {path}"
    raise RequestError(f"a video must be a path, a data URL or bytes, got {type(source).__name__}")


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise RequestError("reading videos needs PyAV: pip install 'kiln[video]' (or pip install av)") from exc
    return av


def _decode(data: bytes, what: str, requested: int, multiple: int) -> VideoClip:
    """Decode once; where the container states its frame count, only the sampled frames become images."""
    av = _import_av()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise RequestError(f"{what} has no video stream")
            stream = container.streams.video[0]
            stated = int(stream.frames or 0)
            wanted = set(sample_indices(stated, frame_count(requested, stated, multiple))) if stated else None
            kept: dict[int, Any] = {}
            total = 0
            for frame in container.decode(stream):
                if wanted is None or total in wanted:
                    kept[total] = frame.to_image()
                total += 1
            rate = stream.average_rate
    except RequestError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise RequestError(f"{what} is a corrupt or unsupported video: {exc}") from exc
    if not total:
        raise RequestError(f"{what} holds no decodable frame")
    indices = sample_indices(total, frame_count(requested, total, multiple))
    if any(i not in kept for i in indices):  # the stated count was wrong: decode again, keeping what is needed
        return _decode_all(data, what, indices)
    fps = float(rate) if rate else 24.0
    return VideoClip(tuple(_rgb(kept[i]) for i in indices), fps, total, tuple(indices))


def _decode_all(data: bytes, what: str, indices: list[int]) -> VideoClip:
    av = _import_av()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            frames = [frame.to_image() for frame in container.decode(stream)]
            rate = stream.average_rate
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise RequestError(f"{what} is a corrupt or unsupported video: {exc}") from exc
    indices = [i for i in indices if i < len(frames)]
    fps = float(rate) if rate else 24.0
    return VideoClip(tuple(_rgb(frames[i]) for i in indices), fps, len(frames), tuple(indices))


def _rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")


def load_video(source: VideoSource, num_frames: int, multiple: int = 1) -> VideoClip:
    """`num_frames` evenly sampled RGB frames of a video (a `VideoClip` passes through unchanged)."""
    if isinstance(source, VideoClip):
        return source
    data, what = _bytes_of(source)
    return _decode(data, what, num_frames, multiple)


def encode_mp4(frames: list[Any], fps: int = 4) -> bytes:
    """H.264 MP4 bytes of RGB frames (uint8 arrays [H, W, 3], even sizes): for tests and examples."""
    av = _import_av()
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()
