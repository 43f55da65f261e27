"""InternLM2's slow SentencePiece tokenizer, reproduced without transformers.

Reference: `InternLM2Tokenizer` (`internvl_chat/internvl/model/internlm2/tokenization_internlm2.py` of
OpenGVLab/InternVL @ 74126371) running on transformers 4.44's `PreTrainedTokenizer`, loaded the way
InternVL loads it (`use_fast=False`, `add_eos_token=False`). Encoding and decoding match it id for id
and character for character, quirks included:

* encode: the text is first split on the added tokens (every entry of `added_tokens_decoder` plus
  `added_tokens.json`, longest match first), then each remaining chunk goes through SentencePiece on
  its own, so each chunk gets its own dummy `▁` prefix (after every special token too). BOS comes
  first. `[UNUSED_TOKEN_145]` in raw text is a user-defined SentencePiece piece whose id is the one
  relabeled `<|im_end|>`, so it encodes to `<|im_end|>`.
* decode (`PreTrainedTokenizer._decode` + `InternLM2Tokenizer.convert_tokens_to_string`):
  - the added tokens at ids >= the SentencePiece size (`<img>`, `<IMG_CONTEXT>`, ...) cut the text
    into pieces that are joined with " " (`spaces_between_special_tokens=True`); a piece that decodes
    to "" is dropped, except the last one;
  - inside a piece, a special token (`<s>`, `<|im_end|>`, ...) that follows ordinary text inserts a
    " " in front of that text, so `decode([<s>, ...])` starts with " <s>";
  - each piece gets `clean_up_tokenization` (" ." -> "." and friends) whatever the config says;
  - byte-fallback pieces are joined into UTF-8, an incomplete or invalid sequence gives U+FFFD.
* `skip_special_tokens=True` drops bos/eos/unk/pad and every `additional_special_tokens` id.

`IncrementalDecoder` streams `decode(ids, skip_special_tokens=True)` token by token, exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .prompt import IM_END_TOKEN, IM_START_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from .tokenizer_base import (
    ADDED_TOKENS_FILE,
    SP_MODEL_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    SentencePieceTokenizerBase,
    TokenizerError,
    clean_up_tokenization,
    read_json,
    special_token_list,
    token_content,
)

# Re-exported: the loader, tests and callers import these from here.
__all__ = [
    "ADDED_TOKENS_FILE", "SP_MODEL_FILE", "SPECIAL_TOKENS_MAP_FILE", "TOKENIZER_CONFIG_FILE", "SPIECE_UNDERLINE",
    "CleanupStream", "IncrementalDecoder", "InternLM2Tokenizer", "TokenizerError", "clean_up_tokenization",
    "read_json", "token_content", "utf8_incomplete",
]

SPIECE_UNDERLINE = "▁"


class InternLM2Tokenizer(SentencePieceTokenizerBase):
    """Encode/decode exactly like upstream InternLM2Tokenizer (see the module docstring)."""

    def __init__(
        self,
        sp_model_file: str | Path,
        added_tokens: dict[int, str] | None = None,
        *,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str | None = "</s>",
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
        self._sp_size = self._sp.get_piece_size()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

        # id -> text for the added tokens (including the relabeled SentencePiece pieces).
        self._added_decoder: dict[int, str] = {int(i): t for i, t in (added_tokens or {}).items()}
        specials = special_token_list(bos_token, eos_token, unk_token, pad_token, *additional_special_tokens)
        known = set(self._added_decoder.values())
        for tok in specials:
            # transformers always registers the special tokens as added tokens; they must have an id.
            if tok not in known:
                idx = self._sp.piece_to_id(tok)
                if idx == self._sp.unk_id() and tok != self._sp.id_to_piece(idx):
                    raise TokenizerError(f"special token {tok!r} is neither an added token nor a piece")
                self._added_decoder[idx] = tok
                known.add(tok)
        self._added_encoder: dict[str, int] = {t: i for i, t in sorted(self._added_decoder.items())}
        self._special_tokens: tuple[str, ...] = tuple(specials)
        self._special_set = frozenset(specials)
        self._index_added_tokens(specials, additional_special_tokens)
        self._byte_values: dict[int, int] = {
            i: int(self._sp.id_to_piece(i)[3:5], 16)
            for i in range(self._sp_size)
            if self._sp.is_byte(i) and i not in self._added_decoder
        }
        self._anchor: tuple[int, str] | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> InternLM2Tokenizer:
        """Load `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`."""
        model_dir = Path(model_dir)
        sp_file, config = cls._model_file_and_config(model_dir)
        special_map = read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)

        added: dict[int, str] = {}
        for idx, entry in (config.get("added_tokens_decoder") or {}).items():
            added[int(idx)] = token_content(entry)
        for content, idx in read_json(model_dir / ADDED_TOKENS_FILE).items():
            if added.setdefault(int(idx), content) != content:
                raise TokenizerError(
                    f"{ADDED_TOKENS_FILE} says {content!r} is id {idx}, "
                    f"{TOKENIZER_CONFIG_FILE} says {added[int(idx)]!r}"
                )

        return cls(
            sp_file,
            added,
            **cls._config_kwargs(special_map, config, pad_default="</s>"),
        )

    # ------------------------------------------------------------------ vocabulary

    # `vocab_size` (all ids) and `sp_vocab_size` (upstream's `tokenizer.vocab_size`) come from the base.

    @property
    def bos_id(self) -> int:
        # Upstream's bos_token_id/eos_token_id come from the SentencePiece model, not the config.
        sp_id = self._sp.bos_id()
        return sp_id if sp_id >= 0 else self._added_encoder[self.bos_token]

    @property
    def eos_id(self) -> int:
        sp_id = self._sp.eos_id()
        return sp_id if sp_id >= 0 else self._added_encoder[self.eos_token]

    @property
    def unk_id(self) -> int:
        return self.token_to_id(self.unk_token)

    @property
    def im_start_id(self) -> int:
        return self._required_id(IM_START_TOKEN)

    @property
    def im_end_id(self) -> int:
        return self._required_id(IM_END_TOKEN)

    @property
    def img_start_id(self) -> int:
        return self._required_id(IMG_START_TOKEN)

    @property
    def img_end_id(self) -> int:
        return self._required_id(IMG_END_TOKEN)

    @property
    def all_special_tokens(self) -> tuple[str, ...]:
        return self._special_tokens

    # ------------------------------------------------------------------ encode

    def _split_added(self, text: str) -> list[tuple[str, bool]]:
        """`tokens_trie.split`: [(chunk, is_added_token)], empty chunks dropped."""
        chunks: list[tuple[str, bool]] = []
        pos = 0
        if self._split_re is not None:
            for m in self._split_re.finditer(text):
                if m.start() > pos:
                    chunks.append((text[pos : m.start()], False))
                chunks.append((m.group(), True))
                pos = m.end()
        if pos < len(text):
            chunks.append((text[pos:], False))
        return chunks

    def tokenize(self, text: str) -> list[str]:
        """Upstream `tokenizer.tokenize(text)` (no BOS): added tokens kept whole, the rest as pieces."""
        out: list[str] = []
        for chunk, is_added in self._split_added(text):
            out.extend([chunk] if is_added else self._sp.encode(chunk, out_type=str))
        return out

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """`tokenizer(text).input_ids`: BOS, then added tokens and SentencePiece ids chunk by chunk."""
        ids: list[int] = [self.bos_id] if add_bos and self.add_bos_token else []
        for chunk, is_added in self._split_added(text):
            if is_added:
                ids.append(self._added_encoder[chunk])
            else:
                # Each chunk is encoded on its own: SentencePiece adds its dummy "▁" prefix per chunk.
                ids.extend(self._sp.encode(chunk))
        if self.add_eos_token:
            ids.append(self.eos_id)
        return ids

    # ------------------------------------------------------------------ decode

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """Upstream `InternLM2Tokenizer.convert_tokens_to_string`, with its quirks."""
        out = ""
        run: list[str] = []
        prev_is_special = False
        for token in tokens:
            if token in self._special_set:
                # A special token after ordinary text inserts a space BEFORE that text.
                if not prev_is_special:
                    out += " "
                out += self._sp.decode_pieces(run) + token
                prev_is_special = True
                run = []
            else:
                run.append(token)
                prev_is_special = False
        out += self._sp.decode_pieces(run)
        # Always applied here, whatever `clean_up_tokenization_spaces` says. The upstream
        # `_maybe_add_prefix_space` then adds " " (its id set is compared with token strings, so the
        # test is always true) and `[1:]` removes it again: a no-op for the non-empty lists it gets.
        return clean_up_tokenization(out)

    def decode(
        self,
        ids: Iterable[int],
        skip_special_tokens: bool = False,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """transformers 4.44 `PreTrainedTokenizer._decode` over InternLM2's `convert_tokens_to_string`."""
        sub_texts = self._sub_texts(ids, skip_special_tokens)
        return self._clean_up((" " if spaces_between_special_tokens else "").join(sub_texts))

    # ------------------------------------------------------------------ helpers for IncrementalDecoder

    def text_stream(self, skip_special_tokens: bool = True) -> _InternLM2Stream:
        """The per-token state behind `IncrementalDecoder(self, skip_special_tokens)`."""
        return _InternLM2Stream(self, skip_special_tokens)

    def _is_byte(self, token_id: int) -> bool:
        return token_id in self._byte_values

    def _decode_run(self, ids: list[int], continuation: bool) -> str:
        """SentencePiece text of `ids`; `continuation`: they follow earlier text of the same decode.

        SentencePiece drops the leading "▁" of the first piece only at the start of a decode. A
        continuation keeps it: decode it behind a fixed anchor piece, then cut the anchor's text off.
        """
        if not continuation:
            return self._sp.decode(ids)
        anchor_id, anchor_text = self._get_anchor()
        text = self._sp.decode([anchor_id, *ids])
        if not text.startswith(anchor_text):  # cannot happen with a normal, non-byte anchor piece
            raise AssertionError("anchor piece text changed")
        return text[len(anchor_text) :]

    def _get_anchor(self) -> tuple[int, str]:
        if self._anchor is None:
            for i in range(self._sp_size):
                sp = self._sp
                if (
                    i in self._added_decoder
                    or sp.is_control(i)
                    or sp.is_unknown(i)
                    or sp.is_byte(i)
                    or sp.is_unused(i)
                    or sp.id_to_piece(i).startswith(SPIECE_UNDERLINE)
                ):
                    continue
                text = sp.decode([i])
                if text and sp.decode([i, i]) == text + text:
                    self._anchor = (i, text)
                    break
            else:
                raise TokenizerError("no ordinary SentencePiece piece to anchor incremental decoding")
        return self._anchor


