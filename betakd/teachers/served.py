"""A teacher served by vLLM: supervision from a server, the teacher never in training memory.

:class:`ServedTeacher` is a teacher source (:mod:`betakd.teachers.protocol`) whose
targets come from a vLLM server's OpenAI-compatible chat API: for each sample it sends
the conversation, images included (as data URLs), with the answer as the last
(assistant) message and asks for the prompt's top-k log-probabilities
(``prompt_logprobs``) and the token ids the server used (``return_token_ids``). The
answer's top-k becomes the same :class:`~betakd.teachers.targets.TopKLogits` (one tail
rule) as the offline cache's.

Alignment is checked, never assumed: the server's token ids (image tokens expanded by
its own processor) must contain the student's answer tokens, found from the end of the
conversation; a sample whose answer the server tokenised differently (another tokenizer
or chat template) stops the run with one line naming it. The positions then go
through :func:`betakd.align.align_positions`, as an in-process teacher's do, so
different image-token counts need nothing else.

A server returns log-probabilities only, not hidden states: feature channels and an
``h(x)`` read from the teacher are refused when the source is built.

:class:`TeacherServer` is the HTTP side (``httpx``): requests of a batch go out
concurrently (at most ``concurrency`` at once); a timeout, a refused connection or a
5xx/429 answer is retried ``retries`` times with exponential backoff, then the run stops
naming the server, the sample and the last error; any other error answer (e.g. a k
above the server's ``--max-logprobs``) stops at once with the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import math
import mimetypes
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import httpx
import torch
from torch import Tensor

from betakd.align import AlignedPositions, align_positions, instance_representation
from betakd.data.records import Conversation, load_records, parse_record
from betakd.labels import IGNORE_INDEX, supervised
from betakd.onpolicy import prompt_tokens
from betakd.teachers.protocol import BatchMeta, TeacherTargets
from betakd.teachers.targets import LOG_TAIL_FLOOR, TopKLogits

# vLLM writes -inf as this number in its JSON.
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

    Requests run on an event loop in a thread of their own, with one HTTP client (its
    connections kept), so that :meth:`submit` returns at once and the requests proceed
    while the caller computes; :meth:`close` stops the thread.
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
                f"({self.endpoints['tokens']}: {_error_message(response)}), through which a "
                "VLM teacher scores the student's own answers: start it with "
                "--enable-scale-out"
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

    def close(self) -> None:
        """Close the client and stop the requests' thread (a later request starts both
        again)."""
        if self._loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = self._client = self._limit = None

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
                content.append({"type": "image_url", "image_url": {"url": _data_url(next(paths))}})
            else:
                raise ServedTeacherError(
                    f"sample {conversation.id}: it has an image, the student is text-only"
                )
        if all(part["type"] == "text" for part in content):
            content = "".join(part["text"] for part in content)
        messages.append({"role": message["role"], "content": content})
    return messages


def prompt_only(conversation: Conversation) -> Conversation:
    """The conversation up to its first answer, with that part's images: what an
    on-policy row keeps before the student's answer (:func:`betakd.onpolicy.with_answers`)."""
    first = next(
        (i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"),
        len(conversation.messages),
    )
    messages = conversation.messages[:first]
    images = sum(part["type"] != "text" for m in messages for part in m["content"])
    return replace(conversation, messages=messages, image_paths=conversation.image_paths[:images])


def _data_url(path) -> str:
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


# --------------------------------------------------------------------------- alignment


def answer_segments(labels: Tensor, mask: Tensor) -> list[list[int]]:
    """The runs of consecutive answer tokens of one student row, in order."""
    answer = (supervised(labels) & mask.bool()).tolist()
    segments, current = [], []
    for token, is_answer in zip(labels.tolist(), answer):
        if is_answer:
            current.append(token)
        elif current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def locate_answers(server_ids: Sequence[int], segments: Sequence[Sequence[int]]) -> list[int]:
    """Start of each answer segment in the server's tokens: the last segment at its last
    occurrence, each earlier one at its last occurrence before the next (answers come
    last, and a question may repeat an answer's words). Raises ValueError naming the
    first segment not found."""
    starts = []
    limit = len(server_ids)
    for number in range(len(segments) - 1, -1, -1):
        segment = list(segments[number])
        found = next(
            (
                start
                for start in range(limit - len(segment), -1, -1)
                if list(server_ids[start : start + len(segment)]) == segment
            ),
            None,
        )
        if found is None:
            raise ValueError(f"answer {number + 1} of {len(segments)} ({len(segment)} tokens)")
        starts.append(found)
        limit = found
    return starts[::-1]


def server_batch(
    samples: Sequence[ServedSample], student_batch: dict, sample_ids: Sequence[str], tokenizer
) -> dict:
    """The server's tokens as a teacher batch (``input_ids``, ``attention_mask``,
    ``labels`` on the located answers) for :func:`align_positions`."""
    size = len(samples)
    length = max(len(s.token_ids) for s in samples)
    input_ids = torch.zeros(size, length, dtype=torch.long)
    mask = torch.zeros(size, length, dtype=torch.long)
    labels = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = torch.tensor(sample.token_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
        student_labels = student_batch["labels"][row].cpu()
        segments = answer_segments(student_labels, student_batch["attention_mask"][row].cpu())
        try:
            starts = locate_answers(sample.token_ids, segments)
        except ValueError as err:
            answer = tokenizer.decode(segments[-1]) if segments else ""
            raise ServedTeacherError(
                f"sample {sample_ids[row]}: the server's tokens do not contain the student's "
                f"{err} ({answer!r}): the served teacher tokenises the conversation "
                "differently (another tokenizer or chat template)"
            ) from err
        for start, segment in zip(starts, segments):
            labels[row, start : start + len(segment)] = torch.tensor(segment)
    device = student_batch["input_ids"].device
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}  # fmt: skip


def student_answer_batch(
    samples: Sequence[ServedSample],
    student_batch: dict,
    sample_ids: Sequence[str],
    image_token_ids: Collection[int],
) -> dict:
    """The server's tokens as a teacher batch for rows that carry the student's own
    answers (on-policy), sent as tokens (:meth:`ServedTeacher.student_answer_requests`).

    The server returns the tokens it scored, its image tokens expanded by its own
    processor; the answer starts after the prompt's text that follows its last image,
    found at its first occurrence past the server's last image token, and must be the
    student's tokens there (anything else is an error naming the sample).
    """
    size = len(samples)
    length = max(len(s.token_ids) for s in samples)
    input_ids = torch.zeros(size, length, dtype=torch.long)
    mask = torch.zeros(size, length, dtype=torch.long)
    labels = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
    prompts = prompt_tokens(student_batch)
    for row, sample in enumerate(samples):
        server_ids = sample.token_ids
        input_ids[row, : len(server_ids)] = torch.tensor(server_ids, dtype=torch.long)
        mask[row, : len(server_ids)] = 1
        prompt = prompts[row].tolist()
        tail = prompt[_after_last(prompt, image_token_ids) :]
        begin = _after_last(server_ids, image_token_ids)
        start = next(
            (
                i
                for i in range(begin, len(server_ids) - len(tail) + 1)
                if server_ids[i : i + len(tail)] == tail
            ),
            None,
        )
        segments = answer_segments(
            student_batch["labels"][row].cpu(), student_batch["attention_mask"][row].cpu()
        )
        answer = [token for segment in segments for token in segment]
        first = len(server_ids) if start is None else start + len(tail)
        if server_ids[first : first + len(answer)] != answer:
            raise ServedTeacherError(
                f"sample {sample_ids[row]}: the server scored other tokens than the student's "
                "prompt and answer it was sent"
            )
        labels[row, first : first + len(answer)] = torch.tensor(answer, dtype=torch.long)
    device = student_batch["input_ids"].device
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}  # fmt: skip


