"""Next tokens from logits: penalties, logit bias, greedy or filtered sampling, logprobs.

Everything runs on the logits' device, vectorized over the batch: each stage copies the
per-row values it needs there in one small table, and the host reads back one tensor
per step (the tokens, and the logprobs asked for). Sampling is the exponential race,
argmax(probs / E) with E ~ Exp(1): the rows without a generator of their own draw their
noise in one call, and a seeded row from its own generator, so that its tokens do not
depend on the rest of the batch.

Logprobs are those of the raw model distribution (log-softmax of the logits
before penalties, bias and temperature), gathered with one fused top-k call.
"""

import torch

from xllm import ops
from xllm.engine.outputs import TokenLogprob
from xllm.engine.sequence import Sequence


def seeded_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Choice `index`'s generator on `device` for a request with `seed`: reproducible,
    distinct per choice."""
    return torch.Generator(device=device).manual_seed(hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)


class Sampler:
    """Picks one token per row; `generator` (on `device`) serves the rows without their own."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Pick one token per row of `logits` [len(seqs), vocab]; logprobs where asked."""
        if not seqs:
            return [], []
        raw, device = logits, logits.device
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        # A copy to the device waits for the work queued there: the row indices go first.
        sampled_rows, asked_rows = some_rows(sampled, seqs, device), some_rows(asked, seqs, device)
        logits = adjust(logits, seqs)
        if sampled_rows is None and sampled:
            tokens = self._sample(logits, seqs)
        else:
            tokens = ops.argmax(logits)
            if sampled_rows is not None:
                picked = self._sample(logits[sampled_rows], [seqs[i] for i in sampled])
                tokens.index_copy_(0, sampled_rows, picked)
        return read_back(raw, tokens, seqs, asked_rows)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Draw each row's token from its tempered, filtered distribution."""
        vocab = logits.shape[1]
        table = torch.tensor(
            [[s.params.temperature, min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab,
              s.params.top_p, s.params.min_p] for s in seqs],
            dtype=torch.float64, device=logits.device,
        )
        noise = self._noise(logits, seqs)  # before the work that its copies would wait for
        logits = logits / table[:, :1].to(logits.dtype)
        if any(s.params.top_k > 0 or s.params.top_p < 1 or s.params.min_p > 0 for s in seqs):
            logits = apply_filters(
                logits, table[:, 1].long(), table[:, 2].to(logits.dtype),
                table[:, 3].to(logits.dtype),
            )
        probs = torch.softmax(logits, dim=-1)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
        return ops.argmax(probs / noise)

    def _noise(self, like: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Exp(1) noise shaped like `like`: one draw from `self.generator` for all the rows
        without a generator, then one draw per row from its own."""
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(shared) == len(seqs):
            return exponential(torch.empty_like(like), self.generator)
        noise = torch.empty_like(like)
        if shared:
            draw = exponential(like.new_empty(len(shared), like.shape[1]), self.generator)
            noise.index_copy_(0, torch.tensor(shared, device=like.device), draw)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                exponential(noise[i], s.generator)
        return noise


def some_rows(rows: list[int], seqs: list[Sequence], device: torch.device
              ) -> torch.Tensor | None:
    """`rows` as an index on `device`; None when they are all the rows of `seqs` or none."""
    if not rows or len(rows) == len(seqs):
        return None
    return torch.tensor(rows, device=device)


def exponential(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill `out` with Exp(1) noise from `generator`. A generator on another device than
    `out` (a caller that did not pass its device) still works, through a copy."""
    if generator.device.type == out.device.type:
        return out.exponential_(generator=generator)
    noise = torch.empty(out.shape, dtype=out.dtype, device=generator.device)
    return out.copy_(noise.exponential_(generator=generator))


def adjust(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply penalties and logit bias (on a copy, only to the rows that ask)."""
    penalized = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if not penalized and not biased:
        return logits
    logits = logits.clone()
    if penalized:
        apply_penalties(logits, penalized, [seqs[i] for i in penalized])
    if biased:
        apply_logit_bias(logits, biased, [seqs[i].params.logit_bias for i in biased])
    return logits


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """Penalize row `rows[j]` of `logits` in place by `seqs[j]`'s penalties.

    Repetition divides the positive logits of the tokens seen in the prompt and output
    by the penalty and multiplies the negative ones; then frequency and presence subtract
    `frequency * count + presence * [count > 0]`, counting the output tokens.
    """
    device, vocab = logits.device, logits.shape[1]
    params = [s.params for s in seqs]
    counted = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    repeated = any(p.repetition_penalty != 1.0 for p in params)
    outputs = [s.output_ids if counted else [] for s in seqs]
    seen = [s.token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)]
    out_width, seen_width = max(map(len, outputs)), max(map(len, seen))
    # One table, in float64 (which holds token ids exactly): the row, its three penalties,
    # its output ids, its seen ids. Lists are padded with `vocab`, an extra column that the
    # scatters below fill and then drop.
    table = torch.tensor(
        [[row, p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
          *out, *[vocab] * (out_width - len(out)), *ids, *[vocab] * (seen_width - len(ids))]
         for row, p, out, ids in zip(rows, params, outputs, seen)],
        dtype=torch.float64, device=device,
    )
    index = table[:, 0].long()
    x = logits[index].float()
    if repeated:
        ids = table[:, 4 + out_width :].long()
        mask = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        mask = mask.scatter_(1, ids, True)[:, :vocab]
        penalty = table[:, 1:2].float()
        x = torch.where(mask, torch.where(x > 0, x / penalty, x * penalty), x)
    if counted:
        ids = table[:, 4 : 4 + out_width].long()
        counts = torch.zeros(len(rows), vocab + 1, device=device)
        counts = counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))[:, :vocab]
        x -= table[:, 2:3].float() * counts + table[:, 3:4].float() * (counts > 0)
    logits.index_copy_(0, index, x.to(logits.dtype))


def apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[dict[int, float]]
                     ) -> None:
    """Add `biases[j]` (token id to bias) to row `rows[j]` of `logits`, in place."""
    table = torch.tensor(
        [(row, token, value) for row, bias in zip(rows, biases) for token, value in bias.items()],
        dtype=torch.float64, device=logits.device,
    )
    index = (table[:, 0].long(), table[:, 1].long())
    logits.index_put_(index, table[:, 2].to(logits.dtype), accumulate=True)


def apply_filters(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask with -inf what top_k (in 1..vocab), top_p and min_p rule out, per row (the
    best token always stays). min_p is relative to the best token's probability."""
    vocab = logits.shape[1]
    values, order = logits.sort(dim=-1, descending=True)
    positions = torch.arange(vocab, device=logits.device)[None, :]
    drop = positions >= top_k[:, None]
    values = values.masked_fill(drop, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop &= positions > 0
    values = values.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, values)


def read_back(
    raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor | None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The tokens as a list and the logprobs asked for (from the rows `rows` of `raw`, or
    all), read from the device in one copy."""
    result: list[TokenLogprob | None] = [None] * len(seqs)
    asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not asked:
        return tokens.tolist(), result
    k = max(1, max(seqs[i].params.logprobs for i in asked))
    if rows is None:
        values, indices, chosen = ops.topk_logprobs(raw.contiguous(), k, tokens)
    else:
        values, indices, chosen = ops.topk_logprobs(raw[rows], k, tokens[rows])
    # float64 holds the token ids and the float32 logprobs exactly.
    parts = (tokens, chosen, values.flatten(), indices.flatten())
    flat = torch.cat([part.double() for part in parts]).tolist()
    token_ids, flat = [int(t) for t in flat[: len(seqs)]], flat[len(seqs) :]
    m = len(asked)
    chosen_at, top_values, top_ids = flat[:m], flat[m : m + m * k], flat[m + m * k :]
    for j, i in enumerate(asked):
        top = range(j * k, j * k + seqs[i].params.logprobs)
        pairs = [(int(top_ids[c]), top_values[c]) for c in top]
        result[i] = TokenLogprob(token_ids[i], chosen_at[j], pairs)
    return token_ids, result
