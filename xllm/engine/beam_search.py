"""Beam search as transformers does it (API.md section 3), for one request's beam group.

Each step, every live beam offers its top candidates; the group keeps the best
`num_keep` continuations by summed logprob (the beam-pruning kernel). An ending
candidate (EOS, a stop token or string, or `max_tokens` reached) ranked among
the best `width` becomes a finished hypothesis scored as its summed logprob
divided by `generated_length ** length_penalty`; the best `width` others go on.
`early_stopping` decides, as in transformers, when the live beams can no longer
beat the finished ones. Arithmetic is float32, as transformers' is, so that
near ties fall the same way.

The group knows nothing of blocks or sequences: the engine forks, advances and
frees the beams `step` returns.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from xllm import ops
from xllm.engine.outputs import TokenLogprob
from xllm.engine.sampling_params import SamplingParams

_F32 = torch.float32


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens, their logprobs and its normalized score."""

    token_ids: list[int]
    logprobs: list[TokenLogprob]
    score: float
    finish_reason: str


@dataclass
class Continuation:
    """A live beam of the next step: `parent` (index into the previous live beams) + `token`."""

    parent: int
    token: int
    logprob: TokenLogprob


@dataclass
class BeamHistory:
    """What a live beam has generated (the engine keeps one per live sequence)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob]


class BeamGroup:
    def __init__(self, params: SamplingParams, max_new_tokens: int, enders: set[int],
                 stops: Callable[[list[int], int], bool] | None = None) -> None:
        """`enders`: the token ids that end a beam (EOS, stop tokens); `stops(ids, token)`:
        whether `token` after generated `ids` completes a stop string."""
        self.width = params.beam_width
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.max_new_tokens = max_new_tokens
        self.enders = enders
        self.stops = stops
        self.report = params.logprobs  # alternatives reported per token (None: none)
        # transformers keeps (1 + number of EOS ids, at least 2) * width continuations
        self.num_keep = max(2, 1 + len(enders)) * self.width
        self.num_candidates = max(self.num_keep, params.logprobs or 0)
        self.scores = torch.zeros(1, dtype=_F32)  # summed logprobs of the live beams
        self.histories = [BeamHistory([], [])]
        self.finished: list[Hypothesis] = []
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.num_generated = 0
        self.done = False

    @property
    def num_live(self) -> int:
        return len(self.histories)

    def step(self, values: torch.Tensor, indices: torch.Tensor) -> list[Continuation]:
        """Advance by one token. `values`/`indices` [num_live, num_candidates]: each live
        beam's top logprobs, best first. Returns the next live beams, best first (none
        once the search is done)."""
        parents, tokens, sums = ops.beam_prune(
            self.scores[None], indices[None], values[None].to(_F32), self.num_keep)
        parents, tokens, sums = parents[0].tolist(), tokens[0].tolist(), sums[0]
        length = self.num_generated + 1
        ends = [self._ends(p, t, length) for p, t in zip(parents, tokens)]
        candidates = [self._logprob(values[p], indices[p], t) for p, t in zip(parents, tokens)]
        full = len(self.finished) == self.width and self.early_stopping is True
        if self.improvable and not full:
            normalized = sums / (length ** self.length_penalty)
            for i in range(self.width):
                if ends[i] is not None:
                    self._finish(parents[i], tokens[i], candidates[i], float(normalized[i]),
                                 ends[i])
        going = [i for i in range(len(tokens)) if ends[i] is None][: self.width]
        self.num_generated = length
        self.histories = [
            BeamHistory(self.histories[parents[i]].token_ids + [tokens[i]],
                        self.histories[parents[i]].logprobs + [candidates[i]])
            for i in going
        ]
        self.scores = sums[going].clone() if going else torch.zeros(0, dtype=_F32)
        self._check_improvable()
        self.done = (not going or not self.improvable
                     or (len(self.finished) == self.width and self.early_stopping is True))
        if self.done:
            return []
        return [Continuation(parents[i], tokens[i], candidates[i]) for i in going]

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best first."""
        return list(self.finished)

    def _ends(self, parent: int, token: int, length: int) -> str | None:
        """Why this candidate ends its beam ("stop" or "length"), or None."""
        if token in self.enders:
            return "stop"
        if self.stops is not None and self.stops(self.histories[parent].token_ids, token):
            return "stop"
        if length >= self.max_new_tokens:
            return "length"
        return None

    def _logprob(self, values: torch.Tensor, indices: torch.Tensor, token: int) -> TokenLogprob:
        ids = indices.tolist()
        logprob = float(values[ids.index(token)])
        top = [] if not self.report else list(zip(ids[: self.report],
                                                   values[: self.report].tolist()))
        return TokenLogprob(token, logprob, top)

    def _finish(self, parent: int, token: int, logprob: TokenLogprob, score: float,
                reason: str) -> None:
        history = self.histories[parent]
        hyp = Hypothesis(history.token_ids + [token], history.logprobs + [logprob], score, reason)
        # the best `width` of the old and the new, old ones first on a tie
        self.finished = sorted(self.finished + [hyp], key=lambda h: -h.score)[: self.width]

    def _check_improvable(self) -> None:
        """transformers' early-stop heuristic: can the best live beam still beat the worst
        finished hypothesis once all `width` places are taken?"""
        if not self.improvable or len(self.finished) < self.width or not self.num_live:
            return
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        else:
            length = self.num_generated
        best = self.scores[:1] / (length ** self.length_penalty)
        worst = torch.tensor(min(h.score for h in self.finished), dtype=_F32)
        self.improvable = bool(best > worst)