def collapse_image_runs(tokens: Sequence[int], image_token_ids: Collection[int]) -> list[int]:
    """``tokens`` with each run of one image token cut to a single token: the
    placeholder a server's processor expands into its own number of image tokens."""
    out: list[int] = []
    for token in tokens:
        if not (out and token == out[-1] and token in image_token_ids):
            out.append(token)
    return out


def _after_last(tokens: Sequence[int], wanted: Collection[int]) -> int:
    """The position after the last of ``tokens`` in ``wanted`` (0 when none is)."""
    return next((len(tokens) - i for i, t in enumerate(reversed(tokens)) if t in wanted), 0)


def topk_targets(
    samples: Sequence[ServedSample],
    aligned: AlignedPositions,
    top_k: int,
    vocab_rows: int,
    sample_ids: Sequence[str],
) -> tuple[TopKLogits, Tensor]:
    """The top ``top_k`` log-probabilities at each aligned position and the tail mass
    (``1 - sum``, floored), as the cache stores them; and ``[N]`` the exact
    log-probability of each aligned token (the server returns it beside the top-k)."""
    rows = aligned.batch_index.tolist()
    positions = (aligned.teacher_pos + 1).tolist()  # the entry of the predicted token
    log_probs = torch.empty(len(rows), top_k, dtype=torch.float32)
    ids = torch.empty(len(rows), top_k, dtype=torch.long)
    tail = torch.empty(len(rows), dtype=torch.float32)
    actual = torch.empty(len(rows), dtype=torch.float32)
    tokens = aligned.token_ids.tolist()
    for n, (row, position, token) in enumerate(zip(rows, positions, tokens)):
        entry = samples[row].log_probs[position]
        if entry is None or len(entry) < top_k:
            raise ServedTeacherError(
                f"sample {sample_ids[row]}: the server gave {0 if entry is None else len(entry)}"
                f" log-probabilities at answer token {position}, fewer than top_k={top_k}"
            )
        if token not in entry:
            raise ServedTeacherError(
                f"sample {sample_ids[row]}: the server gave no log-probability of the answer "
                f"token {token} at position {position}"
            )
        actual[n] = entry[token]
        best = sorted(entry.items(), key=lambda item: -item[1])[:top_k]
        ids[n] = torch.tensor([token for token, _ in best])
        values = torch.tensor([value for _, value in best], dtype=torch.float64)
        log_probs[n] = values.float()
        rest = 1.0 - float(values.exp().sum())
        tail[n] = math.log(rest) if rest > math.exp(LOG_TAIL_FLOOR) else LOG_TAIL_FLOOR
    if bool(((ids < 0) | (ids >= vocab_rows)).any()):
        raise ServedTeacherError(
            f"the server names token ids outside the student's vocabulary of {vocab_rows}: "
            "another tokenizer?"
        )
    return TopKLogits(log_probs, ids, tail, vocab_rows), actual


