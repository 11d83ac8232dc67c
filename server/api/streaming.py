"""From engine token ids to OpenAI text deltas: incremental detokenisation and stop strings.

`ChoiceText.feed()` takes each RequestOutput of one choice and returns the text that is safe to
send now. Text is held back while it ends in an incomplete UTF-8 sequence, or while its tail could
still be the start of a stop string; a completed stop string ends the choice with finish_reason
"stop", and the stop string itself is not sent (OpenAI's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.engine import RequestOutput
from server.engine.sequence import TokenLogprob


class IncrementalDetokenizer:
    """Decodes a growing list of ids, re-decoding only a short window (the TGI/vLLM offsets rule)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete UTF-8 tail decodes to U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    finish_reason: str | None  # None while the choice goes on
    stopped_by_string: bool = False


@dataclass
class ChoiceText:
    """The text state of one choice (one engine request)."""

    tokenizer: object
    stops: list[str] = field(default_factory=list)
    text: str = ""  # everything decoded so far (up to a stop string, once matched)
    sent: int = 0  # characters of `text` already returned
    finished: bool = False

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer)

    def feed(self, out: RequestOutput) -> Delta:
        ids = [t for t in out.new_token_ids]
        self.text += self._detok.add(ids)
        if out.finished:
            self.text += self._detok.flush()
        stop_at = self._find_stop()
        if stop_at is not None:
            self.text = self.text[:stop_at]
            self.finished = True
            return self._emit(len(self.text), ids, out.new_logprobs, "stop", stopped=True)
        if out.finished:
            self.finished = True
            reason = out.finish_reason.value if out.finish_reason else "stop"
            return self._emit(len(self.text), ids, out.new_logprobs, reason)
        return self._emit(len(self.text) - self._held_back(), ids, out.new_logprobs, None)

    def _emit(self, upto: int, ids, logprobs, reason, stopped: bool = False) -> Delta:
        upto = max(upto, self.sent)
        chunk = self.text[self.sent:upto]
        self.sent = upto
        return Delta(chunk, ids, list(logprobs), reason, stopped)

    def _find_stop(self) -> int | None:
        if not self.stops:
            return None
        longest = max(len(s) for s in self.stops)
        start = max(0, self.sent - longest)
        best = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best):
                best = i
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held


