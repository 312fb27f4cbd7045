"""/v1/sample's engine side: the next-token distributions at sample points equal the
log-softmax of transformers' logits at the position before each match (same token ids),
within 1e-4, on the default model and on a random-weight one; read from one prefill with
nothing sampled, the prefix cache serving and filling the request."""

from __future__ import annotations

import gc

import pytest
import torch
from hf_oracle import CHAT_QUESTIONS, assert_top_logprobs, hf_prompt_logits, load_hf_folder, run

from xllm.engine.sampling_params import SamplingParams

K = 5


def marked(processor, text: str, mark: str) -> tuple[list[int], list[int]]:
    """The prompt of `text` tokenized around each `mark`, and the sample points (the
    position before each mark)."""
    pieces = []
    for i, part in enumerate(text.split(mark)):
        pieces += [part, mark] if i else [part]
    prompt, starts = processor.pieces(pieces)
    return list(prompt.token_ids), [start - 1 for start in starts[1::2] if start > 0]


def check_points(llm, model, text: str, what: str) -> None:
    ids, points = marked(llm.engine.processor, text, "<emb_0>")
    assert len(points) >= 3
    params = SamplingParams(max_tokens=0, logprobs=K, sample_points=tuple(points))
    steps_before = llm.engine.scheduler.num_preemptions
    out = run(llm, [ids], params)[0]
    choice = out.outputs[0]
    assert choice.token_ids == [] and choice.finish_reason == "length"  # nothing sampled
    assert llm.engine.scheduler.num_preemptions == steps_before
    assert len(choice.logprobs) == len(points)
    ref = torch.log_softmax(hf_prompt_logits(model, ids), dim=-1)
    for point, entry in zip(points, choice.logprobs, strict=True):
        assert_top_logprobs(entry.top, ref[point], K, f"{what} point {point}")


TEXT = ("Question: is the sky blue? <emb_0> Answer: <emb_0> Reason: the light of the sun "
        "is scattered by the air, the blue part most of all. <emb_0> So: <emb_0>")


def test_smollm2_sample_points_match_transformers(smol_llm, smol_hf):
    model, _ = smol_hf
    check_points(smol_llm, model, TEXT, "smollm2")


def test_sample_points_use_and_fill_the_prefix_cache(smol_llm, smol_hf, monkeypatch):
    """A second request on a cached prompt runs only its points' tokens again (without
    writing the cache) and gets the same distributions, transformers' within 1e-4."""
    model, _ = smol_hf
    engine, manager = smol_llm.engine, smol_llm.engine.block_manager
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    ids, _ = marked(engine.processor, text + " <emb_0>", "<emb_0>")
    params = SamplingParams(max_tokens=0, logprobs=K, sample_points=(10, 50, len(ids) - 6))
    first = run(smol_llm, [ids], params)[0].outputs[0].logprobs
    hits = manager.hits
    runner_run, computed = engine.runner.run, []

    def counted(batch):
        computed.extend(len(s.token_ids) for s in batch)
        return runner_run(batch)

    monkeypatch.setattr(engine.runner, "run", counted)
    again = run(smol_llm, [ids], params)[0].outputs[0].logprobs
    monkeypatch.undo()
    assert manager.hits > hits, "the second request found nothing in the prefix cache"
    assert sum(computed) < len(ids) // 4, f"{sum(computed)} of {len(ids)} tokens run again"
    ref = torch.log_softmax(hf_prompt_logits(model, ids), dim=-1)
    for point, want, got in zip(params.sample_points, first, again, strict=True):
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)
        assert_top_logprobs(got.top, ref[point], K, f"cached point {point}")


@pytest.fixture(scope="module")
def tiny(tiny_folders):
    from xllm.engine.llm import LLM

    folder = tiny_folders["llama-gqa4-untied"]
    llm = LLM(model=str(folder), max_model_len=256, num_blocks=64)
    yield llm, load_hf_folder(folder)
    del llm
    gc.collect()


def test_tiny_sample_points_match_transformers(tiny):
    llm, model = tiny
    check_points(llm, model, f"{CHAT_QUESTIONS[0]} <emb_0> {TEXT}", "tiny")


def test_a_cached_point_that_requests_share_runs_once(smol_llm, monkeypatch):
    """Sample requests on one cached prompt, in one step: each point runs once for all."""
    engine = smol_llm.engine
    text = " ".join(["A stitch in time saves nine, they say."] * 10)
    ids, _ = marked(engine.processor, text + " <emb_0>", "<emb_0>")
    params = SamplingParams(max_tokens=0, logprobs=K, sample_points=(20, 40, 60))
    assert len(ids) > 80  # every point lies in cached blocks: nothing else runs again
    run(smol_llm, [ids], SamplingParams(max_tokens=0))  # the prompt into the cache
    alone = run(smol_llm, [ids], params)[0].outputs[0].logprobs
    runner_run, computed = engine.runner.run, []

    def counted(batch):
        computed.extend(len(s.token_ids) for s in batch if not s.write_kv)
        return runner_run(batch)

    monkeypatch.setattr(engine.runner, "run", counted)
    outs = run(smol_llm, [ids] * 4, params)
    monkeypatch.undo()
    assert sum(computed) == 3, f"{sum(computed)} cached points run for 4 x 3 asked"
    for out in outs:
        for got, want in zip(out.outputs[0].logprobs, alone, strict=True):
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
            assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)
