"""The synchronous engine: `step()` is schedule, run the model, sample, emit outputs.

Requests reach `add_request` already checked by `processor.check` (the async
front and the offline LLM both do so); the engine trusts them.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xllm import ops
from xllm.config import EngineConfig
from xllm.engine.beam_search import BeamGroup
from xllm.engine.block_manager import BlockManager
from xllm.engine.detokenizer import Detokenizer, cut_at_stop, first_stop
from xllm.engine.errors import EngineBusyError, InvalidParameter
from xllm.engine.multimodal import VisionSpec
from xllm.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from xllm.engine.processor import InputProcessor
from xllm.engine.sampler import Sampler, seeded_generator
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import ScheduledSeq, Scheduler, StepPlan, plan_rows
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
    beam: BeamGroup | None = None  # beam search: `seqs` is then the group's live beams

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class StepResult:
    """What a step computed, before any sequence takes it: per scheduled sequence its
    prompt logprobs; per sampled sequence its token and logprob; per beam that offers
    candidates, its top logprobs (values, token ids)."""

    prompt_logprobs: list[list[TokenLogprob]]
    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    candidates: dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(beam's item): top logprobs


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
        self.processor = InputProcessor(
            self.tokenizer, self.max_model_len, self.runner.vocab_size, config.max_n,
            config.max_beam_width, VisionSpec.of(hf_config, self.model_path, config))
        self.sampler = Sampler(config.seed, self.runner.device)
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
        if params.beam_search:
            self._add_beam_search(request_id, prompt, params)
            return
        device = self.runner.device
        seqs = [
            Sequence(request_id, i, prompt, params, generator=None if params.seed is None
                     else seeded_generator(params.seed, i, device))
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

    def _add_beam_search(self, request_id: str, prompt: PromptInput,
                         params: SamplingParams) -> None:
        seq = Sequence(request_id, 0, prompt, params)
        seq.beams = [seq]
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        room = self.max_model_len - len(prompt)
        enders = set(params.stop_token_ids)
        if not params.ignore_eos:
            enders |= self.tokenizer.eos_token_ids
        group = BeamGroup(params, min(params.max_tokens or room, room), enders,
                          self._stop_strings(params))
        self.requests[request_id] = Request(request_id, prompt, params, seq.beams, [], beam=group)
        self.scheduler.add(seq)

    def _stop_strings(self, params: SamplingParams) -> Callable[[list[int], int], bool] | None:
        """Whether a token after generated ids completes one of `params.stop`."""
        if not params.stop:
            return None

        def stops(ids: list[int], token: int) -> bool:
            text = self.tokenizer.decode(ids + [token], params.skip_special_tokens)
            return first_stop(text, params.stop) is not None

        return stops

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
        """Run one step. A fault while computing it fails only the requests that cause it:
        the step's requests are then computed apart, and those that still fail end with
        their error while the others go on."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        if plan.copies:
            self.runner.copy_blocks(plan.copies)
        try:
            parts = [(plan, self._compute(plan))]
        except Exception:
            logger.warning("a step of %d requests failed; computing them apart",
                           len({item.seq.request_id for item in plan.scheduled}))
            parts, outputs = self._compute_apart(plan)
        else:
            outputs = []
        for part, computed in parts:
            outputs += self._apply(part, computed)
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def _compute(self, plan: StepPlan) -> StepResult:
        """The model's forward pass and sampling for `plan`, changing no sequence."""
        inputs, rows = plan.inputs(self.block_manager.block_size)
        logits = self.runner.run(inputs)
        if rows is not None:  # sample points that several sequences share ran once
            logits = logits[rows]
        prompt_logprobs = [
            self._position_logprobs(item, logits[item.prompt_rows.start : item.prompt_rows.stop])
            if item.prompt_rows else [] for item in plan.scheduled
        ]
        sampled = plan.sampled
        tokens, logprobs = [], []
        if sampled:
            sample_rows = [item.sample_row for item in sampled]
            rows = logits if len(sample_rows) == plan.num_rows else logits[sample_rows]
            tokens, logprobs = self.sampler(rows, [item.seq for item in sampled])
        return StepResult(prompt_logprobs, tokens, logprobs, self._candidates(plan, logits))

    def _candidates(self, plan: StepPlan, logits: torch.Tensor
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The top logprobs that each beam in `plan` offers its group's search."""
        beams = plan.searched
        if not beams:
            return {}
        k = max(self.requests[item.seq.request_id].beam.num_candidates for item in beams)
        rows = logits[[item.sample_row for item in beams]]
        values, indices, _ = ops.topk_logprobs(
            rows, k, torch.zeros(len(beams), dtype=torch.long, device=rows.device))
        values, indices = values.cpu(), indices.cpu()  # the search itself runs on the host
        return {id(item): (values[j], indices[j]) for j, item in enumerate(beams)}

    def _compute_apart(self, plan: StepPlan
                       ) -> tuple[list[tuple[StepPlan, StepResult]], list[RequestOutput]]:
        """Compute each request's share of `plan` alone; fail the requests whose share
        raises. Returns the parts that went through and the failed requests' outputs."""
        items = plan.scheduled
        parts, failed = [], []
        for request_id, share in plan.shares().items():
            part = plan_rows([(items[i].seq, items[i].num_new_tokens) for i in share
                              if not items[i].revisit])  # plan_rows plans revisits again
            try:
                parts.append((part, self._compute(part)))
            except Exception as exc:
                failed.append(self._fail(request_id, exc))
        return parts, failed

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput:
        """End a request with `error`, freeing its blocks."""
        logger.error("request %s failed in the engine step (%s)", request_id,
                     type(error).__name__, exc_info=error)
        request = self.requests[request_id]
        self.abort_request(request_id)
        return RequestOutput(request_id, list(request.prompt.token_ids), [], True, error=error)

    def _apply(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Advance the sequences of `plan` by what `result` computed for them, request by
        request; a request that faults here ends with its error."""
        samples = {id(item): pair for item, pair in
                   zip(plan.sampled, zip(result.tokens, result.logprobs, strict=True))}
        items = plan.scheduled
        outputs = []
        for request_id, indices in plan.shares().items():
            share = [(items[i], result.prompt_logprobs[i], samples.get(id(items[i])))
                     for i in indices]
            request = self.requests[request_id]
            try:
                if request.beam is not None:
                    out = self._search(request, share, result.candidates)
                    outputs += [out] if out is not None else []
                    continue
                news = [out for item, lps, sample in share
                        if (out := self._advance(item, lps, sample)) is not None]
            except Exception as exc:
                outputs.append(self._fail(request_id, exc))
                continue
            if news:
                outputs.append(self._output(request, news))
        return outputs

    def _search(self, request: Request, share: list, candidates: dict) -> RequestOutput | None:
        """A beam group takes its share of a step: when every live beam offered candidates,
        the search advances (forking, advancing and freeing beams); its output once done."""
        offered = {}
        for item, prompt_logprobs, _ in share:
            self._advance(item, prompt_logprobs, None)
            if id(item) in candidates:
                offered[id(item.seq)] = candidates[id(item)]
        live, group = request.seqs, request.beam
        if any(id(seq) not in offered for seq in live):
            for item, _, _ in share:  # not all of the group ran: its last tokens run again
                if id(item) in candidates:
                    item.seq.num_computed -= 1
            return None
        k = group.num_candidates
        values = torch.stack([offered[id(seq)][0][:k] for seq in live])
        indices = torch.stack([offered[id(seq)][1][:k] for seq in live])
        continuations = group.step(values, indices)
        if group.done:
            for seq in live:
                self.scheduler.finish(seq)
            return self._output(request, self._beam_results(request))
        beams, taken = [], set()
        for c in continuations:  # forks first: a parent's own token comes after
            parent = live[c.parent]
            beams.append(self._fork(parent) if c.parent in taken else parent)
            taken.add(c.parent)
        for seq, c in zip(beams, continuations):
            seq.token_ids.append(c.token)
        self.scheduler.replace_beams(list(live), beams)
        live[:] = beams
        return None

    def _fork(self, parent: Sequence) -> Sequence:
        """A new beam sharing `parent`'s tokens and blocks."""
        child = Sequence(parent.request_id, 0, parent.prompt, parent.params)
        child.token_ids = list(parent.token_ids)
        child.num_computed = parent.num_computed
        child.beams = parent.beams
        self.block_manager.fork(parent, child)
        return child

    def _beam_results(self, request: Request) -> list[CompletionOutput]:
        """The finished hypotheses as choices, best first."""
        p = request.params
        outputs = []
        for rank, hyp in enumerate(request.beam.results()):
            text, _ = cut_at_stop(self.tokenizer.decode(hyp.token_ids, p.skip_special_tokens),
                                  p.stop, p.include_stop_str_in_output)
            outputs.append(CompletionOutput(
                rank, text, hyp.token_ids,
                hyp.logprobs if p.logprobs is not None else None, hyp.finish_reason,
                score=hyp.score))
        return outputs

    def _advance(self, item: ScheduledSeq, prompt_logprobs: list[TokenLogprob],
                 sample: tuple[int, TokenLogprob | None] | None) -> CompletionOutput | None:
        """One sequence takes its share of a step; its news, if any."""
        seq = item.seq
        if prompt_logprobs:
            taken = seq.point_logprobs if seq.params.sample_points else seq.prompt_logprobs
            taken.extend(prompt_logprobs)
        if not item.revisit:
            seq.num_computed += item.num_new_tokens
            self.block_manager.commit(seq)
        if sample is not None:
            return self._append(seq, *sample)
        if seq.params.max_tokens == 0 and seq.scored:
            return self._end_scored(seq)
        return None

    def _end_scored(self, seq: Sequence) -> CompletionOutput:
        """Finish a sequence that generates nothing (max_tokens 0: its prompt is scored, or
        its sample points' distributions are its logprobs)."""
        seq.finish_reason = "length"
        self.scheduler.finish(seq)
        logprobs = seq.point_logprobs if seq.params.sample_points else \
            None if seq.params.logprobs is None else []
        return CompletionOutput(seq.index, "", [], logprobs, "length")

    def _position_logprobs(self, item: ScheduledSeq, logits: torch.Tensor
                           ) -> list[TokenLogprob]:
        """The next-token logprobs at the positions of `item` whose rows `logits` are: each
        with the prompt's own next token (prompt logprobs) and the top candidates."""
        seq = item.seq
        positions = seq.logit_positions(item.start, item.start + item.num_new_tokens)
        last = seq.num_tokens - 1
        targets = torch.tensor([seq.token_ids[min(p + 1, last)] for p in positions],
                               dtype=torch.long, device=logits.device)
        p = seq.params
        n = p.logprobs if p.sample_points else p.prompt_logprobs
        values, indices, chosen = ops.topk_logprobs(logits, max(1, n), targets)
        return [TokenLogprob(t, c, list(zip(ids[:n], vals[:n])))
                for t, c, vals, ids in zip(targets.tolist(), chosen.tolist(), values.tolist(),
                                           indices.tolist())]

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
