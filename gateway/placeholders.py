"""Where a turn's images go in its text: `<image>` placeholders, filled in order by the decoder.

The rules follow upstream usage: a question without placeholders gets them in front —
`<image>\\n` for one image block (upstream `chat()`), `Image-1: <image>\\nImage-2: <image>\\n...` for
separate images (upstream's multi-image example), `Frame1: <image>\\n...` for video frames (upstream's
video example). Unlike upstream, a count that does not match is an error instead of a silently
broken prompt.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"


class PlaceholderError(ValueError):
    pass


def place_images(text: str, *, num_items: int, combined: bool = False, video: bool = False) -> str:
    """The question as it is sent and stored in history, with one placeholder per image block.

    `num_items` is the number of images or sampled video frames; `combined` puts all images' tiles
    behind a single placeholder.
    """
    count = text.count(IMAGE_PLACEHOLDER)
    if num_items == 0:
        if count:
            raise PlaceholderError(
                f"the text has {count} {IMAGE_PLACEHOLDER} placeholder(s) but the request has no image"
            )
        return text
    blocks = 1 if combined and not video else num_items
    if count == 0:
        if video:
            return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(blocks)) + text
        if blocks == 1:
            return f"{IMAGE_PLACEHOLDER}\n{text}"
        return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(blocks)) + text
    if count != blocks:
        what = "video frames" if video else ("image block (combined layout)" if combined else "images")
        raise PlaceholderError(
            f"the text has {count} {IMAGE_PLACEHOLDER} placeholder(s) for {blocks} {what}; "
            f"use exactly {blocks}, or none to have them put in front"
        )
    return text


def text_only_problem(text: str, what: str) -> str | None:
    """Why `text` (a system message, an assistant answer) cannot be taken: a placeholder there would
    take an image block meant for a user turn and break every later image turn of the conversation."""
    if IMAGE_PLACEHOLDER in text:
        return (f"{what} contains {IMAGE_PLACEHOLDER}: image placeholders belong only in user messages "
                f"(remove it or write it differently, e.g. '<img>')")
    return None
