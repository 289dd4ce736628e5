"""The app's byte and pixel limits, applied to every way an image arrives, before it is decoded.

An image reaches a handler as a file uploaded through ``/gradio_api/upload`` (Gradio refuses
one over ``MAX_UPLOAD_BYTES``), or inside a JSON request as a ``data:`` URL, a link or a
server path. :class:`RequestLimits`, an ASGI middleware on the app, refuses a JSON request
over the size that one image at the byte limit needs, a ``data:`` URL over the byte limit,
a link (the server downloads nothing) and a path that is not an upload, before Gradio reads
the request. :func:`data_url_to_file` turns a ``data:`` URL into a file without decoding the
image; ``service.as_rgb_array`` checks the file's size and the pixel count in its header
before it decodes anything. Only the standard library is imported here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # Gradio's "5mb": the upload limit
MAX_PIXELS = 50_000_000  # decoding more takes seconds and gigabytes; the UI keeps at most 1024 px a side anyway
MAX_MEDIA_TYPE = 100  # characters allowed before the comma of a data: URL ("data:image/png;base64,")
MAX_DATA_URL = len("data:,") + MAX_MEDIA_TYPE + 4 * -(-MAX_UPLOAD_BYTES // 3)  # base64 of an image at the limit
MAX_JSON_BODY = MAX_DATA_URL + 256 * 1024  # one image (no endpoint takes two) and the other arguments
UPLOAD_ROUTES = ("/upload", "/upload/")  # multipart; Gradio applies MAX_UPLOAD_BYTES to each file
NAMED_ROUTE = re.compile(r"/gradio_api/(?:call|run|api)/([^/]+)/?$")  # {"data": [...]} for the endpoint named

TOO_BIG = f"That image is over the {MAX_UPLOAD_BYTES // 2**20} MB limit."
TOO_BIG_REQUEST = f"That request is too big: an image may be at most {MAX_UPLOAD_BYTES // 2**20} MB."
NO_LINKS = ("The server does not download images from links: upload the file (POST /gradio_api/upload) "
            "or send it as a data: URL.")
NOT_UPLOADED = ("That file was not uploaded to this server: upload it first (POST /gradio_api/upload) "
                "or send it as a data: URL.")
BAD_DATA_URL = "That data: URL does not hold a base64-encoded image."

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ImageLimitError(ValueError):
    """An image over a limit, or not sent as an image: the message is for the user."""


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL, refused over ``MAX_UPLOAD_BYTES`` before decoding."""
    head, sep, payload = url.partition(",")
    if not sep or len(head) > MAX_MEDIA_TYPE + len("data:") or not head.endswith(";base64"):
        raise ImageLimitError(BAD_DATA_URL)
    if len(payload) > 4 * -(-MAX_UPLOAD_BYTES // 3) + 4:
        raise ImageLimitError(TOO_BIG)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLimitError(BAD_DATA_URL) from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise ImageLimitError(f"That image is {megabytes(len(raw))}; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.")
    return raw


def data_url_to_file(url: str, folder: str | Path) -> str:
    """Write the bytes of a ``data:`` URL to ``folder`` (named by their hash) and return the path.

    The image is not decoded here: the handler decodes the file after checking its header.
    """
    raw = data_url_bytes(url)
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    path = Path(folder) / "data-url" / digest / "image"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".image.{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)  # a concurrent request for the same URL never reads a partial file
    return str(path)


def upload_folder() -> Path:
    """Where Gradio keeps uploaded files (``$GRADIO_TEMP_DIR`` or the system temp folder's ``gradio``)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def file_problem(obj: Any, uploads: Path) -> str | None:
    """The first file object in a JSON value that must not reach Gradio, as a message; ``None`` if none."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            url, path = item.get("url"), item.get("path")
            if isinstance(url, str) and url.startswith("data:") and len(url) > MAX_DATA_URL:
                return TOO_BIG
            if isinstance(path, str):
                if path.startswith(("http://", "https://")):
                    return NO_LINKS
                if not (url or "").startswith("data:") and not _inside(path, uploads):
                    return NOT_UPLOADED
            stack.extend(item.values())
    return None


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False


def call_problem(name: str, body: Any, endpoints: dict[str, list[str]]) -> tuple[int, str] | None:
    """An unknown endpoint or too few arguments for a named one, as (status, sentence); ``None`` if neither.

    ``endpoints`` maps each API name to its handler's parameter names. Gradio answers both
    without a sentence (an HTTP 500, an error event without a message).
    """
    if name not in endpoints:
        return 404, f"There is no endpoint /{name}; the endpoints are {', '.join('/' + n for n in endpoints)}."
    data = body.get("data") if isinstance(body, dict) else None
    params = endpoints[name]
    if isinstance(data, list) and len(data) < len(params):
        return 422, f"/{name} takes {len(params)} arguments ({', '.join(params)}); got {len(data)}."
    return None


class RequestLimits:
    """ASGI middleware: refuses oversized JSON requests and file objects Gradio must not touch.

    Applies to every POST except the upload route. A body over ``max_body`` is refused from its
    ``Content-Length``, or as soon as a chunked body passes it, without reading the rest; a
    body within it is read, checked (:func:`file_problem`, and :func:`call_problem` for the
    named-endpoint routes when ``endpoints`` is given) and handed on unchanged. Refusals are
    ``{"detail": sentence}`` with status 413 (too big), 404 (no such endpoint), 422 (too few
    arguments) or 400.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_JSON_BODY,
                 endpoints: dict[str, list[str]] | None = None) -> None:
        self.app, self.max_body, self.endpoints = app, max_body, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].endswith(UPLOAD_ROUTES):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await _refuse(send, 413, TOO_BIG_REQUEST)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await _refuse(send, 413, TOO_BIG_REQUEST)
                return
            if not message.get("more_body", False):
                break
        named = NAMED_ROUTE.search(scope["path"]) if self.endpoints is not None else None
        if named or b'"path"' in body or b'"url"' in body:
            refusal = None
            with contextlib.suppress(ValueError, RecursionError):  # not JSON: Gradio answers it
                parsed = json.loads(body)
                if named:
                    refusal = call_problem(named.group(1), parsed, self.endpoints or {})
                if refusal is None and (problem := file_problem(parsed, upload_folder())) is not None:
                    refusal = (413 if problem == TOO_BIG else 400, problem)
            if refusal is not None:
                await _refuse(send, *refusal)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
