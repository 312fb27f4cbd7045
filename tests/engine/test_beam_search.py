"""Beam search against transformers' `generate(num_beams=W, num_return_sequences=W)` on the
same weights: the same tokens for every returned beam, in the same order, scores within 1e-4;
and its blocks: shared by reference, copied on write, bounded, all free at the end, a
preempted group recomputed to the same result."""

from __future__ import annotations

import gc

import pytest
import torch
from hf_oracle import CHAT_QUESTIONS, chat_ids, hf_text_prompts, load_hf_folder, one_thread, run

from xllm.engine.sampling_params import SamplingParams

SCORE_TOL = 1e-4
GRID = [(lp, es) for lp in (0.0, 1.0, 2.0) for es in (True, False)] + [(1.0, "never")]


@torch.no_grad()
def hf_beams(model, prompt: list[int], width: int, max_new_tokens: int, enders: list[int],
             length_penalty: float = 1.0, early_stopping: bool | str = False
             ) -> list[tuple[list[int], float | None]]:
    """transformers' returned beams, best first: (generated tokens up to and with the ender
    that finished them, score)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, num_beams=width, num_return_sequences=width,
        max_new_tokens=max_new_tokens, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_token_id=enders, pad_token_id=enders[0],
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    ids = torch.tensor([prompt])
    with one_thread():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    beams = []
    scores = out.sequences_scores.tolist() if width > 1 else [None]  # 1: greedy, no score
    for seq, score in zip(out.sequences, scores, strict=True):
        tokens = seq[len(prompt):].tolist()
        end = next((i for i, t in enumerate(tokens) if t in enders), None)
        beams.append((tokens if end is None else tokens[: end + 1], score))
    return beams


def check_beams(out, ref: list[tuple[list[int], float]], what: str, enders: list[int]
                ) -> None:
    got = [(c.token_ids, c.score) for c in out.outputs]
    assert [t for t, _ in got] == [t for t, _ in ref], f"{what}: tokens\n{got}\nvs\n{ref}"
    for rank, ((_, score), (_, want)) in enumerate(zip(got, ref, strict=True)):
        assert abs(score - want) <= SCORE_TOL, f"{what} beam {rank}: score {score} vs {want}"
    for choice in out.outputs:
        ended = choice.token_ids[-1] in enders
        assert choice.finish_reason == ("stop" if ended else "length"), what


def beam_params(width: int, max_tokens: int, lp: float = 1.0, es: bool | str = False,
                **fields) -> SamplingParams:
    return SamplingParams(beam_width=width, max_tokens=max_tokens, length_penalty=lp,
                          early_stopping=es, **fields)


@pytest.fixture(scope="module")
def smol_prompts(smol_hf) -> dict[str, list[int]]:
    """A chat question the model answers briefly (EOS ends beams early) and a text that
    runs on (max_tokens ends the search)."""
    _, tokenizer = smol_hf
    return {"eos": chat_ids(tokenizer, "Name three colors."),
            "length": hf_text_prompts(tokenizer, [40])[0]}


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize(("lp", "es"), GRID)
@pytest.mark.parametrize("prompt", ["eos", "length"])
def test_smollm2_beams_match_transformers(smol_llm, smol_hf, smol_prompts, width, lp, es,
                                          prompt):
    model, _ = smol_hf
    ids, max_tokens = smol_prompts[prompt], 12
    ref = hf_beams(model, ids, width, max_tokens, [2], lp, es)
    out = run(smol_llm, [ids], beam_params(width, max_tokens, lp, es))[0]
    check_beams(out, ref, f"W={width} lp={lp} es={es} {prompt}", [2])
    if prompt == "eos":
        assert any(c.finish_reason == "stop" for c in out.outputs)


def test_smollm2_beam_width_one_is_greedy(smol_llm, smol_hf, smol_prompts):
    model, _ = smol_hf
    for ids in smol_prompts.values():
        ref = hf_beams(model, ids, 1, 12, [2])
        out = run(smol_llm, [ids], SamplingParams(temperature=0.0, max_tokens=12))[0]
        assert out.outputs[0].token_ids == ref[0][0]


def test_beam_logprobs_are_the_chosen_candidates(smol_llm, smol_prompts):
    ids = smol_prompts["eos"]
    out = run(smol_llm, [ids], beam_params(3, 10, logprobs=4))[0]
    for choice in out.outputs:
        assert len(choice.logprobs) == len(choice.token_ids)
        total = 0.0
        for token, entry in zip(choice.token_ids, choice.logprobs, strict=True):
            assert entry.token_id == token and len(entry.top) == 4
            tops = [v for _, v in entry.top]
            assert tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-6
            total += entry.logprob
        length = len(choice.token_ids)
        assert abs(total / length - choice.score) < 1e-4  # length_penalty 1


# --- a tiny random model: near ties are common, and a frequent token ends beams ----------


@pytest.fixture(scope="module")
def tiny(tiny_folders):
    from xllm.engine.llm import LLM

    folder = tiny_folders["qwen2-gqa-untied"]
    llm = LLM(model=str(folder), max_model_len=256, num_blocks=96, max_num_seqs=16)
    yield load_hf_folder(folder).float(), llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def tiny_prompt(smol_hf) -> list[int]:
    _, tokenizer = smol_hf
    return chat_ids(tokenizer, CHAT_QUESTIONS[0])


@pytest.fixture(scope="module")
def tiny_ender(tiny, tiny_prompt) -> int:
    """A token the tiny model likes to produce: made an ender, it ends beams early."""
    _, llm = tiny
    out = llm.generate([tiny_prompt], SamplingParams(temperature=0.0, max_tokens=24,
                                                      ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    return max(set(tokens[4:]), key=tokens.count)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize(("lp", "es"), GRID)
def test_tiny_beams_match_transformers(tiny, tiny_prompt, tiny_ender, width, lp, es):
    model, llm = tiny
    eos = next(iter(llm.engine.tokenizer.eos_token_ids))
    ref = hf_beams(model, tiny_prompt, width, 16, [eos, tiny_ender], lp, es)
    params = beam_params(width, 16, lp, es, stop_token_ids=[tiny_ender])
    out = run(llm, [tiny_prompt], params)[0]
    check_beams(out, ref, f"tiny W={width} lp={lp} es={es}", [eos, tiny_ender])


# --- blocks ----------------------------------------------------------------------------


def test_blocks_stay_within_the_bound_and_are_freed(smol_llm, smol_prompts, monkeypatch):
    engine = smol_llm.engine
    manager, width = engine.block_manager, 4
    ids = smol_prompts["length"]
    bs = manager.block_size
    step, seen = engine.step, []

    def watched():
        outputs = step()
        for request in engine.requests.values():
            if request.beam is not None:
                generated = request.beam.num_generated
                seen.append((manager.num_blocks - manager.num_free_blocks, generated))
        return outputs

    monkeypatch.setattr(engine, "step", watched)
    out = run(smol_llm, [ids], beam_params(width, 40, ignore_eos=True))[0]
    monkeypatch.undo()
    assert len(seen) >= 39 and all(len(c.token_ids) == 40 for c in out.outputs)
    prompt_blocks = -(-len(ids) // bs)
    for used, generated in seen:
        bound = prompt_blocks + width * (-(-generated // bs) + 1)
        assert used <= bound, f"{used} blocks in use after {generated} tokens (bound {bound})"


def test_a_preempted_group_gives_the_same_beams(smol_hf, smol_prompts, monkeypatch):
    """Beams and greedy requests share batches; with too few blocks for all of them the
    scheduler preempts the beam group (all its beams at once), which is recomputed later,
    and every result equals the one computed alone."""
    from xllm.engine.llm import LLM

    _, tokenizer = smol_hf
    ids = smol_prompts["length"]
    others = hf_text_prompts(tokenizer, [30, 45, 50])
    beam = beam_params(3, 48, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    roomy = LLM("default", max_model_len=256, num_blocks=256)
    alone = run(roomy, [ids], beam)[0]
    alone_greedy = run(roomy, others, greedy)
    del roomy
    tight = LLM("default", max_model_len=256, num_blocks=20)
    scheduler = tight.engine.scheduler
    preempt, victims = scheduler._preempt, []

    def watched(victim):
        victims.append(victim.beams is not None)
        before = len(scheduler.running)
        preempt(victim)
        if victim.beams is not None:  # the whole group left the running list
            assert before - len(scheduler.running) == 3
            assert all(not seq.block_table for seq in victim.beams)

    monkeypatch.setattr(scheduler, "_preempt", watched)
    outs = run(tight, [*others, ids], [greedy] * len(others) + [beam])
    assert any(victims), "the beam group was never preempted"
    assert [c.token_ids for c in outs[-1].outputs] == [c.token_ids for c in alone.outputs]
    for got, want in zip(outs, alone_greedy):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_a_stop_string_ends_a_beam_like_eos(smol_llm, smol_prompts):
    ids = smol_prompts["length"]
    free = run(smol_llm, [ids], beam_params(2, 16, ignore_eos=True))[0]
    words = free.outputs[0].text.split()
    stop = words[len(words) // 2]  # a word the best beam reaches midway
    out = run(smol_llm, [ids], beam_params(2, 16, ignore_eos=True, stop=[stop]))[0]
    assert len(out.outputs) == 2
    assert any(c.finish_reason == "stop" for c in out.outputs)
    for choice in out.outputs:
        assert stop not in choice.text
        if choice.finish_reason == "stop":
            assert len(choice.token_ids) < 16
