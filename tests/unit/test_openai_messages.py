"""OpenAI chat messages to the turn core's input: the same prompt as the gRPC API, clear 400s otherwise."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core import ChatCore, ChatError, ErrorKind, UserTurn
from gateway.media import MediaError
from gateway.openai_api import ChatCompletionRequest, chat_input

FILES = {"http://img.test/a.png": b"A", "http://img.test/b.png": b"B", "http://img.test/v.mp4": b"V"}


async def load(url: str, kind: str, what: str) -> bytes:
    """URL media for these tests: a table (the real fetcher is tested against a real server)."""
    if url.startswith("data:"):
        return url.encode()
    if url not in FILES:
        raise MediaError(f"{what}: no such file {url}")
    return FILES[url]


def convert(messages, **fields):
    req = ChatCompletionRequest(model="m", messages=messages, **fields)
    return asyncio.run(chat_input(req, load, req.sampling()))


def image(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def error(messages, **fields) -> ChatError:
    with pytest.raises(ChatError) as info:
        convert(messages, **fields)
    return info.value


def test_string_content_is_the_question():
    inp = convert([{"role": "user", "content": "Hello"}])
    assert inp.turn == UserTurn(text="Hello") and inp.history == () and inp.system_message is None


def test_the_model_cards_snippet_gives_the_grpc_prompt():
    inp = convert([{"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                                image("http://img.test/a.png")]}])
    assert inp.turn.images == (b"A",)
    assert ChatCore._question(inp.turn) == "<image>\ndescribe this image"  # what gRPC sends for one image


def test_two_images_are_numbered_in_front_or_placed_by_placeholders():
    parts = [image("http://img.test/a.png"), image("http://img.test/b.png"), {"type": "text", "text": "Compare."}]
    inp = convert([{"role": "user", "content": parts}])
    assert inp.turn.images == (b"A", b"B")
    assert ChatCore._question(inp.turn) == "Image-1: <image>\nImage-2: <image>\nCompare."
    placed = convert([{"role": "user", "content": [{"type": "text", "text": "first <image> then <image>"},
                                                   image("http://img.test/a.png"), image("http://img.test/b.png")]}])
    assert ChatCore._question(placed.turn) == "first <image> then <image>"


def test_text_parts_are_joined_with_newlines_and_tiling_is_taken_per_image():
    inp = convert([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"},
                                                image("http://img.test/a.png", max_dynamic_patch=6)]}])
    assert inp.turn.text == "one\ntwo" and inp.turn.tiling.max_tiles == 6


def test_video_and_combined_layout():
    inp = convert([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://img.test/v.mp4", "num_segments": 4, "max_tiles": 1}},
        {"type": "text", "text": "What happens?"}]}])
    assert inp.turn.video.data == b"V" and inp.turn.video.num_segments == 4
    assert ChatCore._question(inp.turn).startswith("Frame1: <image>\nFrame2: <image>\n")
    combined = convert([{"role": "user", "content": [image("http://img.test/a.png"), image("http://img.test/b.png"),
                                                     {"type": "text", "text": "Both?"}]}], image_layout="combined")
    assert combined.turn.combined and ChatCore._question(combined.turn) == "<image>\nBoth?"


def test_history_keeps_its_images_in_their_turns():
    inp = convert([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image("http://img.test/a.png"), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ])
    assert inp.system_message == "Be brief."
    (past,) = inp.history
    assert past.user.images == (b"A",) and past.assistant == "A cat."
    assert ChatCore._question(past.user) == "<image>\nWhat is it?"
    assert inp.turn == UserTurn(text="What colour?")


def test_sampling_fields():
    s = convert([{"role": "user", "content": "x"}], temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1,
                max_completion_tokens=12, stop="END", seed=3).sampling
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens, s.stop, s.seed) \
        == (True, 0.7, 0.9, 5, 1.1, 12, ("END",), 3)
    greedy = convert([{"role": "user", "content": "x"}], temperature=0, max_tokens=7).sampling
    assert not greedy.do_sample and greedy.max_new_tokens == 7


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "assistant", "content": "hi"}], "messages[0]"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": [{"type": "audio", "audio": {}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [image("http://img.test/a.png", detail="high")]}],
     "messages[0].content[0].image_url.detail"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "user", "content": [image("http://img.test/missing.png")]}], "messages[0].content[0]"),
    ([{"role": "assistant", "content": [image("http://img.test/a.png")]}], "messages[0]"),
])
def test_bad_messages_name_the_field(messages, param):
    err = error(messages)
    assert err.kind == ErrorKind.INVALID_ARGUMENT and err.param == param, err.message


def test_unhonoured_fields_are_named():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], presence_penalty=0.5)
    assert req.unhonoured_field() == "presence_penalty"
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], presence_penalty=0,
                                logprobs=False)
    assert req.unhonoured_field() is None
    with pytest.raises(ValueError, match="tools"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[])


def test_conflicting_token_limits():
    with pytest.raises(ChatError, match="max_tokens and max_completion_tokens differ"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                              max_completion_tokens=4).sampling()
