"""OpenAI chat-completions requests to the core's `ChatInput`, and the core's results to OpenAI JSON.

Messages: an optional leading `system` message, then `user` and `assistant` turns alternating, ending
with a `user` turn. Content is a string or a list of parts: `text` (parts joined with newlines, as
vLLM joins them), `image_url` (a `data:` URI, or an http(s) URL when the server allows fetching;
per-image tiling as LMDeploy takes it, `max_dynamic_patch`, or `max_tiles`) and `video_url` (as vLLM
names it; `num_segments` optional). `<image>` placeholders in the text place the images; without any
they go in front exactly as the gRPC API puts them, so the prompt is the same. Earlier user turns keep
their images, rendered as upstream renders history; their features come from the shared cache.

Sampling: `temperature` 0 or absent is greedy (upstream `chat()`'s default), > 0 samples; `top_p`,
`top_k`, `repetition_penalty`, `seed`, `stop`, `max_tokens` / `max_completion_tokens` as usual; `n`
choices run side by side (with a `seed`, choice i uses seed + i, so choices differ yet repeat). A field
the server does not honour is refused with its name, never silently ignored.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.core import (
    ChatError,
    ChatInput,
    ErrorKind,
    PastTurn,
    Sampling,
    TilingRequest,
    TurnEnd,
    Usage,
    UserTurn,
    VideoInput,
)
from gateway.grounding import GroundingBox
from gateway.media import MediaError
from gateway.placeholders import text_only_problem

# Fields OpenAI defines that this server accepts only at their neutral value.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "user": (None,),
}

# fetch(url, kind) -> bytes, kind "image" or "video"; raises MediaError.
MediaLoader = Callable[[str, str, str], Awaitable[bytes]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions; unknown fields are refused (400 naming them)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    # Extensions (vLLM / LMDeploy names).
    top_k: int | None = None
    repetition_penalty: float | None = None
    image_layout: Literal["separate", "combined"] = "separate"
    # Accepted at their neutral values only (see NEUTRAL_VALUES).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None

    def unhonoured_field(self) -> str | None:
        for name, neutral in NEUTRAL_VALUES.items():
            if getattr(self, name) not in neutral:
                return name
        if self.stream_options is not None and not self.stream:
            return "stream_options"
        return None

    def sampling(self) -> Sampling:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise _bad("max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None and limit < 1:
            raise _bad(f"max_tokens must be >= 1, got {limit}", "max_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_new_tokens=limit or 0,
            do_sample=bool(self.temperature),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
        )


def _bad(message: str, param: str | None = None) -> ChatError:
    return ChatError(ErrorKind.INVALID_ARGUMENT, message, param=param)


async def chat_input(req: ChatCompletionRequest, load: MediaLoader, sampling: Sampling) -> ChatInput:
    """The core's input for these messages; URL media through `load`."""
    messages = list(req.messages)
    system = None
    start = 0  # index of the first turn in req.messages
    if messages and messages[0].get("role") in ("system", "developer"):
        system = _text_only(messages.pop(0), "messages[0]")
        start = 1
    turns: list[UserTurn] = []
    answers: list[str] = []
    for offset, message in enumerate(messages):
        where = f"messages[{offset + start}]"
        role = message.get("role")
        expected = "user" if offset % 2 == 0 else "assistant"
        if role != expected:
            raise _bad(f"{where}: expected a {expected!r} message (after an optional leading system message, "
                       f"user and assistant turns alternate), got role {role!r}", where)
        if role == "user":
            turns.append(await _user_turn(message, where, load, combined=req.image_layout == "combined"))
        else:
            answers.append(_text_only(message, where))
    if len(turns) == len(answers):
        raise _bad("the last message must be a user message", f"messages[{len(req.messages) - 1}]")
    history = tuple(PastTurn(user, answer) for user, answer in zip(turns[:-1], answers, strict=True))
    return ChatInput(turn=turns[-1], sampling=sampling, system_message=system, history=history)


def _check_keys(message: dict, allowed: set[str], where: str) -> None:
    for key in message:
        if key not in allowed:
            raise _bad(f"{where}.{key} is not supported", f"{where}.{key}")


def _text_only(message: dict, where: str) -> str:
    _check_keys(message, {"role", "content", "name"}, where)
    if "name" in message:
        raise _bad(f"{where}.name is not supported", f"{where}.name")
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{j}]: {message.get('role')} messages take text parts only",
                           f"{where}.content[{j}]")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise _bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
    problem = text_only_problem(text, f"{where} ({message.get('role')})")
    if problem:  # refused here, before any media of later messages is fetched
        raise _bad(problem, f"{where}.content")
    return text


