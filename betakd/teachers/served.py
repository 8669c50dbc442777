"""A teacher served by vLLM: supervision from a server, the teacher never in training memory.

:class:`ServedTeacher` is a teacher source (:mod:`betakd.teachers.protocol`) whose
targets come from a vLLM server (:mod:`betakd.teachers.vllm_client`): for each sample
of the data it sends the conversation to the chat API, images included, with the answer
as the last (assistant) message, and asks for the prompt's top-k log-probabilities
(``prompt_logprobs``) and the token ids the server used (``return_token_ids``); the
student's own answers (on-policy), and every row with ``token_api``, go as the
student's very token ids instead. The requests of a batch go out when the data loader
collates it, a step ahead (:meth:`ServedTeacher.prefetch`). The answer's top-k becomes
the same :class:`~betakd.teachers.targets.TopKLogits` (one tail rule) as the offline
cache's.

Alignment is checked, never assumed: the server's token ids (image tokens expanded by
its own processor) must contain the student's answer tokens, found from the end of the
conversation (:func:`server_batch`), or, for token requests, be the student's tokens
run for run (:func:`carry_labels`); anything else (another tokenizer or chat template)
stops the run with one line naming the sample. The positions then go through
:func:`betakd.align.align_positions`, as an in-process teacher's do, so different
image-token counts need nothing else.

A server returns log-probabilities only, not hidden states: feature channels and an
``h(x)`` read from the teacher are refused when the source is built.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import OrderedDict
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from betakd.align import AlignedPositions, align_positions, instance_representation
from betakd.data import KDCollator
from betakd.data.records import Conversation
from betakd.labels import IGNORE_INDEX, supervised
from betakd.teachers.protocol import BatchMeta, TeacherTargets
from betakd.teachers.targets import LOG_TAIL_FLOOR, TopKLogits
from betakd.teachers.vllm_client import (
    ServedSample,
    ServedTeacherError,
    TeacherServer,
    chat_messages,
    data_url,
    parse_answer,
)

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
    rows = []
    for row, sample in enumerate(samples):
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
        labels = [IGNORE_INDEX] * len(sample.token_ids)
        for start, segment in zip(starts, segments):
            labels[start : start + len(segment)] = segment
        rows.append(labels)
    return teacher_batch_of(samples, rows, student_batch["input_ids"].device)


def token_request_batch(
    samples: Sequence[ServedSample],
    student_batch: dict,
    sample_ids: Sequence[str],
    image_token_ids: Collection[int],
) -> dict:
    """The server's tokens as a teacher batch for rows sent as the student's own token ids
    (:meth:`ServedTeacher.token_requests`), labels on the student's answer tokens.

    The server returns the tokens it scored: the student's, each image's run of image
    tokens expanded by the server's own processor to its own length. Walking both rows
    side by side, run for run, carries each label over; any other difference is an error
    naming the sample.
    """
    real = student_batch["attention_mask"].bool().cpu()
    rows = []
    for row, sample in enumerate(samples):
        mine = student_batch["input_ids"][row].cpu()[real[row]].tolist()
        my_labels = student_batch["labels"][row].cpu()[real[row]].tolist()
        try:
            rows.append(carry_labels(mine, my_labels, sample.token_ids, image_token_ids))
        except ValueError as err:
            raise ServedTeacherError(
                f"sample {sample_ids[row]}: the server scored other tokens than the student's "
                f"it was sent ({err})"
            ) from err
    return teacher_batch_of(samples, rows, student_batch["input_ids"].device)


def teacher_batch_of(
    samples: Sequence[ServedSample], labels: Sequence[Sequence[int]], device
) -> dict:
    """Each row's server tokens, right padded, with its ``labels`` (one per token): a
    teacher batch for :func:`align_positions`, on ``device``."""
    length = max(len(s.token_ids) for s in samples)
    shape = (len(samples), length)
    input_ids = torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    padded = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, (sample, row_labels) in enumerate(zip(samples, labels, strict=True)):
        n = len(sample.token_ids)
        input_ids[row, :n] = torch.tensor(sample.token_ids, dtype=torch.long)
        mask[row, :n] = 1
        padded[row, :n] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "labels": padded.to(device)}  # fmt: skip


def carry_labels(
    tokens: Sequence[int],
    labels: Sequence[int],
    server_ids: Sequence[int],
    image_token_ids: Collection[int],
) -> list[int]:
    """``labels`` of ``tokens`` moved onto ``server_ids``: the same tokens, except that
    each run of one image token may have another length there. Raises ValueError at the
    first other difference."""
    out = [IGNORE_INDEX] * len(server_ids)
    i = j = 0
    while i < len(tokens):
        token = tokens[i]
        if j >= len(server_ids) or server_ids[j] != token:
            raise ValueError(f"token {i} of {len(tokens)} differs")
        if token in image_token_ids:
            while i < len(tokens) and tokens[i] == token:
                i += 1
            while j < len(server_ids) and server_ids[j] == token:
                j += 1
            continue
        out[j] = labels[i]
        i += 1
        j += 1
    if j != len(server_ids):
        raise ValueError(f"the server has {len(server_ids) - j} tokens more")
    return out


def collapse_image_runs(tokens: Sequence[int], image_token_ids: Collection[int]) -> list[int]:
    """``tokens`` with each run of one image token cut to a single token: the
    placeholder a server's processor expands into its own number of image tokens."""
    out: list[int] = []
    for token in tokens:
        if not (out and token == out[-1] and token in image_token_ids):
            out.append(token)
    return out


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


