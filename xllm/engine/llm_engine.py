"""The synchronous engine: `step()` is schedule, run the model, sample, emit outputs.

Requests reach `add_request` already checked by `processor.check` (the async
front and the offline LLM both do so); the engine trusts them.
"""

import json
import logging
from dataclasses import dataclass

import torch

from xllm import ops
from xllm.config import EngineConfig
from xllm.engine.block_manager import BlockManager
from xllm.engine.detokenizer import Detokenizer
from xllm.engine.errors import EngineBusyError, InvalidParameter
from xllm.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from xllm.engine.processor import InputProcessor
from xllm.engine.sampler import Sampler, seeded_generator
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import Scheduler
from xllm.engine.sequence import Sequence
from xllm.engine.tokenizer import Tokenizer
from xllm.inputs import PromptInput
from xllm.model.config import context_length, load_hf_config
from xllm.model.loader import resolve_model
from xllm.model.runner import ModelRunner

logger = logging.getLogger(__name__)

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class Request:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[Detokenizer]
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path = resolve_model(config.model)
        hf_config = load_hf_config(self.model_path)
        model_len = context_length(hf_config)
        if config.max_model_len and config.max_model_len > model_len:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context of {model_len}"
            )
        self.tokenizer = Tokenizer(self.model_path)
        max_len = config.max_model_len or model_len
        self.runner = ModelRunner(self.model_path, hf_config, config, max_len)
        self.max_model_len = min(max_len, self.runner.num_blocks * config.block_size)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.processor = InputProcessor(self.tokenizer, self.max_model_len, self.runner.vocab_size)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self.default_params = self._generation_defaults()
        self.sleep_level = 0  # 0 awake; 1 KV cache freed; 2 weights freed too

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def _generation_defaults(self) -> dict[str, float | int]:
        path = self.model_path / "generation_config.json"
        if not path.is_file():
            return {}
        values = json.loads(path.read_text())
        if values.get("do_sample") is False:
            return {}
        return {k: values[k] for k in SAMPLING_DEFAULTS if values.get(k) is not None}

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> None:
        """Queue a request that `processor.check` has passed, under an id not in use."""
        seqs = [
            Sequence(request_id, i, prompt, params,
                     generator=None if params.seed is None else seeded_generator(params.seed, i))
            for i in range(params.n)
        ]
        if params.prompt_logprobs is not None:
            seqs[0].prompt_logprobs = [None]
        elif self.config.enable_prefix_caching:
            for seq in seqs[1:]:  # the other choices read the prompt from the prefix cache
                seq.wait_for = seqs[0]
        detoks = [
            Detokenizer(self.tokenizer, prompt.token_ids, params.skip_special_tokens, params.stop,
                        params.include_stop_str_in_output)
            for _ in seqs
        ]
        self.requests[request_id] = Request(request_id, prompt, params, seqs, detoks)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free all its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        logits = self.runner.run(plan.inputs())
        for item in plan.scheduled:
            if item.prompt_rows:
                rows = item.prompt_rows
                self._add_prompt_logprobs(item.seq, logits[rows.start : rows.stop])
        sampled = plan.sampled
        tokens, logprobs = [], []
        if sampled:
            sample_rows = [item.sample_row for item in sampled]
            rows = logits if len(sample_rows) == plan.num_rows else logits[sample_rows]
            tokens, logprobs = self.sampler(rows, [item.seq for item in sampled])
        for item in plan.scheduled:
            item.seq.num_computed += item.num_new_tokens
            self.block_manager.commit(item.seq)
        news: dict[str, list[CompletionOutput]] = {}
        for item, token, logprob in zip(sampled, tokens, logprobs):
            news.setdefault(item.seq.request_id, []).append(self._append(item.seq, token, logprob))
        outputs = [self._output(self.requests[rid], outs) for rid, outs in news.items()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def _add_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        first = len(seq.prompt_logprobs)
        targets = torch.tensor(seq.token_ids[first : first + logits.shape[0]], dtype=torch.long)
        k = max(1, seq.params.prompt_logprobs)
        values, indices, chosen = ops.topk_logprobs(logits, k, targets)
        n = seq.params.prompt_logprobs
        for t, c, vals, ids in zip(
            targets.tolist(), chosen.tolist(), values.tolist(), indices.tolist()
        ):
            seq.prompt_logprobs.append(TokenLogprob(t, c, list(zip(ids[:n], vals[:n]))))

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> CompletionOutput:
        """Append a sampled token, check the stop conditions, and say what is new."""
        request = self.requests[seq.request_id]
        p = seq.params
        seq.token_ids.append(token)
        detok = request.detokenizers[seq.index]
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif (stop := detok.add(token)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            seq.finish_reason = "length"
        elif seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
        return CompletionOutput(
            seq.index, detok.release(seq.finished), [token],
            None if logprob is None else [logprob], seq.finish_reason, seq.stop_reason,
        )

    def _output(self, request: Request, outputs: list[CompletionOutput]) -> RequestOutput:
        prompt_logprobs = None
        if request.seqs[0].prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_logprobs = request.seqs[0].prompt_logprobs
            request.prompt_logprobs_sent = True
        return RequestOutput(
            request.request_id, list(request.prompt.token_ids), outputs, request.finished,
            prompt_logprobs,
        )

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1) and the weights (level 2); only with no request in
        flight. The prefix cache is forgotten with the KV contents."""
        if level not in (1, 2):
            raise InvalidParameter.must("level", "must be 1 or 2")
        if self.requests:
            raise EngineBusyError(f"cannot sleep with {len(self.requests)} request(s) in flight")
        if level <= self.sleep_level:
            return
        self.runner.sleep(level)
        self.block_manager.reset_prefix_cache()
        self.sleep_level = level

    def wake_up(self) -> None:
        """Undo sleep(): reload what was freed. Harmless when awake."""
        if self.sleep_level == 0:
            return
        self.runner.wake_up()
        self.sleep_level = 0

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_total_blocks": self.block_manager.num_blocks,
            "prefix_cache_queries": self.block_manager.queries,
            "prefix_cache_hits": self.block_manager.hits,
            "num_preemptions": self.num_preemptions,
            "sleep_level": self.sleep_level,
        }

