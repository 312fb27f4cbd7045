"""The sampler alone, on made-up logits (no model): penalties, bias, filters, noise, devices."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xllm.engine.sampler import Sampler, adjust, apply_filters, seeded_generator
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.sequence import Sequence
from xllm.inputs import PromptInput

VOCAB = 64

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def make_seq(prompt: list[int], output: list[int] | tuple[int, ...] = (), generator=None,
             **params) -> Sequence:
    seq = Sequence("r", 0, PromptInput.of(prompt), SamplingParams(**params), generator=generator)
    seq.token_ids.extend(output)
    return seq


def reference_adjust(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Penalties and bias row by row, written out plainly."""
    logits = logits.clone()
    for row, seq in zip(logits, seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            for token in set(seq.token_ids):
                value = row[token]
                row[token] = value / p.repetition_penalty if value > 0 else (
                    value * p.repetition_penalty)
        for token, count in Counter(seq.output_ids).items():
            row[token] -= p.frequency_penalty * count + p.presence_penalty
        for token, bias in (p.logit_bias or {}).items():
            row[token] += bias
    return logits


def penalty_batch() -> list[Sequence]:
    """Rows with different penalties and biases, and rows with none."""
    return [
        make_seq([1, 2, 3], [4, 4, 5]),
        make_seq([1, 2, 3, 9], [4, 4, 5, 1], repetition_penalty=1.5),
        make_seq([7], [8, 8, 8, 2], frequency_penalty=0.7),
        make_seq([7, 8], [8, 30, 30], presence_penalty=1.2, logit_bias={0: 5.0, 63: -3.5}),
        make_seq([5, 6, 5], [], repetition_penalty=0.8, frequency_penalty=-0.5),
        make_seq([10, 11], [12, 12, 10, 13, 12], repetition_penalty=2.0, frequency_penalty=0.3,
                 presence_penalty=-1.0, logit_bias={12: 2.0}),
        make_seq([40, 41], [42], logit_bias={42: -100.0, 3: 100.0}),
        make_seq([1], [2, 3], temperature=0.7, top_k=5),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_and_bias_match_a_per_row_reference(device):
    torch.manual_seed(0)
    logits = torch.randn(8, VOCAB, device=device) * 3
    seqs = penalty_batch()
    before = logits.clone()
    got = adjust(logits, seqs)
    assert torch.equal(logits, before), "adjust changed its input"
    expected = reference_adjust(logits.cpu(), seqs)
    torch.testing.assert_close(got.cpu(), expected)
    for i in (0, 7):  # no penalty and no bias: untouched
        assert torch.equal(got[i], logits[i])


def test_adjust_without_penalties_returns_the_logits_unchanged():
    logits = torch.randn(2, VOCAB)
    seqs = [make_seq([1, 2], [3]), make_seq([4], [], temperature=0.5)]
    assert adjust(logits, seqs) is logits


def test_repetition_penalty_alone_skips_the_counts():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    (got,) = adjust(logits, [make_seq([0, 1], [0], repetition_penalty=2.0)])
    assert got.tolist() == [1.0, -4.0, 1.0, -1.0]


# --- filters ---


def filter_rows(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Five rows of the same distribution in a scrambled order, and that order."""
    probs = torch.tensor([0.05, 0.5, 0.1, 0.25, 0.02, 0.08], device=device)
    return probs.log().expand(5, -1).contiguous(), probs.argsort(descending=True)


@pytest.mark.parametrize("device", DEVICES)
def test_filters_mask_what_they_rule_out(device):
    logits, order = filter_rows(device)
    top_k = torch.tensor([2, 6, 6, 6, 6], device=device)
    top_p = torch.tensor([1.0, 0.6, 1.0, 1e-6, 1.0], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.15, 0.0, 0.0], device=device)
    got = apply_filters(logits, top_k, top_p, min_p)
    # top_k 2; top_p 0.6 (the likelier tokens before the third hold 0.75); min_p 0.15
    # (probability 0.075 at least); a tiny top_p keeps the best; nothing filters the last.
    kept = [2, 2, 4, 1, 6]
    for row, n in zip(got, kept):
        finite = row.isfinite()
        assert sorted(finite.nonzero().flatten().tolist()) == sorted(order[:n].tolist())
        assert torch.equal(row[finite], logits[0][finite])


@pytest.mark.parametrize("device", DEVICES)
def test_filters_combine(device):
    logits, order = filter_rows(device)
    got = apply_filters(logits[:1], torch.tensor([3], device=device),
                        torch.tensor([0.6], device=device), torch.tensor([0.0], device=device))
    assert sorted(got[0].isfinite().nonzero().flatten().tolist()) == sorted(order[:2].tolist())


# --- noise and seeds ---


def sampled_batch(generators: list[torch.Generator | None], **params) -> list[Sequence]:
    params = {"temperature": 1.0, **params}
    return [make_seq([1, 2], [3], generator=g, **params) for g in generators]


def test_unseeded_rows_draw_their_noise_in_one_call(monkeypatch):
    sampler = Sampler(0)
    draw = torch.Tensor.exponential_
    calls = []

    def spy(self, *args, generator=None, **kwargs):
        calls.append((generator, tuple(self.shape)))
        return draw(self, *args, generator=generator, **kwargs)

    monkeypatch.setattr(torch.Tensor, "exponential_", spy)
    seeded = [seeded_generator(5, 0), seeded_generator(5, 1)]
    seqs = sampled_batch([None, seeded[0], None, None, seeded[1], None])
    seqs.insert(3, make_seq([1], [], temperature=0.0))  # greedy: no noise
    sampler(torch.randn(len(seqs), VOCAB), seqs)
    shared = [shape for gen, shape in calls if gen is sampler.generator]
    assert shared == [(4, VOCAB)]
    assert sorted(shape for gen, shape in calls if gen is not sampler.generator) == [
        (VOCAB,), (VOCAB,)]
    assert [gen for gen, _ in calls if gen is not sampler.generator] == seeded

    calls.clear()
    sampler(torch.randn(5, VOCAB), sampled_batch([None] * 5))
    assert calls == [(sampler.generator, (5, VOCAB))]


def run_steps(sampler: Sampler, batch: list[Sequence], step_logits: list[torch.Tensor],
              row: int) -> list[int]:
    """The tokens of `batch[row]` over steps whose logits for that row are `step_logits`."""
    picked = []
    for logits in step_logits:
        full = torch.randn(len(batch), VOCAB, device=logits.device) * 0.5
        full[row] = logits
        tokens, _ = sampler(full, batch)
        picked.append(tokens[row])
    return picked


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_repeat_whatever_the_batch(device):
    torch.manual_seed(1)
    steps = [torch.randn(VOCAB, device=device) * 0.5 for _ in range(12)]

    def seeded(index: int = 0, seed: int = 1234) -> Sequence:
        return make_seq([1, 2], [], generator=seeded_generator(seed, index, device),
                        temperature=0.9, top_k=40)

    alone = run_steps(Sampler(0, device), [seeded()], steps, 0)
    mixed = [make_seq([3], [4], temperature=1.0), make_seq([5], [], temperature=0.0),
             seeded(), make_seq([6], [6], generator=seeded_generator(7, 0, device),
                                temperature=1.2, repetition_penalty=1.3)]
    assert run_steps(Sampler(99, device), mixed, steps, 2) == alone
    assert len(set(alone)) > 3, "the seeded row barely varies: the test decides nothing"
    assert run_steps(Sampler(0, device), [seeded(index=1)], steps, 0) != alone
    assert run_steps(Sampler(0, device), [seeded(seed=4321)], steps, 0) != alone


def test_sampler_follows_the_distribution():
    """The batched race draws from softmax(logits / T), shared and seeded rows alike."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    temperature = 0.8
    logits = (probs.log() * temperature).expand(4000, -1).contiguous()
    generators = [seeded_generator(i, 0) if i % 4 == 0 else None for i in range(len(logits))]
    tokens, _ = Sampler(3)(logits, sampled_batch(generators, temperature=temperature))
    counts = Counter(tokens)
    n = len(tokens)
    chi2 = sum((counts[t] - p * n) ** 2 / (p * n) for t, p in enumerate(probs.tolist()))
    assert set(counts) <= {0, 1, 2, 3}
    assert chi2 < 21.0, f"{counts} (3 degrees of freedom: P(chi2 > 21) is about 1e-4)"


# --- devices and read-back ---


class Recorder(TorchDispatchMode):
    """Records each op's name and the devices of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.device]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [t.device for t in flat if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("device", DEVICES)
def test_everything_stays_on_the_logits_device(device):
    torch.manual_seed(2)
    logits = torch.randn(8, VOCAB, device=device) * 2
    seqs = penalty_batch()
    seqs[0].params.temperature = 0.0
    seqs[1].params.temperature = 0.0
    seqs[2].params.logprobs = 3
    seqs[3].params.logprobs = 0
    seqs[4].generator = seeded_generator(11, 0, device)
    seqs[5].params.top_p = 0.9
    seqs[6].params.min_p = 0.1
    sampler = Sampler(0, device)
    with Recorder() as recorder:
        tokens, logprobs = sampler(logits, seqs)
    assert recorder.ops
    target = torch.device(device).type
    off = [(name, devices) for name, devices in recorder.ops
           if any(d.type != target for d in devices)]
    if target == "cpu":
        assert not off
    else:  # the one read-back: tokens and logprobs in one copy
        assert [name for name, _ in off] == ["aten._to_copy.default"], off
        scalars = [name for name, _ in recorder.ops if "_local_scalar_dense" in name]
        assert not scalars, "a hidden read-back of a single value"

    # Right answers: greedy rows follow the adjusted argmax, bias +100 forces its token,
    # top_k keeps the sampled row among its best, logprobs are the raw distribution's.
    adjusted = reference_adjust(logits.cpu(), seqs)
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == int(adjusted[1].argmax())
    assert tokens[6] == 3
    assert tokens[7] in adjusted[7].topk(5).indices.tolist()
    raw = torch.log_softmax(logits.cpu().float(), dim=-1)
    for i, seq in enumerate(seqs):
        if seq.params.logprobs is None:
            assert logprobs[i] is None
            continue
        entry = logprobs[i]
        assert entry.token_id == tokens[i]
        assert math.isclose(entry.logprob, float(raw[i, tokens[i]]), abs_tol=1e-4)
        top = raw[i].topk(seq.params.logprobs)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), top.values)


@pytest.mark.parametrize("device", DEVICES)
def test_generators_live_on_the_device(device):
    assert Sampler(0, device).generator.device.type == torch.device(device).type
    assert seeded_generator(1, 2, device).device.type == torch.device(device).type
    first = torch.empty(8, device=device).exponential_(generator=seeded_generator(1, 0, device))
    again = torch.empty(8, device=device).exponential_(generator=seeded_generator(1, 0, device))
    other = torch.empty(8, device=device).exponential_(generator=seeded_generator(1, 1, device))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_generators_serve_any_device(device):
    """CPU generators (a caller that did not pass its device) still sample right."""
    logits = torch.full((3, VOCAB), -10.0, device=device)
    logits[:, 7] = 10.0
    seqs = sampled_batch([None, seeded_generator(3, 0), None])
    assert Sampler(0)(logits, seqs)[0] == [7, 7, 7]
