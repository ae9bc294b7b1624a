"""Request and response schemas of the chat API (the OpenAI Chat Completions shape, like FastChat's
`protocol/openai_api_protocol.py` and vLLM's `entrypoints/openai/protocol.py`).

The route builds its answers from these models and serialises them with `wire()`, so /openapi.json describes
exactly what is sent. Fields the OpenAI wire format leaves out when empty (a delta's role or content, a chunk's
usage) are optional here and never set, and `wire` drops unset fields; the ones it always sends even when null
(finish_reason, logprobs) are required, so existing clients see the same JSON as before. Every field that is always
sent is therefore required, even a constant like `object`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from store.feedback import check_user


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (e.g. logprobs=False)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=4)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    user: str | None = Field(
        None, description="the person behind the API key (OpenAI's field): chat limits are per (key, user)"
    )

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return check_user(v)

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of at most 64 characters")
        return stops


# --- responses


def wire(model: BaseModel) -> str:
    """The JSON sent for a response model: optional fields that were never set are left out."""
    return model.model_dump_json(exclude_unset=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None  # alignd returns no log-probabilities; OpenAI clients expect the key


class ChatCompletionResponse(BaseModel):
    """The body of a non-streaming answer."""

    id: str = Field(description="chatcmpl-…; feedback refers to it as completion_id")
    object: Literal["chat.completion"]
    created: int = Field(description="Unix time in seconds")
    model: str = Field(description="alignd-v<version>")
    system_fingerprint: str = Field(description="alignd-v<version>: the policy version that answered")
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds to a choice: the role once, in the first chunk, then content; empty in the finish chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None  # null until the choice's last chunk
    logprobs: None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a stream. The last one before `data: [DONE]` has no choices and carries the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, description="only in the last chunk")


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(BaseModel):
    """Every error answer, and the last `data:` line of a stream that failed (no `[DONE]` follows it)."""

    error: ErrorDetail
