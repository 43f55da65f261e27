"""What the family's tokenizer classes share: the checkpoint files they read and the logic that is the same.

`TokenizerBase` holds the vocabulary members every class computes the same way from its own tables
(the `Tokenizer` interface of tokenizer_loader.py); `SentencePieceTokenizerBase` adds what the two slow
SentencePiece tokenizers (InternLM2, Llama/Phi-3) share: added tokens in front of the pieces, and
transformers' `PreTrainedTokenizer._decode` split into sub-texts at the "legacy" added tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .prompt import IMG_CONTEXT_TOKEN

SP_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"


class TokenizerError(ValueError):
    """The tokenizer files are missing or inconsistent."""


def clean_up_tokenization(text: str) -> str:
    """transformers' `PreTrainedTokenizerBase.clean_up_tokenization`; it only ever deletes spaces."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def token_content(value) -> str | None:
    """A special token as tokenizer_config / special_tokens_map store it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"cannot read special token {value!r}")


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def special_token(key: str, special_map: dict, config: dict, default: str | None = None) -> str | None:
    """The special token `key` (e.g. "bos_token"): special_tokens_map.json wins over tokenizer_config.json,
    as in transformers."""
    for source in (special_map, config):
        if key in source:
            return token_content(source[key])
    return default


def additional_special_tokens(special_map: dict, config: dict) -> list[str]:
    """`additional_special_tokens`, from special_tokens_map.json if it names them, else the config."""
    source = special_map if "additional_special_tokens" in special_map else config
    return [token_content(t) for t in source.get("additional_special_tokens") or []]


def special_token_list(*tokens: str | None) -> list[str]:
    """The distinct special tokens in order, None left out (upstream `all_special_tokens`)."""
    specials: list[str] = []
    for tok in tokens:
        if tok is not None and tok not in specials:
            specials.append(tok)
    return specials


class TokenizerBase:
    """The vocabulary members computed alike by every tokenizer class of the family.

    A subclass sets `_vocab_size` (all ids), `_added_encoder` (added token -> id), `_special_ids`
    (what `skip_special_tokens=True` drops), `eos_token`, `pad_token`, `clean_up_tokenization_spaces`,
    and defines `token_to_id`, `id_to_token` and `encode`.
    """

    _vocab_size: int
    _added_encoder: dict[str, int]
    _special_ids: frozenset[int]
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    clean_up_tokenization_spaces: bool

    def token_to_id(self, token: str) -> int:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """All ids, added tokens included (`len(tokenizer)` upstream, = the LLM's vocab)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        token = self.pad_token if self.pad_token is not None else self.eos_token
        if token is None:
            raise TokenizerError("the tokenizer has neither a pad token nor an eos token")
        return self.token_to_id(token)

    @property
    def img_context_id(self) -> int:
        """The id of `<IMG_CONTEXT>`, the slot each image-feature vector fills."""
        return self._required_id(IMG_CONTEXT_TOKEN)

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids `skip_special_tokens=True` drops (upstream `all_special_ids`)."""
        return self._special_ids

    @property
    def added_tokens(self) -> dict[str, int]:
        return dict(self._added_encoder)

    def _required_id(self, token: str) -> int:
        if token not in self._added_encoder:
            raise TokenizerError(f"{token!r} is not an added token of this tokenizer")
        return self._added_encoder[token]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        """Token strings of `ids` (added tokens by their text, e.g. `<|im_end|>` not the raw piece)."""
        if isinstance(ids, int):
            return self.id_to_token(ids)
        return [self.id_to_token(i) for i in ids if not (skip_special_tokens and int(i) in self._special_ids)]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def _check_id(self, token_id) -> int:
        idx = int(token_id)
        if not 0 <= idx < self._vocab_size:
            raise IndexError(f"token id {idx} out of range [0, {self._vocab_size})")
        return idx

    def _clean_up(self, text: str) -> str:
        """`clean_up_tokenization` when the config's `clean_up_tokenization_spaces` asks for it."""
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, padding_side: str = "left"
    ) -> tuple[list[list[int]], list[list[int]]]:
        """`tokenizer(texts, padding=True)`: (input_ids, attention_mask), padded with `pad_id` on
        `padding_side` (batch_chat pads on the left)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t, add_bos=add_bos) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids, mask = [], []
        for row in rows:
            pad = [self.pad_id] * (width - len(row))
            ids.append(pad + row if padding_side == "left" else row + pad)
            ones, zeros = [1] * len(row), [0] * len(pad)
            mask.append(zeros + ones if padding_side == "left" else ones + zeros)
        return ids, mask


class SentencePieceTokenizerBase(TokenizerBase):
    """A slow SentencePiece tokenizer with added tokens (ids from `_sp_size` on, or relabeled pieces).

    A subclass sets `_sp` (the processor), `_sp_size`, `_added_decoder` (id -> added token) and
    `_added_encoder`, calls `_index_added_tokens`, and defines `_tokens_to_string` (its
    `convert_tokens_to_string`).
    """

    _sp: object
    _sp_size: int
    _added_decoder: dict[int, str]

    def _index_added_tokens(self, specials: Sequence[str], additional: Sequence[str]) -> None:
        """The special ids, the legacy tokens, the split regex and the vocab size, from the added tokens."""
        self._special_ids = frozenset(self._added_encoder[t] for t in specials)
        # transformers' `legacy_added_tokens` in `_decode`: non-special added tokens, plus the
        # additional special tokens that live past the SentencePiece vocab. They are decoded as
        # standalone pieces joined with " " (that is where " <img> <IMG_CONTEXT> ..." comes from).
        self._legacy_tokens = frozenset(
            (set(self._added_encoder) - set(specials))
            | {t for t in additional if self._added_encoder[t] >= self._sp_size}
        )
        # Longest first, so that at one position the longest added token wins (transformers' Trie).
        alternatives = sorted(self._added_encoder, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(t) for t in alternatives)) if alternatives else None
        self._vocab_size = max(self._sp_size, max(self._added_decoder, default=-1) + 1)
        for idx in range(self._sp_size, self._vocab_size):
            if idx not in self._added_decoder:
                raise TokenizerError(f"id {idx} is past the SentencePiece vocab but is no added token")

    @staticmethod
    def _model_file_and_config(model_dir: Path) -> tuple[Path, dict]:
        """The checkpoint's `tokenizer.model` (it must exist) and its `tokenizer_config.json` (or {})."""
        sp_file = model_dir / SP_MODEL_FILE
        if not sp_file.is_file():
            raise TokenizerError(f"{model_dir} has no {SP_MODEL_FILE}")
        return sp_file, read_json(model_dir / TOKENIZER_CONFIG_FILE)

    @staticmethod
    def _config_kwargs(special_map: dict, config: dict, pad_default: str | None) -> dict:
        """The constructor's keyword arguments read from special_tokens_map.json and tokenizer_config.json
        (upstream's defaults; only the pad token's differs between the classes)."""
        return dict(
            bos_token=special_token("bos_token", special_map, config, "<s>"),
            eos_token=special_token("eos_token", special_map, config, "</s>"),
            unk_token=special_token("unk_token", special_map, config, "<unk>"),
            pad_token=special_token("pad_token", special_map, config, pad_default),
            additional_special_tokens=additional_special_tokens(special_map, config),
            add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def sp_vocab_size(self) -> int:
        """The SentencePiece size only (what upstream calls `tokenizer.vocab_size`)."""
        return self._sp_size

    @property
    def base_vocab_size(self) -> int:
        """The vocabulary before the added tokens (for SentencePiece: `sp_vocab_size`)."""
        return self._sp_size

    def token_to_id(self, token: str) -> int:
        """Upstream `convert_tokens_to_ids`: added tokens, else the piece's id (the unk id if unknown)."""
        if token in self._added_encoder:
            return self._added_encoder[token]
        return self._sp.piece_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token_id = self._check_id(token_id)
        if token_id in self._added_decoder:
            return self._added_decoder[token_id]
        return self._sp.id_to_piece(token_id)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def _sub_texts(self, ids: Iterable[int], skip_special_tokens: bool) -> list[str]:
        """`PreTrainedTokenizer._decode`'s pieces: the legacy tokens alone, the runs between them through
        `_tokens_to_string`; an empty run text is dropped, except the last one."""
        tokens = self.convert_ids_to_tokens(list(ids), skip_special_tokens=skip_special_tokens)
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in self._legacy_tokens:
                if current:
                    text = self._tokens_to_string(current)
                    if text:
                        sub_texts.append(text)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self._tokens_to_string(current))
        return sub_texts
