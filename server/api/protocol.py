"""OpenAI request models. Every parameter check lives here, once.

Unknown fields are accepted and ignored (clients send vendor extras); parameters we cannot honour
(tools, suffix, non-text response formats) are refused with a 400 that names them rather than
silently ignored. Numbers out of range get OpenAI's error object naming the parameter.

Types are strict, as the OpenAPI schema states them: `"max_tokens": "5"`, `true` as a token id or
`1.5` as `n` are refused rather than coerced, so what /openapi.json documents is what is accepted.
Text must be valid Unicode (a JSON body may spell lone surrogates, which no tokenizer takes).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.sequence import SamplingParams

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16  # OpenAI allows 4; local-model clients (lm-eval, LangChain agents) often send more


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]


def check_text(value: str, what: str) -> str:
    """Refuse strings that are not valid Unicode (lone surrogates survive JSON decoding)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 text ({exc.reason} at position {exc.start})")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extra: usage in every chunk


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)], None] = \
        Field(default=None, validate_default=True)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None  # accepted for compatibility; not used
    # extras, as vLLM accepts them
    top_k: int | None = Field(default=0, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _nulls_mean_defaults(self):
        """`"n": null` means the default, as OpenAI reads it (clients send explicit nulls)."""
        for name, info in type(self).model_fields.items():
            if getattr(self, name) is None and info.default is not None \
                    and not callable(info.default_factory):
                setattr(self, name, info.default)
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        for s in stops:
            check_text(s, "a stop sequence")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError(f"logit_bias may name at most 300 tokens, got {len(v)}")
        for key, bias in v.items():
            if not re.fullmatch(r"-?[0-9]{1,12}", key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for {key}")
        return v

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int,
                        prompt_logprobs: int | None = None, seed_offset: int = 0) -> SamplingParams:
        bias = tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())
        for token, _ in bias:
            if not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary "
                                 f"(0..{vocab_size - 1})")
        for token in self.stop_token_ids or []:
            if not 0 <= token < vocab_size:
                raise ValueError(f"stop_token_ids entry {token} is outside the vocabulary")
        seed = None if self.seed is None else (self.seed + seed_offset) % (2**63)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k if self.top_k > 0 else 0,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            seed=seed,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class _StreamChecks:
    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")


class CompletionRequest(_StreamChecks, _SamplingFields):
    prompt: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1)]]
    # 0 is allowed here (OpenAI's legacy API): with echo and logprobs it scores a prompt
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self):
        self._check_stream_options()
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be at least n (best_of={self.best_of}, n={self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of greater than n cannot be streamed")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], list) \
                and any(len(p) == 0 for p in self.prompt):
            raise ValueError("token prompts must not be empty")
        for p in [self.prompt] if isinstance(self.prompt, str) else self.prompt:
            if isinstance(p, str):
                check_text(p, "the prompt")
        return self

    @property
    def num_candidates(self) -> int:
        """Choices generated per prompt: best_of when it exceeds n (the best n are returned)."""
        return max(self.n, self.best_of or 0)

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _valid_text(self):
        check_text(self.text(), f"the content of a {self.role} message")
        return self


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = "text"


class ChatCompletionRequest(_StreamChecks, _SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _checks(self):
        self._check_stream_options()
        if self.tools:
            raise ValueError("tools / function calling is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format {self.response_format.type!r} is not supported "
                             f"(only 'text')")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
