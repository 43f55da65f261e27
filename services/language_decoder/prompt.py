"""The InternVL 2.0 chat prompts, built exactly as upstream `chat()` / `batch_chat()` build them.

Reference: OpenGVLab/InternVL @ 74126371 (`internvl_chat/internvl/conversation.py` and
`InternVLChatModel.chat()` / `batch_chat()` in `modeling_internvl_chat.py`). The rules below are small
on purpose; each one mirrors an upstream behaviour (some of them quirks) and says why.

    <|im_start|>system\\n{SYSTEM}<|im_end|><|im_start|>user\\n{Q1}<|im_end|><|im_start|>assistant\\n{A1}
    <|im_end|><|im_start|>user\\n{Q2}<|im_end|><|im_start|>assistant\\n          (one line, no newlines)

That is `internlm2-chat` (InternVL2-2B/8B/26B/76B) and `Hermes-2` (1B/40B); `phi3-chat` (4B) is the
same with `<|system|>\\n`, `<|user|>\\n`, `<|assistant|>\\n` and `<|end|>`. The checkpoint's
`config.json` names its template (`template`): `get_template` picks it.

Tile counts are passed as `num_patches_list` (tiles per `<image>` placeholder, in order). Upstream's
`chat(pixel_values=pv, num_patches_list=None)` puts all tiles into one block: pass `[pv.shape[0]]`.
`None` (or `[]`) means a text-only request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

# 448 px tile, patch 14, pixel-shuffle ratio 0.5: (448 / 14) ** 2 * 0.5 ** 2.
NUM_IMAGE_TOKEN = 256

SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A `Conversation` of upstream `conversation.py` with `SeparatorStyle.MPT`."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str

    def render(self, messages: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        """`Conversation.get_prompt()` for the MPT style; `messages` are (role, text or None) pairs."""
        system = self.system_message if system_message is None else system_message
        out = self.system_template.format(system_message=system) + self.sep
        for role, message in messages:
            # Upstream tests `if message:`, so an empty string renders like None: the role alone, with
            # no separator. That is how the open assistant turn ends the prompt, and also (a quirk) what
            # happens to an empty answer or an empty question in the history.
            out += (role + message + self.sep) if message else role
        return out


# `sep` is "<|im_end|>" with NO newline: this is the 2.0 template (2.5 added "<|im_end|>\n").
INTERNLM2_CHAT = ChatTemplate(
    name="internlm2-chat",
    system_template=IM_START_TOKEN + "system\n{system_message}",
    system_message=SYSTEM_MESSAGE,
    roles=(IM_START_TOKEN + "user\n", IM_START_TOKEN + "assistant\n"),
    sep=IM_END_TOKEN,
)

# The same text as internlm2-chat (upstream: "completely equivalent during inference"); the two differ
# only in training-time BOS handling, which at inference is the tokenizer's business (Qwen2 adds none).
# Upstream's stop_token_ids / stop_str for it are not used by chat(): it stops on `sep` alone.
HERMES_2 = ChatTemplate(
    name="Hermes-2",
    system_template=INTERNLM2_CHAT.system_template,
    system_message=SYSTEM_MESSAGE,
    roles=INTERNLM2_CHAT.roles,
    sep=IM_END_TOKEN,
)

# Phi-3's chat markers. The template puts "\n" after each role marker but none after `sep`; Phi-3's
# tokenizer swallows whitespace after these tokens anyway (rstrip=True).
PHI3_CHAT = ChatTemplate(
    name="phi3-chat",
    system_template="<|system|>\n{system_message}",
    system_message=SYSTEM_MESSAGE,
    roles=("<|user|>\n", "<|assistant|>\n"),
    sep="<|end|>",
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (INTERNLM2_CHAT, HERMES_2, PHI3_CHAT)}


def get_template(name: str) -> ChatTemplate:
    """The template a checkpoint's `config.json` names in `template`."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}: this server supports {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def render_conversation(
    system: str | None,
    history: Sequence[tuple[str, str]] | None,
    question: str,
    template: ChatTemplate = INTERNLM2_CHAT,
) -> str:
    """The prompt text before image expansion: system turn, earlier turns, the question, open answer.

    `system` None is the template's own system message."""
    user, assistant = template.roles
    messages: list[tuple[str, str | None]] = []
    for old_question, old_answer in history or ():
        messages.append((user, old_question))
        messages.append((assistant, old_answer))
    messages.append((user, question))
    messages.append((assistant, None))
    return template.render(messages, system_message=system)


