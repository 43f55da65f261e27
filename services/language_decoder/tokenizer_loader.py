"""One tokenizer interface for the InternVL2 family, chosen from the checkpoint's `tokenizer_config.json`.

| member | `tokenizer_class` | implementation |
|---|---|---|
| 2B, 8B, 26B | InternLM2Tokenizer | `tokenizer.InternLM2Tokenizer` (slow SentencePiece, upstream quirks) |
| 1B | Qwen2Tokenizer | `bpe_tokenizer.ByteLevelBPETokenizer` (`tokenizers`, vocab.json + merges.txt) |
| Llama3-76B | PreTrainedTokenizerFast | `bpe_tokenizer.ByteLevelBPETokenizer` (`tokenizers`, tokenizer.json) |
| 4B | LlamaTokenizer (legacy=false) | `llama_tokenizer.LlamaSPTokenizer` (slow SentencePiece) |

The stop token is the template's separator, as upstream `chat()` sets it
(`eos_token_id = tokenizer.convert_tokens_to_ids(template.sep)`): `stop_token_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .bpe_tokenizer import ByteLevelBPETokenizer
from .llama_tokenizer import LlamaSPTokenizer
from .prompt import ChatTemplate
from .tokenizer import TOKENIZER_CONFIG_FILE, InternLM2Tokenizer, TokenizerError, read_json


class TextStream(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """What the decoder needs from a tokenizer; `IncrementalDecoder(tokenizer)` streams its decode."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def special_ids(self) -> frozenset[int]: ...
    @property
    def img_context_id(self) -> int: ...
    def token_to_id(self, token: str) -> int: ...
    def id_to_token(self, token_id: int) -> str: ...
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, padding_side: str = "left"
    ) -> tuple[list[list[int]], list[list[int]]]: ...
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...
    def text_stream(self, skip_special_tokens: bool = True) -> TextStream: ...


# `tokenizer_class` of tokenizer_config.json -> loader. The fast variants name the same files.
TOKENIZER_CLASSES: dict[str, Callable[[Path], Tokenizer]] = {
    "InternLM2Tokenizer": InternLM2Tokenizer.from_dir,
    "InternLM2TokenizerFast": InternLM2Tokenizer.from_dir,
    "Qwen2Tokenizer": ByteLevelBPETokenizer.from_dir,
    "Qwen2TokenizerFast": ByteLevelBPETokenizer.from_dir,
    "PreTrainedTokenizerFast": ByteLevelBPETokenizer.from_dir,
    "LlamaTokenizer": LlamaSPTokenizer.from_dir,
}


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer, from its own files."""
    model_dir = Path(model_dir)
    config_file = model_dir / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        raise TokenizerError(f"{model_dir} has no {TOKENIZER_CONFIG_FILE}")
    name = read_json(config_file).get("tokenizer_class")
    if name not in TOKENIZER_CLASSES:
        raise TokenizerError(
            f"{config_file}: tokenizer_class {name!r} is not supported (supported: {', '.join(TOKENIZER_CLASSES)})"
        )
    return TOKENIZER_CLASSES[name](model_dir)


def stop_token_id(tokenizer: Tokenizer, template: ChatTemplate) -> int:
    """The id `chat()` stops on: the template's separator (`convert_tokens_to_ids(template.sep)`)."""
    idx = tokenizer.token_to_id(template.sep)
    if tokenizer.id_to_token(idx) != template.sep:
        raise TokenizerError(
            f"template {template.name!r} stops on {template.sep!r}, which is no token of this tokenizer"
        )
    return idx