class ServedTeacher:
    """A teacher source whose targets come from a :class:`TeacherServer`.

    The samples' text and images come with each batch (``BatchMeta.conversations``);
    ``images``: send them (the student is a VLM); ``tokenizer`` decodes tokens in error
    messages; ``image_token_ids``: the tokens that stand for images; ``representation``:
    None or ``"teacher_confidence"`` (the weighting's h(x) from the top-k,
    ``chunk_size`` rows at a time).

    Requests: the data's answers go as chat conversations (the server's chat template
    writes them; its tokens must hold the student's answer tokens), the student's own
    answers (on-policy) as the very tokens sampled (:meth:`token_requests`);
    ``token_api``: every request goes as the student's tokens through vLLM's token-in
    API, undecoded (about half the server's time per request; the chat template is then
    checked on the sample scored before training only).

    :meth:`prefetch` sends a batch's requests before the step asks for them (the data
    loader collates a batch ahead); at most ``prefetch_batches`` batches wait, the oldest
    dropped (cancelled) for a newer one. A step whose batch was not prefetched sends its
    requests itself.
    """

    def __init__(
        self,
        server: TeacherServer,
        *,
        vocab_rows: int,
        top_k: int,
        images: bool,
        tokenizer,
        image_token_ids: Collection[int] = (),
        representation: str | None = None,
        chunk_size: int | None = None,
        prefetch_batches: int = 2,
        token_api: bool = False,
    ) -> None:
        if representation not in (None, "teacher_confidence"):
            raise ServedTeacherError(
                f"a served teacher cannot give the representation {representation!r}"
            )
        self.server = server
        self.vocab_rows = vocab_rows
        self.top_k = top_k
        self.images = images
        self.tokenizer = tokenizer
        self.image_token_ids = set(image_token_ids)
        self.representation = representation
        self.chunk_size = chunk_size
        self.prefetch_batches = prefetch_batches
        self.token_api = token_api
        self.pending: OrderedDict[tuple[int, ...], concurrent.futures.Future] = OrderedDict()
        self.device = torch.device("cpu")

    def prepare(self, accelerator) -> ServedTeacher:
        """Outputs go to the process's device; the model lives on the server."""
        self.device = torch.device(accelerator.device)
        return self

    def prefetch(self, conversations: Sequence[Conversation], batch: dict) -> None:
        """Send the requests scoring these conversations' answers (collated as
        ``batch``) now, for the step that will ask for them."""
        key = tuple(c.index for c in conversations)
        if self.prefetch_batches < 1 or key in self.pending:
            return
        while len(self.pending) >= self.prefetch_batches:
            self.pending.popitem(last=False)[1].cancel()
        endpoint = self.endpoint(student_answers=False)
        bodies = self.requests(endpoint, batch, conversations)
        self.pending[key] = self.server.submit(endpoint, bodies, [c.id for c in conversations])

    def endpoint(self, student_answers: bool) -> str:
        """Where a batch's requests go: ``chat`` for the data's answers, unless every
        request goes as tokens (``token_api``); the student's own answers as tokens, to
        the token-in API (a VLM, or ``token_api``) or as a completion (a text model)."""
        if not (student_answers or self.token_api):
            return "chat"
        return "tokens" if self.images or self.token_api else "completions"

    def requests(
        self, endpoint: str, student_batch: dict, conversations: Sequence[Conversation]
    ) -> list[dict]:
        """The requests to ``endpoint`` scoring the batch's rows."""
        if endpoint == "chat":
            return [self.chat_request(c) for c in conversations]
        return self.token_requests(student_batch, conversations, endpoint)

    def _scoring(self, **body) -> dict:
        return {
            "model": self.server.model,
            **body,
            "max_tokens": 1,
            "prompt_logprobs": self.top_k,
            "return_token_ids": True,
            "temperature": 0.0,
        }

    def chat_request(self, conversation: Conversation) -> dict:
        """The chat request scoring one conversation (its answer the last message)."""
        messages = chat_messages(conversation, images=self.images)
        return self._scoring(messages=messages, add_generation_prompt=False)

    def token_requests(
        self, student_batch: dict, conversations: Sequence[Conversation], endpoint: str
    ) -> list[dict]:
        """Requests scoring each row as the very tokens the student has (sampled answers
        could be spelt otherwise by their text): to the token-in API (``tokens``), with
        the row's images, each image's tokens cut to the one placeholder the server's
        processor expands; or as a completion's prompt (``completions``, text only)."""
        real = student_batch["attention_mask"].bool().cpu()
        ids = student_batch["input_ids"].cpu()
        rows = [ids[r][real[r]].tolist() for r in range(ids.shape[0])]
        if endpoint == "completions":
            return [self._scoring(prompt=row) for row in rows]
        bodies = []
        for row, conversation in zip(rows, conversations):
            tokens = collapse_image_runs(row, self.image_token_ids)
            images = conversation.image_paths[: sum(t in self.image_token_ids for t in tokens)]
            bodies.append(
                {
                    "model": self.server.model,
                    "token_ids": tokens,
                    "content_parts": [{"type": "image_url", "url": data_url(p)} for p in images],
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
        return bodies

    def check_template(self, conversations: Sequence[Conversation], encoder) -> None:
        """Score ``conversations`` (encoded for the student by ``encoder``) through the
        chat API, whatever ``token_api`` says: the server's chat template writes them, and
        a server of another tokenizer or template stops here, naming the sample (before
        training or caching)."""
        batch = KDCollator(encoder)(conversations)
        names = [c.id for c in conversations]
        bodies = self.requests("chat", batch, conversations)
        self.aligned("chat", self.server.post_all("chat", bodies, names), batch, names)

    def aligned(
        self, endpoint: str, answers: Sequence[dict], student_batch: dict, names: Sequence[str]
    ) -> tuple[list[ServedSample], AlignedPositions]:
        """The server's answers to requests sent to ``endpoint``, parsed, and the student's
        answer positions aligned with them; a mismatch is an error naming the sample."""
        samples = [parse_answer(a, n) for a, n in zip(answers, names)]
        if endpoint == "chat":
            teacher_batch = server_batch(samples, student_batch, names, self.tokenizer)
        else:
            teacher_batch = token_request_batch(samples, student_batch, names, self.image_token_ids)
        try:
            return samples, align_positions(student_batch, teacher_batch, sample_ids=names)
        except ValueError as err:
            raise ServedTeacherError(f"served teacher: {err}") from err

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        indices = torch.as_tensor(meta.sample_index).tolist()
        names = list(meta.sample_ids)
        sent = None if meta.student_answers else self.pending.pop(tuple(indices), None)
        endpoint = self.endpoint(meta.student_answers)
        if sent is not None:
            answers = sent.result()
        else:
            if meta.conversations is None:
                raise ValueError(
                    "the served teacher reads the samples' conversations from the batch: "
                    "collate with betakd's KDCollator"
                )
            bodies = self.requests(endpoint, student_batch, meta.conversations)
            answers = self.server.post_all(endpoint, bodies, names)
        samples, aligned = self.aligned(endpoint, answers, student_batch, names)
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
