"""The videos of a chat request: base64 data URLs, and http(s) URLs only when the server allows them.

As for images, a local path is never accepted from a client. Decoding (and its errors: HTTP 400)
happens in `MultimodalPipeline.prepare`.
"""

from __future__ import annotations

from kiln.errors import RequestError
from kiln.serve.images import download


async def video_sources(urls: list[str], *, allow_http: bool, max_bytes: int, timeout_s: float = 30.0) -> list[object]:
    """What `MultimodalPipeline.prepare` takes for each `video_url`: the data URL itself, or downloaded bytes."""
    sources: list[object] = []
    for i, url in enumerate(urls):
        if url.startswith("data:video/"):
            sources.append(url)
        elif url.startswith(("http://", "https://")):
            if not allow_http:
                raise RequestError(
                    f"video {i}: this server takes videos as base64 data URLs; downloading http(s) videos "
                    "needs `kiln serve --allow-image-urls` (it covers video URLs too)"
                )
            sources.append(await download(url, f"video {i}", max_bytes, timeout_s))
        else:
            raise RequestError(f"video {i}: a video_url must be a data:video/...;base64 URL (or http(s) if allowed)")
    return sources
