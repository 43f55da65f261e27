"""A sequence's streamed text: incremental detokenization plus stop strings.

The tokenizer's `IncrementalDecoder` already holds back incomplete UTF-8 (byte-fallback pieces of a
CJK character, say) and never repeats text. On top of it, text that could be the beginning of a stop
string is held back until the next token shows whether the stop string really follows, so a
stop string is never half-streamed and nothing after it is ever sent.
"""

from __future__ import annotations

from typing import Protocol


class IncrementalDetokenizer(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class OutputText:
    def __init__(self, decoder: IncrementalDetokenizer, stop: tuple[str, ...] = ()) -> None:
        self.decoder = decoder
        self.stop = stop
        self._pending = ""  # decoded, not yet sent: might be the start of a stop string

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text delta after `token_id`, and whether a stop string ended the text."""
        self._pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text when the sequence ends for another reason (stop token, length)."""
        self._pending += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self._pending
        if not self.stop:
            self._pending = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        keep = 0 if final else self._partial_stop_suffix(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
