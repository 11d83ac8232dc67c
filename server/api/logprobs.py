"""OpenAI's logprobs shapes, from the engine's TokenLogprob records.

Completions (legacy) choice.logprobs:
    {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
     "text_offset": [int]}
  `top_logprobs[i]` holds the `logprobs` most likely tokens plus the sampled one (up to k + 1
  entries, OpenAI's rule); with echo the first prompt token has null logprob and null top.
Chat choice.logprobs:
    {"content": [{"token", "logprob", "bytes": [int], "top_logprobs": [{"token", "logprob",
     "bytes"}]}], "refusal": null}

A token's text is its exact bytes (byte-level BPE and SentencePiece byte fallback are undone);
a token that is only part of a UTF-8 character is written "bytes:\\xNN..", as OpenAI does. Log
probabilities below -9999 (or not finite) are written as -9999.0, OpenAI's "very unlikely".
"""

from __future__ import annotations

import codecs
import json
import math
import re

from server.engine.sequence import TokenLogprob

VERY_UNLIKELY = -9999.0
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable stand-in of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def clamp(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > VERY_UNLIKELY else VERY_UNLIKELY


class TokenTexts:
    """token id -> (display text, exact bytes), cached; one per tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self._byte_level = False
        try:
            decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
            kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
            self._byte_level = "ByteLevel" in kinds
        except Exception:
            pass
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self.token_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, raw)
        return hit

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return self.tokenizer.decode([token_id]).encode("utf-8")
        if self._byte_level:
            if all(c in self._byte_decoder for c in piece):
                return bytes(self._byte_decoder[c] for c in piece)
            return piece.encode("utf-8")
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")


class CompletionLogprobs:
    """Builds the completions shape for one choice, keeping text offsets across stream chunks."""

    def __init__(self, texts: TokenTexts, text_start: int = 0) -> None:
        self.texts = texts
        self.offset = text_start
        self._utf8 = codecs.getincrementaldecoder("utf-8")("ignore")

    def _advance(self, raw: bytes) -> int:
        start = self.offset
        self.offset += len(self._utf8.decode(raw))
        return start

    def _top(self, rec: TokenLogprob) -> dict[str, float]:
        top = {self.texts.get(i)[0]: clamp(lp) for i, lp in rec.top}
        top.setdefault(self.texts.get(rec.token_id)[0], clamp(rec.logprob))
        return top

    def generated(self, records: list[TokenLogprob | None]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for rec in records:
            if rec is None:
                continue
            text, raw = self.texts.get(rec.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(clamp(rec.logprob))
            out["top_logprobs"].append(self._top(rec))
            out["text_offset"].append(self._advance(raw))
        return out

    def prompt(self, prompt_ids: list[int], records: list[TokenLogprob | None] | None) -> dict:
        """Echoed prompt tokens; the first (and any without a record) has null logprob and top."""
        records = records or []
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token_id in enumerate(prompt_ids):
            rec = records[i] if i < len(records) else None
            text, raw = self.texts.get(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if rec is None else clamp(rec.logprob))
            out["top_logprobs"].append(None if rec is None else self._top(rec))
            out["text_offset"].append(self._advance(raw))
        return out


def join(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(texts: TokenTexts, records: list[TokenLogprob | None]) -> dict:
    content = []
    for rec in records:
        if rec is None:
            continue
        text, raw = texts.get(rec.token_id)
        top = []
        for i, lp in rec.top:
            t, r = texts.get(i)
            top.append({"token": t, "logprob": clamp(lp), "bytes": list(r)})
        content.append({"token": text, "logprob": clamp(rec.logprob), "bytes": list(raw),
                         "top_logprobs": top})
    return {"content": content, "refusal": None}