def utf8_incomplete(data: Sequence[int]) -> bool:
    """True if `data` ends inside a UTF-8 sequence that more bytes could still complete.

    Mirrors SentencePiece's byte-fallback decoding (one char at a time, an invalid byte becomes U+FFFD
    and consumes 1 byte). It is deliberately lenient: when in doubt it says "incomplete", which only
    holds text back a little longer.
    """
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if 0xC0 <= b <= 0xDF:
            need = 2
        elif 0xE0 <= b <= 0xEF:
            need = 3
        elif 0xF0 <= b <= 0xF7:
            need = 4
        else:
            i += 1
            continue
        j = i + 1
        while j < min(i + need, n) and 0x80 <= data[j] <= 0xBF:
            j += 1
        if j == n and j < i + need:
            return True  # a valid prefix cut short by the end of the data
        i = j if j == i + need else i + 1
    return False


def _after_nonspace(text: str, count: int) -> int:
    """Index just after the `count`-th character of `text` that is not " " (0 for count 0)."""
    if count <= 0:
        return 0
    lo, hi = count, len(text)
    while lo < hi:  # smallest p with p - text.count(" ", 0, p) >= count
        mid = (lo + hi) // 2
        if mid - text.count(" ", 0, mid) >= count:
            hi = mid
        else:
            lo = mid + 1
    return lo