# --------------------------------------------------------------------------- source


class RecordConversations:
    """The conversations at given rows of a LLaVA-format data file (read once)."""

    def __init__(self, train_file, image_folder) -> None:
        self.records = load_records(train_file)
        self.image_folder = image_folder

    def __call__(self, indices: Sequence[int]) -> list[Conversation]:
        return [parse_record(self.records[i], i, self.image_folder) for i in indices]


class ServedTeacher:
    """A teacher source whose targets come from a :class:`TeacherServer`.

    ``conversations(indices)`` gives the samples at these rows of the data file;
    ``images``: send them (the student is a VLM); ``tokenizer`` decodes tokens in error
    messages; ``image_token_ids``: the tokens that stand for images; ``representation``: None or
    ``"teacher_confidence"`` (the weighting's h(x) from the top-k, ``chunk_size`` rows at
    a time).
    """

    def __init__(
        self,
        server: TeacherServer,
        conversations,
        *,
        vocab_rows: int,
        top_k: int,
        images: bool,
        tokenizer,
        image_token_ids: Collection[int] = (),
        representation: str | None = None,
        chunk_size: int | None = None,
        prefetch_batches: int = 2,
    ) -> None:
        if representation not in (None, "teacher_confidence"):
            raise ServedTeacherError(
                f"a served teacher cannot give the representation {representation!r}"
            )
        self.server = server
        self.conversations = conversations
        self.vocab_rows = vocab_rows
        self.top_k = top_k
        self.images = images
        self.tokenizer = tokenizer
        self.image_token_ids = set(image_token_ids)
        self.representation = representation
        self.chunk_size = chunk_size
        self.prefetch_batches = prefetch_batches
        self.pending: OrderedDict[tuple[int, ...], concurrent.futures.Future] = OrderedDict()
        self.device = torch.device("cpu")

    def prepare(self, accelerator) -> ServedTeacher:
        """Outputs go to the process's device; the model lives on the server."""
        self.device = torch.device(accelerator.device)
        return self

    def prefetch(self, conversations: Sequence[Conversation]) -> None:
        """Send the requests scoring these conversations' answers now, for the step that
        will ask for them."""
        key = tuple(c.index for c in conversations)
        if self.prefetch_batches < 1 or key in self.pending:
            return
        while len(self.pending) >= self.prefetch_batches:
            self.pending.popitem(last=False)[1].cancel()
        names = [c.id for c in conversations]
        bodies = [self.request(c) for c in conversations]
        self.pending[key] = self.server.submit("chat", bodies, names)

    def _scoring(self, **body) -> dict:
        return {
            "model": self.server.model,
            **body,
            "max_tokens": 1,
            "prompt_logprobs": self.top_k,
            "return_token_ids": True,
            "temperature": 0.0,
        }

    def request(self, conversation: Conversation) -> dict:
        """The chat request scoring one conversation (its answer the last message)."""
        messages = chat_messages(conversation, images=self.images)
        return self._scoring(messages=messages, add_generation_prompt=False)

    def student_answer_requests(
        self, student_batch: dict, conversations: Sequence[Conversation]
    ) -> tuple[str, list[dict]]:
        """The endpoint and requests scoring each row's own answer (on-policy) as the
        very tokens the student sampled (their text could spell them otherwise): a text
        model's as a completion's prompt; a VLM's through vLLM's token-in API with the
        prompt's images, each image's tokens cut to the one placeholder its processor
        expands."""
        real = student_batch["attention_mask"].bool().cpu()
        ids = student_batch["input_ids"].cpu()
        rows = [ids[r][real[r]].tolist() for r in range(ids.shape[0])]
        if not self.images:
            return "completions", [self._scoring(prompt=row) for row in rows]
        bodies = []
        for row, conversation in zip(rows, conversations):
            images = prompt_only(conversation).image_paths
            bodies.append(
                {
                    "model": self.server.model,
                    "token_ids": collapse_image_runs(row, self.image_token_ids),
                    "content_parts": [{"type": "image_url", "url": _data_url(p)} for p in images],
                    # Token ids are all betakd reads: decoding every prompt position's
                    # top-k into strings took half the server's time (tiny LLaVA, CPU).
                    "sampling_params": {
                        "max_tokens": 1,
                        "prompt_logprobs": self.top_k,
                        "temperature": 0.0,
                        "detokenize": False,
                    },
                    "return_token_ids": True,
                }
            )
        return "tokens", bodies

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        indices = torch.as_tensor(meta.sample_index).tolist()
        names = list(meta.sample_ids)
        sent = None if meta.student_answers else self.pending.pop(tuple(indices), None)
        if sent is not None:
            answers = sent.result()
        else:
            conversations = self.conversations(indices)
            if meta.student_answers:
                endpoint, bodies = self.student_answer_requests(student_batch, conversations)
            else:
                endpoint, bodies = "chat", [self.request(c) for c in conversations]
            answers = self.server.post_all(endpoint, bodies, names)
        samples = [parse_answer(a, n) for a, n in zip(answers, names)]
        if meta.student_answers:
            teacher_batch = student_answer_batch(
                samples, student_batch, names, self.image_token_ids
            )
        else:
            teacher_batch = server_batch(samples, student_batch, names, self.tokenizer)
        try:
            aligned = align_positions(student_batch, teacher_batch, sample_ids=names)
        except ValueError as err:
            raise ServedTeacherError(f"served teacher: {err}") from err
        tokens, actual = topk_targets(samples, aligned, self.top_k, self.vocab_rows, names)
        tokens = TopKLogits(
            tokens.log_probs.to(self.device),
            tokens.ids.to(self.device),
            tokens.tail_log_mass.to(self.device),
            self.vocab_rows,
        )
        representation = None
        if self.representation is not None:
            representation = instance_representation(
                self.representation,
                aligned=aligned,
                teacher_logits=tokens,
                vocab_size=self.vocab_rows,
                chunk_size=self.chunk_size,
            )
        return aligned, TeacherTargets(
            tokens, None, representation, answer_log_probs=actual.to(self.device)
        )
