"""Llama's slow SentencePiece tokenizer (Phi-3 for InternVL2-4B), reproduced without transformers.

Reference: transformers 4.37.2 `LlamaTokenizer` with `legacy=False` (what Phi-3-mini's
tokenizer_config.json asks for and what the 4B kit's goldens ran under), loaded from the checkpoint's
`tokenizer.model` + `tokenizer_config.json`. SentencePiece itself does the piece work, as upstream;
the rules around it are upstream's, quirks included:

* the SentencePiece model is loaded with `add_dummy_prefix` switched off (`get_spm_processor`);
* encode: "▁" + text (any "▁" in the text read as " "), split on the added tokens (longest match
  first); an added token with `rstrip`/`lstrip` eats the whitespace after/before it (Phi-3's
  `<|user|>`, `<|end|>`, ... swallow the "\\n" the template puts after them). Each other chunk goes
  through SentencePiece on its own, without a dummy prefix; a chunk starting with a space keeps it
  (upstream encodes `<unk>` + chunk and drops the `<unk>` pieces). A leading "▁" alone before a
  special token is dropped. BOS (and EOS) per `add_bos_token` / `add_eos_token`.
* decode (`PreTrainedTokenizer._decode` + `LlamaTokenizer.convert_tokens_to_string`): the added
  tokens that are not special (`<|user|>`, `<|end|>`, `</s>`, ...) and the special ones past the
  SentencePiece vocab (`<img>`, ...) cut the text into pieces joined with " "
  (`spaces_between_special_tokens=True`); a piece that decodes to "" is dropped, except the last one;
  each piece loses the "▁" of its first token; `skip_special_tokens=True` drops bos/eos/unk/pad and
  the `additional_special_tokens` only (so `<|end|>` stays and the answer is cut at it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .tokenizer import SPIECE_UNDERLINE, CleanupStream, utf8_incomplete
from .tokenizer_base import (
    ADDED_TOKENS_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    SentencePieceTokenizerBase,
    TokenizerError,
    read_json,
    special_token_list,
    token_content,
)


def _load_sp_without_dummy_prefix(sp_model_file: Path) -> spm.SentencePieceProcessor:
    """transformers' `get_spm_processor` for `legacy=False`: the same model, `add_dummy_prefix=False`."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model_file.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


class LlamaSPTokenizer(SentencePieceTokenizerBase):
    """Encode/decode exactly like upstream's slow `LlamaTokenizer(legacy=False)` (module docstring)."""

    def __init__(
        self,
        sp_model_file: str | Path,
        added_tokens: dict[int, dict],
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._sp = _load_sp_without_dummy_prefix(Path(sp_model_file))
        self._sp_size = self._sp.get_piece_size()
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

        # id -> (content, lstrip, rstrip) of every added token (transformers' `_added_tokens_decoder`).
        self._added: dict[int, tuple[str, bool, bool]] = {
            int(i): (token_content(e), bool(e.get("lstrip", False)), bool(e.get("rstrip", False)))
            for i, e in added_tokens.items()
        }
        self._added_decoder = {i: content for i, (content, _, _) in self._added.items()}
        self._added_encoder = {content: i for i, content in sorted(self._added_decoder.items())}
        specials = special_token_list(bos_token, eos_token, unk_token, pad_token, *additional_special_tokens)
        for tok in specials:
            if tok not in self._added_encoder:
                raise TokenizerError(f"special token {tok!r} is not an added token of this tokenizer")
        self._special_tokens = frozenset(specials)  # upstream `all_special_tokens`
        self._index_added_tokens(specials, additional_special_tokens)
        if unk_token is None:
            raise TokenizerError("a LlamaTokenizer needs an unk_token (legacy=False encoding is built on it)")
        # `_sp_tokenize` encodes unk_token + chunk and drops this many pieces (upstream `unk_token_length`).
        self._unk_length = len(self._sp.encode(unk_token))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> LlamaSPTokenizer:
        model_dir = Path(model_dir)
        sp_file, config = cls._model_file_and_config(model_dir)
        if config.get("legacy", True):
            raise TokenizerError(
                f"{model_dir / TOKENIZER_CONFIG_FILE}: only LlamaTokenizer with legacy=false is supported "
                "(Phi-3's setting); this one uses the legacy SentencePiece handling"
            )
        special_map = read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)
        added = {int(i): e for i, e in (config.get("added_tokens_decoder") or {}).items()}
        for content, idx in read_json(model_dir / ADDED_TOKENS_FILE).items():
            if token_content(added.setdefault(int(idx), {"content": content})) != content:
                raise TokenizerError(f"{ADDED_TOKENS_FILE} and {TOKENIZER_CONFIG_FILE} disagree on id {idx}")

        return cls(
            sp_file,
            added,
            **cls._config_kwargs(special_map, config, pad_default=None),
        )

    # The vocabulary members (`vocab_size`, `bos_id`, `pad_id`, `token_to_id`, ...) come from the base.

    # ------------------------------------------------------------------ encode

    def _split_added(self, text: str) -> list[str]:
        """`PreTrainedTokenizer.tokenize`'s split: chunks and added tokens, stripped per lstrip/rstrip."""
        chunks: list[str] = []
        pos = 0
        if self._split_re is not None:
            for m in self._split_re.finditer(text):
                chunks.append(text[pos : m.start()])
                chunks.append(m.group())
                pos = m.end()
        chunks.append(text[pos:])
        # chunks alternate: text, added token, text, ..., text (text chunks may be empty)
        for i in range(1, len(chunks), 2):
            _, lstrip, rstrip = self._added[self._added_encoder[chunks[i]]]
            if rstrip:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if lstrip:
                chunks[i - 1] = chunks[i - 1].rstrip()
        return chunks

    def _sp_tokenize(self, chunk: str) -> list[str]:
        """`LlamaTokenizer._tokenize` (legacy=False): a leading space survives, no dummy prefix."""
        if not chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp.encode(chunk, out_type=str)
        pieces = self._sp.encode(self.unk_token + chunk, out_type=str)
        return pieces[self._unk_length :] if len(pieces) >= self._unk_length else pieces

    def tokenize(self, text: str) -> list[str]:
        """Upstream `tokenizer.tokenize(text)` (no BOS)."""
        if not text:
            return []
        chunks = self._split_added(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        tokens: list[str] = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self._sp_tokenize(chunk))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special_tokens:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """`tokenizer(text).input_ids`."""
        ids = [self.token_to_id(t) for t in self.tokenize(text)]
        if add_bos and self.add_bos_token:
            ids.insert(0, self.bos_id)
        if self.add_eos_token:
            ids.append(self.eos_id)
        return ids

    # ------------------------------------------------------------------ decode

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """`LlamaTokenizer.convert_tokens_to_string` (legacy=False: no space before special tokens)."""
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = [tokens[0][1:], *tokens[1:]]
        out = ""
        run: list[str] = []
        for token in tokens:
            if token in self._special_tokens:
                out += self._sp.decode_pieces(run) + token
                run = []
            else:
                run.append(token)
        return out + self._sp.decode_pieces(run)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """transformers 4.37 `PreTrainedTokenizer._decode` over `convert_tokens_to_string`."""
        return self._clean_up(" ".join(self._sub_texts(ids, skip_special_tokens)))

    def text_stream(self, skip_special_tokens: bool = True) -> _LlamaStream:
        """The per-token state behind `IncrementalDecoder(self, skip_special_tokens)`."""
        return _LlamaStream(self, skip_special_tokens)