# `clean_up_tokenization` only deletes spaces, and whether a space goes depends on at most the 5
# characters after it (" n't", and "  ' ve" -> " 've" -> "'ve" through the " ' " rule). Its matches
# all start with a space and span at most 6 raw characters (deleted spaces included). So no match
# straddles a point preceded by 6 non-space characters, nor one preceded by a character that can
# only stand first in a match (" ") or nowhere in one: text before such a point is final.
_CLEANUP_LOOKAHEAD = 5
_CLEANUP_SPAN = 6
_CLEANUP_INNER_CHARS = frozenset(" .?!,'ntmsver")


def _cleanup_cut_ok(text: str, k: int) -> bool:
    """`clean_up_tokenization(text) == clean(text[:k]) + clean(text[k:])`, whatever follows."""
    if k <= 0:
        return False
    if text[k - 1] not in _CLEANUP_INNER_CHARS:
        return True
    return k >= _CLEANUP_SPAN and " " not in text[k - _CLEANUP_SPAN : k]


class CleanupStream:
    """Streams `clean_up_tokenization(text)` while `text` arrives in pieces (`append`).

    `emit()` returns the newly settled part of the cleaned text; `emit(final=True)` the rest.
    """

    def __init__(self):
        self._win = ""  # final raw text from the window start on
        self._done = 0  # non-space characters of _win already emitted

    def append(self, text: str) -> None:
        self._win += text

    def emit(self, final: bool = False) -> str:
        win = self._win
        if final:
            k = len(win)
        else:
            # Cleanup never touches non-space characters; a space is settled once the 5 characters
            # after it are known. Emit up to the first unsettled space, minus the spaces before it
            # (emission always stops after a non-space character).
            first_open = win.find(" ", max(0, len(win) - _CLEANUP_LOOKAHEAD))
            k = len(win) if first_open < 0 else first_open
            while k > 0 and win[k - 1] == " ":
                k -= 1
            if k <= 0:
                return ""
        target = k - win.count(" ", 0, k)
        if not final and target <= self._done:
            return ""
        cleaned = clean_up_tokenization(win)
        start = _after_nonspace(cleaned, self._done)
        end = len(cleaned) if final else _after_nonspace(cleaned, target)
        self._done = target
        if not final and _cleanup_cut_ok(win, k):
            self._win, self._done = win[k:], 0
        return cleaned[start:end]


