"""Next tokens from logits: penalties, logit bias, greedy or filtered sampling, logprobs.

Logprobs are those of the raw model distribution (log-softmax of the logits
before penalties, bias and temperature), gathered with one fused top-k call.
"""

import torch

from xllm import ops
from xllm.engine.outputs import TokenLogprob
from xllm.engine.sequence import Sequence


def seeded_generator(seed: int, index: int) -> torch.Generator:
    """Choice `index`'s generator for a request with `seed`: reproducible, distinct per choice."""
    return torch.Generator().manual_seed(hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)


class Sampler:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Pick one token per row of `logits` [len(seqs), vocab]; logprobs where asked."""
        raw = logits
        logits = self._adjust(logits, seqs)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        tokens = logits.argmax(dim=-1)  # greedy rows; sampled rows are overwritten
        if sampled:
            tokens[sampled] = self._sample(logits[sampled], [seqs[i] for i in sampled])
        return tokens.tolist(), self._logprobs(raw, tokens, seqs)

    def _adjust(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Apply penalties and logit bias (on a copy, only to the rows that ask)."""
        rows = [i for i, s in enumerate(seqs) if s.params.needs_penalties or s.params.logit_bias]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            p, row = seqs[i].params, logits[i]
            if p.needs_penalties:
                output = torch.tensor(seqs[i].output_ids, dtype=torch.long)
                counts = torch.bincount(output, minlength=vocab)[:vocab].to(row.dtype)
                if p.repetition_penalty != 1.0:
                    seen = torch.zeros(vocab, dtype=torch.bool)
                    seen[torch.tensor(seqs[i].token_ids, dtype=torch.long)] = True
                    penalized = torch.where(
                        row > 0, row / p.repetition_penalty, row * p.repetition_penalty
                    )
                    row.copy_(torch.where(seen, penalized, row))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
                row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
        logits = logits / temps[:, None]
        if any(s.params.top_k > 0 or s.params.top_p < 1 or s.params.min_p > 0 for s in seqs):
            logits = self._filter(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for i, s in enumerate(seqs):
            noise[i].exponential_(generator=s.generator or self.generator)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Mask what top_k, top_p and min_p rule out (the best token always stays)."""
        vocab = logits.shape[1]
        top_k = torch.tensor([min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab
                              for s in seqs])
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=logits.dtype)
        values, order = logits.sort(dim=-1, descending=True)
        drop = torch.arange(vocab)[None, :] >= top_k[:, None]
        values = values.masked_fill(drop, float("-inf"))
        probs = torch.softmax(values, dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        drop[:, 0] = False
        values = values.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, values)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
    ) -> list[TokenLogprob | None]:
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return result
        k = max(1, max(seqs[i].params.logprobs for i in rows))
        values, indices, chosen = ops.topk_logprobs(raw[rows].contiguous(), k, tokens[rows])
        values, indices, chosen = values.tolist(), indices.tolist(), chosen.tolist()
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            top = list(zip(indices[j][:n], values[j][:n]))
            result[i] = TokenLogprob(int(tokens[i]), chosen[j], top)
        return result
