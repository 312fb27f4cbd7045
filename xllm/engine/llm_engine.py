"""The synchronous engine: `step()` is schedule, run the model, sample, emit outputs."""

import json
import logging
from dataclasses import dataclass, field

import torch

from xllm import ops
from xllm.config import EngineConfig
from xllm.engine.block_manager import BlockManager
from xllm.engine.detokenizer import Detokenizer
from xllm.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from xllm.engine.sampler import Sampler, seeded_generator
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import ScheduledSeq, Scheduler
from xllm.engine.sequence import Sequence
from xllm.engine.tokenizer import Tokenizer
from xllm.model.loader import resolve_model
from xllm.model.runner import ModelRunner, SeqInput, context_length, load_hf_config

logger = logging.getLogger(__name__)

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[Detokenizer]
    pending: list[Sequence] = field(default_factory=list)  # choices waiting for choice 0's prompt
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return not self.pending and all(s.finished for s in self.seqs)


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

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if this request cannot be served as asked."""
        params.validate()
        n, limit = len(prompt_ids), self.max_model_len
        vocab = self.runner.vocab_size
        if n == 0:
            raise ValueError("the prompt must not be empty")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if n >= limit:
            raise ValueError(
                f"the prompt has {n} tokens, but the model's context is {limit} tokens"
            )
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise ValueError(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {limit} tokens"
            )
        for t in list(params.logit_bias or {}) + list(params.stop_token_ids):
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab})")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id} is already in use")
        self.check_request(prompt_ids, params)
        seqs = [
            Sequence(
                request_id, i, list(prompt_ids), len(prompt_ids), params,
                generator=None if params.seed is None else seeded_generator(params.seed, i),
            )
            for i in range(params.n)
        ]
        if params.prompt_logprobs is not None:
            seqs[0].prompt_logprobs = [None]
        detoks = [
            Detokenizer(
                self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop,
                params.include_stop_str_in_output,
            )
            for _ in seqs
        ]
        share_prefix = self.config.enable_prefix_caching and params.prompt_logprobs is None
        first, rest = (seqs[:1], seqs[1:]) if share_prefix else (seqs, [])
        self.requests[request_id] = Request(request_id, prompt_ids, params, seqs, detoks, rest)
        for seq in first:
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
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        inputs, sample_seqs, sample_rows, prompt_rows = self._inputs(scheduled)
        logits = self.runner.run(inputs)
        for seq, first_row, n_rows in prompt_rows:
            self._add_prompt_logprobs(seq, logits[first_row : first_row + n_rows])
        tokens, logprobs = [], []
        if sample_seqs:
            rows = logits if len(sample_rows) == len(logits) else logits[sample_rows]
            tokens, logprobs = self.sampler(rows, sample_seqs)
        for item in scheduled:
            item.seq.num_computed += item.num_new_tokens
            self.block_manager.commit(item.seq)
        news: dict[str, list[CompletionOutput]] = {}
        for seq, token, logprob in zip(sample_seqs, tokens, logprobs):
            news.setdefault(seq.request_id, []).append(self._append(seq, token, logprob))
        return [self._output(self.requests[rid], outs) for rid, outs in news.items()]

    def _inputs(self, scheduled: list[ScheduledSeq]):
        """The runner's inputs; the sequences to sample and their logits rows; and
        (sequence, first row, row count) of the prompt-logprob rows."""
        inputs, sample_seqs, sample_rows, prompt_rows = [], [], [], []
        row = 0
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_new_tokens
            offsets = []
            if seq.needs_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs) - 1)
                offsets = [p - start for p in range(first, min(end, seq.num_prompt_tokens - 1))]
                if offsets:
                    prompt_rows.append((seq, row, len(offsets)))
                    row += len(offsets)
            if end == seq.num_tokens:
                offsets.append(end - 1 - start)
                sample_seqs.append(seq)
                sample_rows.append(row)
                row += 1
            inputs.append(SeqInput(seq.token_ids[start:end], start, seq.block_table, offsets))
        return inputs, sample_seqs, sample_rows, prompt_rows

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
        if seq.index == 0 and request.pending:
            for sibling in request.pending:
                self.scheduler.add(sibling)
            request.pending = []
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
        finished = request.finished
        if finished:
            del self.requests[request.request_id]
        return RequestOutput(
            request.request_id, request.prompt_ids, outputs, finished, prompt_logprobs
        )

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1) and the weights (level 2); only with no request in
        flight. The prefix cache is forgotten with the KV contents."""
        if level not in (1, 2):
            raise ValueError("level must be 1 or 2")
        if self.requests:
            raise ValueError(f"cannot sleep with {len(self.requests)} request(s) in flight")
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
            "num_waiting": len(self.scheduler.waiting),
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_total_blocks": self.block_manager.num_blocks,
            "prefix_cache_queries": self.block_manager.queries,
            "prefix_cache_hits": self.block_manager.hits,
            "num_preemptions": self.num_preemptions,
            "sleep_level": self.sleep_level,
        }

