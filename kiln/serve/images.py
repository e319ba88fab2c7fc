"""The images of a chat request: base64 data URLs, and http(s) URLs only when the server allows them.

A local path is never accepted from a client: it would let any caller read the server's files.
"""

from __future__ import annotations

from kiln.errors import RequestError


async def image_sources(urls: list[str], *, allow_http: bool, max_bytes: int, timeout_s: float = 10.0) -> list[object]:
    """What `MultimodalPipeline.prepare` takes for each `image_url`: the data URL itself, or downloaded bytes."""
    return await media_sources(urls, "image", "data:", allow_http=allow_http, max_bytes=max_bytes, timeout_s=timeout_s)


async def media_sources(
    urls: list[str],
    kind: str,
    data_prefix: str,
    *,
    allow_http: bool,
    max_bytes: int,
    timeout_s: float,
    http_note: str = "",
) -> list[object]:
    """Each `{kind}_url` as the data URL itself (one starting with `data_prefix`) or its downloaded bytes
    (http(s), only when `allow_http`); anything else is a RequestError."""
    sources: list[object] = []
    for i, url in enumerate(urls):
        if url.startswith(data_prefix):
            sources.append(url)
        elif url.startswith(("http://", "https://")):
            if not allow_http:
                raise RequestError(
                    f"{kind} {i}: this server takes {kind}s as base64 data URLs; downloading http(s) {kind}s "
                    f"needs `kiln serve --allow-image-urls`{http_note}"
                )
            sources.append(await download(url, f"{kind} {i}", max_bytes, timeout_s))
        else:
            article = "an" if kind[0] in "aeiou" else "a"
            raise RequestError(
                f"{kind} {i}: {article} {kind}_url must be a data:{kind}/...;base64 URL (or http(s) if allowed)"
            )
    return sources


async def download(url: str, what: str, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes at an http(s) URL, at most `max_bytes`; failures are RequestErrors naming `what`."""
    import httpx

    data = bytearray()
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise RequestError(f"{what}: {url[:80]} answered HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise RequestError(f"{what}: {url[:80]} is larger than {max_bytes} bytes")
    except httpx.HTTPError as exc:
        raise RequestError(f"{what}: {url[:80]} could not be downloaded ({type(exc).__name__})") from exc
    return bytes(data)