def image_block(num_patches: int, num_image_token: int = NUM_IMAGE_TOKEN) -> str:
    """What one `<image>` becomes: `<img>` + `<IMG_CONTEXT>` * (tokens per tile * tiles) + `</img>`."""
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"tile count must be a positive int, got {num_patches!r}")
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_patches) + IMG_END_TOKEN


def expand_image_placeholders(
    prompt: str, num_patches_list: Sequence[int], num_image_token: int = NUM_IMAGE_TOKEN
) -> str:
    """Replace each `<image>` of the whole prompt, first occurrence first, by its image block.

    Upstream runs `query.replace('<image>', block, 1)` once per entry of `num_patches_list` over the
    WHOLE rendered prompt, so placeholders in earlier turns of the history are filled first (that is
    how a second round re-sends the first round's images). Upstream does not check the counts: extra
    placeholders stay as literal text and missing ones only fail later, when the image features do not
    fit the `<IMG_CONTEXT>` slots. Here any mismatch is an error.
    """
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(num_patches_list):
        raise ValueError(
            f"prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_patches_list)} "
            f"image(s) were given (num_patches_list={list(num_patches_list)})"
        )
    out = [parts[0]]
    for num_patches, rest in zip(num_patches_list, parts[1:], strict=True):
        out.append(image_block(num_patches, num_image_token))
        out.append(rest)
    return "".join(out)


def video_question(question: str, num_frames: int) -> str:
    """The model card's video prompt: `Frame1: <image>\\nFrame2: <image>\\n...` then the question.

    Each frame is one tile (`load_video(max_num=1)`), so pass `num_patches_list=[1] * num_frames`.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames)) + question


def build_chat_prompt(
    question: str,
    history: Sequence[tuple[str, str]] | None = None,
    num_patches_list: Sequence[int] | None = None,
    num_image_token: int = NUM_IMAGE_TOKEN,
    system_message: str | None = None,
    template: ChatTemplate = INTERNLM2_CHAT,
) -> tuple[str, str]:
    """`chat()`'s prompt. Returns (full prompt with image blocks, the question as stored in history).

    `history` holds earlier (question, answer) text pairs, as `chat()` returns them: answers are the
    decoded response text (re-tokenized next round), questions include any `<image>\\n` added here.
    `system_message` None means the template's (upstream: the config's `system_message`, else the
    template's).
    """
    has_images = bool(num_patches_list)
    # Upstream: `if history is None and pixel_values is not None and '<image>' not in question`.
    # Only `None` counts as "first round": an empty list does NOT trigger the prepend (then the
    # placeholder count no longer matches and expansion fails, as upstream's generate() would).
    if history is None and has_images and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    prompt = render_conversation(system_message, history, question, template)
    # Without pixel values upstream's loop over num_patches_list is empty: a literal "<image>" in a
    # text-only prompt (or in its history) stays text.
    if has_images:
        prompt = expand_image_placeholders(prompt, num_patches_list, num_image_token)
    return prompt, question


def build_batch_prompts(
    questions: Sequence[str],
    num_patches_list: Sequence[int] | None,
    num_image_token: int = NUM_IMAGE_TOKEN,
    system_message: str | None = None,
    template: ChatTemplate = INTERNLM2_CHAT,
) -> list[str]:
    """`batch_chat()`'s prompts: one single-turn prompt per question, one image block per question.

    `num_patches_list[i]` is the tile count of sample i. Unlike `chat()`, batch_chat prepends
    `<image>\\n` whenever pixel values are given and the question lacks `<image>` (it has no history).
    Upstream fills only the first `<image>` of a question; a question with several is an error here.
    `None` builds text-only prompts (upstream requires pixel values).
    """
    if num_patches_list is not None and len(num_patches_list) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(num_patches_list)} tile counts")
    prompts = []
    for i, question in enumerate(questions):
        if num_patches_list is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        prompt = render_conversation(system_message, None, question, template)
        if num_patches_list is not None:
            prompt = expand_image_placeholders(prompt, [num_patches_list[i]], num_image_token)
        prompts.append(prompt)
    return prompts


def extract_response(decoded: str, template: ChatTemplate = INTERNLM2_CHAT) -> str:
    """Upstream's answer text: `decode(ids, skip_special_tokens=True).split(sep)[0].strip()`."""
    return decoded.split(template.sep)[0].strip()