async def _user_turn(message: dict, where: str, load: MediaLoader, *, combined: bool) -> UserTurn:
    _check_keys(message, {"role", "content"}, where)
    content = message.get("content")
    if isinstance(content, str):
        return UserTurn(text=content)
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
    texts: list[str] = []
    images: list[bytes] = []
    video: VideoInput | None = None
    tilings: set[int] = set()
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            _check_keys(part, {"type", "text"}, at)
            texts.append(part["text"])
        elif kind == "image_url":
            _check_keys(part, {"type", "image_url"}, at)
            url, max_tiles = _media_ref(part.get("image_url"), f"{at}.image_url", {"detail"})
            images.append(await _load(load, url, "image", at))
            tilings.add(max_tiles)
        elif kind == "video_url":
            _check_keys(part, {"type", "video_url"}, at)
            if video is not None:
                raise _bad(f"{at}: one video per message", at)
            ref = part.get("video_url")
            url, max_tiles = _media_ref(ref, f"{at}.video_url", {"num_segments"})
            segments = ref.get("num_segments", 0)
            if not isinstance(segments, int) or isinstance(segments, bool):
                raise _bad(f"{at}.video_url.num_segments must be an integer", f"{at}.video_url.num_segments")
            video = VideoInput(await _load(load, url, "video", at), num_segments=segments)
            tilings.add(max_tiles)
        else:
            raise _bad(f"{at}: a part is {{'type': 'text' | 'image_url' | 'video_url', ...}}", at)
    if len(tilings) > 1:
        raise _bad(f"{where}: all media of one message must use the same max_dynamic_patch", where)
    if video is not None and images:
        raise _bad(f"{where}: send images or a video, not both", where)
    return UserTurn(text="\n".join(texts), images=tuple(images), video=video, combined=combined,
                    tiling=TilingRequest(max_tiles=tilings.pop() if tilings else 0))


def _media_ref(ref: Any, at: str, extra_keys: set[str]) -> tuple[str, int]:
    if not isinstance(ref, dict) or not isinstance(ref.get("url"), str):
        raise _bad(f"{at} must be {{'url': ...}}", at)
    _check_keys(ref, {"url", "max_dynamic_patch", "max_tiles", *extra_keys}, at)
    if ref.get("detail", "auto") != "auto":
        raise _bad(f"{at}.detail: only 'auto' is supported; set max_dynamic_patch for the tiling", f"{at}.detail")
    tiles = [ref[k] for k in ("max_dynamic_patch", "max_tiles") if k in ref]
    if len(tiles) > 1 and tiles[0] != tiles[1]:
        raise _bad(f"{at}: max_dynamic_patch and max_tiles differ", at)
    max_tiles = tiles[0] if tiles else 0
    if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 0:
        raise _bad(f"{at}.max_dynamic_patch must be a positive integer", f"{at}.max_dynamic_patch")
    return ref["url"], max_tiles


async def _load(load: MediaLoader, url: str, kind: str, at: str) -> bytes:
    try:
        return await load(url, kind, at)
    except MediaError as exc:
        raise ChatError(ErrorKind.TOO_LARGE if exc.too_large else ErrorKind.INVALID_ARGUMENT, str(exc),
                        param=at) from exc


# ---------------------------------------------------------------------------------------------- output


def boxes_json(boxes: tuple[GroundingBox, ...]) -> list[dict]:
    return [{"label": b.label, "image_index": b.image_index, "box": [b.x1, b.y1, b.x2, b.y2],
             "normalized": b.normalized} for b in boxes]


def usage_json(usages: list[Usage]) -> dict:
    """Usage of all choices: the prompt once (every choice has the same), completions summed."""
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    cached = min((u.cached_prompt_tokens for u in usages), default=0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_json(completion_id: str, model: str, created: int, results: list[tuple[str, TurnEnd]]) -> dict:
    choices = [{
        "index": i,
        "message": {"role": "assistant", "content": text, "boxes": boxes_json(end.boxes)},
        "finish_reason": end.finish_reason,
        "logprobs": None,
    } for i, (text, end) in enumerate(results)]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_json([end.usage for _, end in results])}


def chunk_json(completion_id: str, model: str, created: int, choices: list[dict], usage: dict | None = None,
               *, with_usage_field: bool = False) -> dict:
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if with_usage_field:
        chunk["usage"] = usage
    return chunk


def now() -> int:
    return int(time.time())
