"""Offline, synchronous generation over the engine: for tests and scripts."""

import itertools

from xllm.config import EngineConfig
from xllm.engine.errors import RequestFailedError
from xllm.engine.llm_engine import LLMEngine
from xllm.engine.outputs import CompletionOutput, RequestOutput
from xllm.engine.sampling_params import SamplingParams
from xllm.inputs import PromptInput


class LLM:
    def __init__(self, model: str = "default", **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: list[str] | list[list[int]] | list[PromptInput],
        params: SamplingParams | list[SamplingParams],
    ) -> list[RequestOutput]:
        """Run all prompts to the end; each output holds its choices' full results."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        processor = self.engine.processor
        inputs = [p if isinstance(p, PromptInput) else
                  processor.text(p) if isinstance(p, str) else PromptInput.of(p) for p in prompts]
        for prompt, p in zip(inputs, params):
            processor.check(prompt, p)
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(inputs, params):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, p)
            order.append(request_id)
            results[request_id] = RequestOutput(
                request_id, list(prompt.token_ids),
                [CompletionOutput(i, "", [], [] if p.logprobs is not None else None)
                 for i in range(p.num_choices)],
                False,
            )
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.error is not None:
                    raise RequestFailedError(f"request {out.request_id} failed") from out.error
                total = results[out.request_id]
                total.finished = out.finished
                if out.prompt_logprobs is not None:
                    total.prompt_logprobs = out.prompt_logprobs
                for delta in out.outputs:
                    choice = total.outputs[delta.index]
                    choice.text += delta.text
                    choice.token_ids += delta.token_ids
                    if delta.logprobs is not None:
                        choice.logprobs += delta.logprobs
                    choice.finish_reason = delta.finish_reason
                    choice.stop_reason = delta.stop_reason
                    choice.score = delta.score
        return [results[r] for r in order]
