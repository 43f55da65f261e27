"""Byte-level BPE tokenizers of the family (Qwen2 for InternVL2-1B, Llama-3 for InternVL2-Llama3-76B).

Encoding and decoding run through the `tokenizers` library, built from the checkpoint's own files:

* `tokenizer_class` Qwen2Tokenizer (InternVL2-1B, which upstream loads with `use_fast=False`, so any
  tokenizer.json is ignored): `vocab.json` + `merges.txt`, assembled exactly as transformers'
  `Qwen2Converter` assembles the fast tokenizer from them (NFC, Qwen2's split regex, byte-level
  mapping, BPE, no BOS), with the added tokens of `tokenizer_config.json` (`added_tokens_decoder`)
  and `added_tokens.json`;
* otherwise `tokenizer.json` (Llama-3: `PreTrainedTokenizerFast`, whose post-processor prepends
  `<|begin_of_text|>`).

`decode` is `PreTrainedTokenizerFast._decode`: the library's decode, then `clean_up_tokenization`
when `clean_up_tokenization_spaces` is set (true for the Llama-3 tokenizer). The slow Qwen2 decode
(added tokens decoded as separate pieces joined with "", each piece UTF-8-decoded with
`errors="replace"`) gives the same text: every added token starts with an ASCII character, which ends
any incomplete UTF-8 sequence before it either way.

The stream behind `IncrementalDecoder` keeps the raw bytes of the tokens and emits text only up to
the last complete UTF-8 character, so half a character never comes out as U+FFFD early.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .tokenizer import CleanupStream
from .tokenizer_base import (
    ADDED_TOKENS_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TokenizerBase,
    TokenizerError,
    read_json,
    special_token,
    token_content,
)

TOKENIZER_JSON_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"

# Slow tokenizer classes built from vocab.json + merges.txt (what upstream runs), never from tokenizer.json.
SLOW_QWEN2_CLASSES = frozenset({"Qwen2Tokenizer"})

# transformers' `Qwen2Converter` / `Qwen2Tokenizer` PRETOKENIZE_REGEX.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (what the `ByteLevel` decoder undoes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _incomplete_tail(data: bytes) -> int:
    """Length of the tail of `data` that more bytes could still complete into one UTF-8 character.

    Lenient like `tokenizer.utf8_incomplete` (any lead byte C0..F7 followed by fewer continuation bytes
    than it announces counts): holding back an invalid tail only delays its U+FFFD.
    """
    for k in range(1, min(3, len(data)) + 1):
        b = data[-k]
        if 0x80 <= b <= 0xBF:
            continue  # a continuation byte: look further back for its lead
        need = 2 if 0xC0 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF7 else 0
        return k if need > k else 0
    return 0


def _qwen2_tokenizer(model_dir: Path, config: dict) -> Tokenizer:
    """The fast tokenizer transformers builds from Qwen2's vocab.json + merges.txt (`Qwen2Converter`)."""
    for name in (VOCAB_FILE, MERGES_FILE):
        if not (model_dir / name).is_file():
            raise TokenizerError(f"{model_dir} has no {name} (a Qwen2Tokenizer needs {VOCAB_FILE} and {MERGES_FILE})")
    bpe = models.BPE.from_file(str(model_dir / VOCAB_FILE), str(model_dir / MERGES_FILE),
                               unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    add_prefix_space = bool(config.get("add_prefix_space", False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    entries = {int(i): e for i, e in (config.get("added_tokens_decoder") or {}).items()}
    for content, idx in read_json(model_dir / ADDED_TOKENS_FILE).items():
        entries.setdefault(int(idx), {"content": content, "special": True})
    for idx in sorted(entries):
        entry = entries[idx]
        content = token_content(entry)
        added = AddedToken(content, single_word=bool(entry.get("single_word", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           normalized=bool(entry.get("normalized", False)), special=bool(entry.get("special", True)))
        tok.add_tokens([added])
        if tok.token_to_id(content) != idx:
            raise TokenizerError(
                f"added token {content!r} got id {tok.token_to_id(content)}, the checkpoint says {idx}"
            )
    return tok


class ByteLevelBPETokenizer(TokenizerBase):
    """A byte-level BPE tokenizer (see the module docstring), with the interface of `InternLM2Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str | None, eos_token: str | None,
                 pad_token: str | None, unk_token: str | None, clean_up_tokenization_spaces: bool):
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise TokenizerError(f"not a byte-level BPE tokenizer (its decoder is {tokenizer.decoder!r})")
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self._added_encoder = {t.content: i for i, t in added.items()}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        # Each id's raw bytes, as the ByteLevel decoder produces them (a token with a character outside
        # the byte table, e.g. an added token in another script, stands for its own UTF-8).
        table = _byte_decoder()
        self._bytes: list[bytes] = []
        for idx in range(self._vocab_size):
            token = tokenizer.id_to_token(idx)
            if token is None:
                raise TokenizerError(f"id {idx} has no token (ids must be contiguous)")
            if all(c in table for c in token):
                self._bytes.append(bytes(table[c] for c in token))
            else:
                self._bytes.append(token.encode("utf-8"))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ByteLevelBPETokenizer:
        model_dir = Path(model_dir)
        config = read_json(model_dir / TOKENIZER_CONFIG_FILE)
        if config.get("tokenizer_class") in SLOW_QWEN2_CLASSES:
            tok = _qwen2_tokenizer(model_dir, config)
        elif (model_dir / TOKENIZER_JSON_FILE).is_file():
            tok = Tokenizer.from_file(str(model_dir / TOKENIZER_JSON_FILE))
        else:
            raise TokenizerError(f"{model_dir} has no {TOKENIZER_JSON_FILE}")
        special_map = read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)
        return cls(tok, bos_token=special_token("bos_token", special_map, config),
                   eos_token=special_token("eos_token", special_map, config),
                   pad_token=special_token("pad_token", special_map, config),
                   unk_token=special_token("unk_token", special_map, config),
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    # ------------------------------------------------------------------ vocabulary

    # `vocab_size` (all ids, added tokens included), `bos_id`, `pad_id`, `special_ids`, ... come from the base.

    @property
    def base_vocab_size(self) -> int:
        """The vocabulary before the added tokens (what upstream calls `tokenizer.vocab_size`)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def token_to_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"{token!r} is not a token of this tokenizer")
        return idx

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(self._check_id(token_id))

    # ------------------------------------------------------------------ encode / decode

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """`tokenizer(text).input_ids`; `add_bos` runs the post-processor (Llama-3's BOS; Qwen2 has none)."""
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [self._check_id(i) for i in ids]
        return self._clean_up(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes `token_id` stands for."""
        return self._bytes[self._check_id(token_id)]

    def text_stream(self, skip_special_tokens: bool = True) -> _ByteLevelStream:
        """The per-token state behind `IncrementalDecoder(self, skip_special_tokens)`."""
        return _ByteLevelStream(self, skip_special_tokens)


class _ByteLevelStream:
    """Streams `decode(ids)`: UTF-8 of the tokens' bytes, cut only after complete characters."""

    def __init__(self, tokenizer: ByteLevelBPETokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._pending = b""  # bytes that may still be the start of a character
        self._cleanup = CleanupStream() if tokenizer.clean_up_tokenization_spaces else None

    def push(self, token_id: int) -> str:
        token_id = self._tok._check_id(token_id)
        if self._skip_special and token_id in self._tok.special_ids:
            return ""
        data = self._pending + self._tok.token_bytes(token_id)
        # Hold back a tail that may be an unfinished character; everything before it decodes the same
        # whatever comes next (a replacement character included).
        cut = len(data) - _incomplete_tail(data)
        self._pending = data[cut:]
        return self._out(data[:cut].decode("utf-8", errors="replace"), final=False)

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return self._out(data.decode("utf-8", errors="replace"), final=True)

    def _out(self, text: str, final: bool) -> str:
        if self._cleanup is None:
            return text
        self._cleanup.append(text)
        return self._cleanup.emit(final=final)
