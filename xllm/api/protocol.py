"""Pydantic request models of the OpenAI chat and completions APIs and of /v1/sample (strict
JSON types)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send extras); JSON types are checked strictly,
    # so "10" is not an int and "yes" is not a bool.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: str
    # A string, or a list of parts like {"type": "text", "text": ...}; checked by the chat handler.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class GenerationRequest(_Strict):
    """What every generating endpoint's request has."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class SamplingRequest(GenerationRequest):
    """The fields chat and completions share; None means "not set"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    user: str | None = None
    # Beam search (API.md section 3).
    beam_width: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    # Not served yet: refused when they ask for anything (see params.check_unserved).
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None


class Selector(_Strict):
    type: str = "literal"
    value: str


class SampleRequest(GenerationRequest):
    """POST /v1/sample (API.md section 4)."""

    prompt: str
    selector: Selector
    logprobs: int | None = None
    request_id: str | None = None
