"""The server's tokenizer, chat template and greedy decoding held against transformers.

The server's greedy answer and `usage.prompt_tokens` for a few conversations must be what
transformers gives on the same model folder: `AutoTokenizer.apply_chat_template(...,
add_generation_prompt=True)` for the prompt and `AutoModelForCausalLM.generate(do_sample=False)`
in float32 for the answer, token for token (up to a near tie of the oracle, if one comes).
"""

from __future__ import annotations

import pytest
import requests
import torch

MODEL = "Qwen2-7B-Instruct"
MAX_TOKENS = 24
NEAR_TIE = 1e-4  # a top-2 logit gap below this may fall either way
MIN_COMPARED = 3

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of Japan?"},
    ],
    "user_only": [{"role": "user", "content": "Write a haiku about autumn."}],
    "multi_turn": [
        {"role": "user", "content": "Hi! My name is Ana."},
        {"role": "assistant", "content": "Hello Ana, nice to meet you."},
        {"role": "user", "content": "What is my name?"},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple."},
        {"role": "user", "content": "And a vegetable?"},
    ],
    "non_ascii": [
        {"role": "system", "content": "Tu es un assistant francophone."},
        {"role": "user", "content": "Bonjour ! Où se trouve la tour Eiffel ? Réponds « vite »."},
    ],
}


@pytest.fixture(scope="module")
def oracle():
    """(tokenizer, model) of the default model's folder, loaded by transformers in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xllm.model.loader import resolve_model

    folder = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return tokenizer, model


def oracle_generate(tokenizer, model, messages: list[dict]) -> tuple[list[int], list[int], list]:
    """(prompt ids, generated ids with the end-of-sequence token if one came, top-2 gaps)."""
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompt_ids = list(prompt_ids)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new_ids = out.sequences[0, len(prompt_ids) :].tolist()
    gaps = []
    for logits in out.logits:
        top2 = logits[0].float().topk(2).values
        gaps.append((top2[0] - top2[1]).item())
    return prompt_ids, new_ids, gaps


def test_oracle_eos_is_the_servers(oracle):
    """The oracle stops where the server does: on the folder's end-of-sequence token."""
    tokenizer, model = oracle
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    assert tokenizer.eos_token_id in eos


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_matches_transformers(server_url, oracle, name):
    tokenizer, model = oracle
    messages = CONVERSATIONS[name]
    prompt_ids, new_ids, gaps = oracle_generate(tokenizer, model, messages)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": True}  # fmt: skip
    resp = requests.post(f"{server_url}/v1/chat/completions", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    choice = data["choices"][0]
    content = choice["message"]["content"]
    server_tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    oracle_tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in new_ids]

    # the prompt: the server's template and tokenizer give the oracle's token count
    assert data["usage"]["prompt_tokens"] == len(prompt_ids), (
        data["usage"],
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
    )

    tie = next((k for k, gap in enumerate(gaps) if gap < NEAR_TIE), None)
    if tie is None:
        assert server_tokens == oracle_tokens, (content, oracle_tokens)
        assert content == tokenizer.decode(new_ids, skip_special_tokens=True)
        assert data["usage"]["completion_tokens"] == len(new_ids)
        ended = bool(new_ids) and new_ids[-1] in eos
        assert choice["finish_reason"] == ("stop" if ended else "length")
    else:
        # tokens up to the tie must agree; past it either choice is right
        assert tie >= MIN_COMPARED, f"near tie at token {tie}: too little compared ({gaps})"
        assert server_tokens[:tie] == oracle_tokens[:tie], (content, oracle_tokens)
        assert content.startswith(tokenizer.decode(new_ids[:tie], skip_special_tokens=True))