class _LlamaStream:
    """Streams `LlamaSPTokenizer.decode` exactly, with or without the special tokens.

    Pieces of the current sub-text are decoded in runs; a run ends only after a complete character
    (byte-fallback pieces may hold half of one). The " " between sub-texts is emitted when the next
    sub-text is known to be non-empty (or at the end, where upstream keeps an empty last sub-text).
    """

    def __init__(self, tokenizer: LlamaSPTokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._sp = tokenizer._sp
        self._skip_special = skip_special_tokens
        self._any_sub_text = False  # a sub-text was emitted: the next one is preceded by " "
        self._in_sub_text = False  # the current sub-text has tokens
        self._sub_text_shown = False  # ... and some of its text (or its separator) was emitted
        self._run: list[str] = []  # pieces not decoded yet
        self._bytes: list[int] = []  # values of the trailing byte-fallback pieces of the run
        self._out = CleanupStream() if tokenizer.clean_up_tokenization_spaces else None

    def push(self, token_id: int) -> str:
        tok = self._tok
        token_id = tok._check_id(token_id)
        if self._skip_special and token_id in tok.special_ids:
            return ""
        token = tok.id_to_token(token_id)
        if token in tok._legacy_tokens:
            text = self._commit()
            self._in_sub_text = self._sub_text_shown = False  # an empty sub-text is dropped here
            return self._emit(text + self._separator() + token)
        if not self._in_sub_text:
            self._in_sub_text = True
            if token.startswith(SPIECE_UNDERLINE):
                token = token[1:]
        if token in tok._special_tokens:
            return self._emit(self._commit() + self._show(token))
        self._run.append(token)
        if token_id < tok.sp_vocab_size and self._sp.is_byte(token_id) and token_id not in tok._added:
            self._bytes.append(int(token[3:5], 16))
            if utf8_incomplete(self._bytes):
                return ""
        return self._emit(self._commit())

    def flush(self) -> str:
        text = self._commit()
        if self._in_sub_text and not self._sub_text_shown:
            text += self._separator()  # upstream keeps an empty last sub-text: " ".join(..., "")
        if self._out is None:
            return text
        self._out.append(text)
        return self._out.emit(final=True)

    def _commit(self) -> str:
        run, self._run, self._bytes = self._run, [], []
        return self._show(self._sp.decode_pieces(run)) if run else ""

    def _show(self, text: str) -> str:
        """`text` of the current sub-text, preceded by the separator the first time it is non-empty."""
        if not text or self._sub_text_shown:
            return text
        self._sub_text_shown = True
        return self._separator() + text

    def _separator(self) -> str:
        sep = " " if self._any_sub_text else ""
        self._any_sub_text = True
        return sep

    def _emit(self, text: str) -> str:
        if self._out is None:
            return text
        self._out.append(text)
        return self._out.emit()
