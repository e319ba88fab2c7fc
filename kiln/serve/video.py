"""The videos of a chat request: base64 data URLs, and http(s) URLs only when the server allows them.

As for images, a local path is never accepted from a client. Decoding (and its errors: HTTP 400)
happens in `MultimodalPipeline.prepare`.
"""

from __future__ import annotations

from kiln.serve.images import media_sources


async def video_sources(urls: list[str], *, allow_http: bool, max_bytes: int, timeout_s: float = 30.0) -> list[object]:
    """What `MultimodalPipeline.prepare` takes for each `video_url`: the data URL itself, or downloaded bytes."""
    return await media_sources(
        urls,
        "video",
        "data:video/",
        allow_http=allow_http,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        http_note=" (it covers video URLs too)",
    )
