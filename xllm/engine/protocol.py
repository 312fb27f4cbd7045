"""What the API layer needs of an engine: the one interface it holds the engine by."""

from collections.abc import AsyncIterator
from typing import Protocol

from xllm.engine.multimodal import VisionSpec
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.tokenizer import Tokenizer
from xllm.inputs import PromptInput


class OutputStream(Protocol):
    """One request's outputs; `close()` before the last one aborts the request."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    """Implemented by `AsyncEngine`; errors are those of `xllm.engine.errors`."""

    max_model_len: int
    default_params: dict[str, float | int]  # the model's generation_config sampling defaults

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def vision(self) -> VisionSpec | None: ...  # None: a text-only model

    @property
    def dead_reason(self) -> str | None: ...

    @property
    def is_sleeping(self) -> bool: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> dict[str, int]: ...

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool,
                          images: list[bytes] = ()) -> PromptInput: ...

    async def text_prompt(self, text: str) -> PromptInput: ...

    async def pieces_prompt(self, pieces: list[str]) -> tuple[PromptInput, list[int]]: ...

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams
                    ) -> OutputStream: ...

    async def sleep(self, level: int) -> None: ...

    async def wake_up(self) -> None: ...
