"""Talking to a vLLM server: requests, retries, and the answers' format.

:class:`TeacherServer` is the HTTP side (``httpx``): requests run on an event loop in a
thread of their own, with one client; at most ``concurrency`` are in flight; a timeout,
a refused connection or a 5xx/429 answer is retried ``retries`` times with exponential
backoff, then it fails naming the server, the sample and the last error; any other
error answer (e.g. a k above the server's ``--max-logprobs``) fails at once with the
server's message. :func:`chat_messages` writes a conversation as OpenAI chat messages
(images as data URLs) and :func:`parse_answer` reads the token ids and prompt
log-probabilities of an answer. The teacher source built on it:
:mod:`betakd.teachers.served`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import math
import mimetypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from betakd.data.records import Conversation

VLLM_NEG_INF = -9999.0
# Seconds before the first retry; doubled each time, at most RETRY_MAX_DELAY.
RETRY_DELAY = 0.5
RETRY_MAX_DELAY = 8.0
RETRIED_STATUS = {429, 500, 502, 503, 504}


class ServedTeacherError(RuntimeError):
    """The teacher server cannot give (correct) targets; the message names what."""


# --------------------------------------------------------------------------- HTTP


class TeacherServer:
    """One model on a vLLM server at ``url`` (its ``/v1`` base).

    Endpoints by name: ``chat`` (a conversation, templated by the server), ``completions``
    (a text model's token ids as they are) and ``tokens`` (vLLM's token-in API, token ids
    with images: served with ``--enable-scale-out``).

    Requests run on an event loop in a thread of their own (a daemon, started with the
    first request), with one HTTP client (its connections kept), so that :meth:`submit`
    returns at once and the requests proceed while the caller computes.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout_s: float = 60.0,
        retries: int = 4,
        concurrency: int = 8,
    ) -> None:
        self.url = url.rstrip("/")
        self.endpoints = {
            "chat": f"{self.url}/chat/completions",
            "completions": f"{self.url}/completions",
            "tokens": f"{self.url.removesuffix('/v1')}/inference/v1/generate",
        }
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._limit: asyncio.Semaphore | None = None

    def check(self) -> None:
        """The server answers and serves ``model``; raises with one line otherwise."""
        try:
            response = httpx.get(f"{self.url}/models", timeout=self.timeout_s)
        except httpx.HTTPError as err:
            raise ServedTeacherError(
                f"teacher server {self.url} is unreachable ({type(err).__name__}: {err}); "
                "start it (docs/served-teacher.md) or fix teacher.server.url"
            ) from err
        if response.status_code != 200:
            raise ServedTeacherError(
                f"teacher server {self.url}/models answered {response.status_code}: "
                f"{response.text[:300]}"
            )
        served = [m.get("id") for m in response.json().get("data", [])]
        if self.model not in served:
            raise ServedTeacherError(
                f"teacher server {self.url} serves {served}, not teacher.server.model "
                f"{self.model!r}"
            )

    def check_token_api(self) -> None:
        """The server takes token ids with images (``tokens``); raises with one line
        otherwise. An empty request is answered 422 (invalid) where the API is served,
        403 where it is disabled (vLLM says so) and 404 where it does not exist."""
        try:
            response = httpx.post(self.endpoints["tokens"], json={}, timeout=self.timeout_s)
        except httpx.HTTPError as err:
            raise ServedTeacherError(f"teacher server {self.url}: {err}") from err
        if response.status_code in (403, 404):
            raise ServedTeacherError(
                f"teacher server {self.url} does not serve vLLM's token-in API "
                f"({self.endpoints['tokens']}: {_error_message(response)}), through which "
                "betakd sends token ids (teacher.server.token_api, or a VLM teacher scoring "
                "the student's own answers): start it with --enable-scale-out"
            )

    def post_all(self, endpoint: str, bodies: Sequence[dict], names: Sequence[str]) -> list[dict]:
        """POST every body to ``endpoint`` (a name in ``endpoints``), concurrently; the
        JSON answers in order. ``names`` name the samples in errors."""
        return self.submit(endpoint, bodies, names).result()

    def submit(
        self, endpoint: str, bodies: Sequence[dict], names: Sequence[str]
    ) -> concurrent.futures.Future:
        """:meth:`post_all` started in the background: its future (at most
        ``concurrency`` requests in flight over every submitted batch)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="betakd-teacher-server",
                             daemon=True).start()  # fmt: skip
        return asyncio.run_coroutine_threadsafe(
            self._post_all(self.endpoints[endpoint], bodies, names), self._loop
        )

    async def _post_all(self, url: str, bodies: Sequence[dict], names: Sequence[str]) -> list[dict]:
        if self._client is None:  # made on the loop that uses them
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
            self._limit = asyncio.Semaphore(self.concurrency)

        async def one(body: dict, name: str) -> dict:
            async with self._limit:
                return await self._post(self._client, url, body, name)

        return await asyncio.gather(*(one(b, n) for b, n in zip(bodies, names)))

    async def _post(self, client: httpx.AsyncClient, url: str, body: dict, name: str) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(RETRY_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY))
            try:
                response = await client.post(url, json=body)
            except httpx.TransportError as err:  # timeouts, refused or dropped connections
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in RETRIED_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:
                message = _error_message(response)
                if "logprobs" in message:
                    message += " (teacher.server.top_k must be at most its --max-logprobs)"
                raise ServedTeacherError(
                    f"teacher server {self.url} refused sample {name}: HTTP "
                    f"{response.status_code}: {message}"
                )
            return response.json()
        raise ServedTeacherError(
            f"teacher server {self.url} failed for sample {name} after {self.retries + 1} "
            f"attempts; last error: {last}"
        )


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300]
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


# --------------------------------------------------------------------------- requests


def chat_messages(conversation: Conversation, *, images: bool) -> list[dict]:
    """The conversation as OpenAI chat messages; images as base64 data URLs, in order."""
    paths = iter(conversation.image_paths)
    messages = []
    for message in conversation.messages:
        content = []
        for part in message["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            elif images:
                content.append({"type": "image_url", "image_url": {"url": data_url(next(paths))}})
            else:
                raise ServedTeacherError(
                    f"sample {conversation.id}: it has an image, the student is text-only"
                )
        if all(part["type"] == "text" for part in content):
            content = "".join(part["text"] for part in content)
        messages.append({"role": message["role"], "content": content})
    return messages


def data_url(path) -> str:
    kind = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


@dataclass
class ServedSample:
    """What the server returned for one sample: the token ids it used and, per token,
    the log-probabilities it gave (``None`` for the first), by token id."""

    token_ids: list[int]
    log_probs: list[dict[int, float] | None]


def parse_answer(payload: dict, name: str) -> ServedSample:
    """Token ids and prompt log-probabilities from a chat answer (at its top level) or a
    completion (in its choice); a malformed or truncated answer is an error naming the
    sample."""
    if "prompt_logprobs" not in payload and isinstance(payload.get("choices"), list):
        payload = payload["choices"][0] if payload["choices"] else {}
    ids = payload.get("prompt_token_ids")
    entries = payload.get("prompt_logprobs")
    if not isinstance(ids, list) or not isinstance(entries, list) or len(ids) != len(entries):
        raise ServedTeacherError(
            f"sample {name}: the server's answer lacks prompt_token_ids/prompt_logprobs of "
            "equal length (a vLLM server with return_token_ids and prompt_logprobs?)"
        )
    parsed: list[dict[int, float] | None] = []
    for entry in entries:
        if entry is None:
            parsed.append(None)
            continue
        try:
            parsed.append({int(k): _log_prob(v["logprob"]) for k, v in entry.items()})
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ServedTeacherError(f"sample {name}: malformed prompt_logprobs entry") from err
    return ServedSample([int(i) for i in ids], parsed)


def _log_prob(value) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN log-probability")
    return -math.inf if value <= VLLM_NEG_INF else value