class _TextRun:
    """Streams `clean_up_tokenization(sp.decode(run))` for a run of ordinary (non-special) ids."""

    def __init__(self, tokenizer: InternLM2Tokenizer):
        self._tok = tokenizer
        self._tail: list[int] = []  # trailing byte-fallback ids that may still be an incomplete char
        self._started = False  # some piece was decoded: later pieces keep their leading "▁"
        self._out = CleanupStream()

    def push(self, token_id: int) -> str:
        self._tail.append(token_id)
        tok = self._tok
        if not tok._is_byte(token_id) or not utf8_incomplete([tok._byte_values[i] for i in self._tail]):
            self._commit()
        return self._out.emit()

    def flush(self) -> str:
        if self._tail:
            self._commit()
        return self._out.emit(final=True)

    def _commit(self) -> None:
        ids, self._tail = self._tail, []
        self._out.append(self._tok._decode_run(ids, continuation=self._started))
        self._started = True


class _InternLM2Stream:
    """`IncrementalDecoder` for `InternLM2Tokenizer` (see there for what is exact)."""

    def __init__(self, tokenizer: InternLM2Tokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._run = _TextRun(tokenizer)

    def push(self, token_id: int) -> str:
        token_id = self._tok._check_id(token_id)
        if token_id in self._tok.special_ids:
            if self._skip_special:
                return ""
            text = self._run.flush() + self._tok.id_to_token(token_id)
            self._run = _TextRun(self._tok)
            return text
        return self._run.push(token_id)

    def flush(self) -> str:
        return self._run.flush()


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns only newly completed text, `flush()` the rest.

    Works for every tokenizer of the family (each provides its stream through `text_stream()`). With
    `skip_special_tokens=True` (what upstream uses for responses) the pushes plus the flush
    concatenate to exactly `tokenizer.decode(ids, skip_special_tokens=True)`. Text is held back while
    it may still change: bytes that are not a complete UTF-8 character yet (so no U+FFFD is emitted
    for half a character) and, where the tokenizer applies `clean_up_tokenization`, the last few
    characters, whose spaces it may still delete (" ." -> "."). Nothing is ever dropped or repeated.

    With `skip_special_tokens=False` the byte-level BPE and Llama SentencePiece streams are exact too.
    InternLM2's is not: a special token's text is emitted as it arrives, and each run of other ids
    streams as `decode(run, skip_special_tokens=True)`, while upstream's full decode inserts spaces
    retroactively (before the text preceding a special token, and between `<img>`-style tokens),
    which no stream can reproduce; use `tokenizer.decode` when that exact string is needed.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = tokenizer.text_stream(skip_special_tokens)
        self._finished = False

    def push(self, token_id: int) -> str:
        if self._finished:
            raise RuntimeError("IncrementalDecoder.push() after flush()")
        return self._stream.push(token_id)

    def flush(self) -> str:
        """Emit everything still held back; the stream is over after this."""
        if self._finished:
            return ""
        self._finished = True
        return self._stream.flush()
