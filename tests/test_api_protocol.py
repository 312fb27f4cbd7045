"""Unit tests of the API layer's pure helpers: request models, errors, params, SSE, CLI flags."""

import argparse
import json
import math

import pytest
from pydantic import ValidationError

from xllm.api.chat import message_content
from xllm.api.completions import split_prompts
from xllm.api.errors import APIError, from_engine_error, from_validation_error
from xllm.api.logprobs import CompletionLogprobs, chat_logprobs, finite
from xllm.api.params import beam_fields, build_sampling_params
from xllm.api.protocol import ChatCompletionRequest, CompletionRequest
from xllm.api.streaming import ChunkWriter
from xllm.cli import build_parser, engine_config, parse_size, served_model_name
from xllm.config import EngineConfig
from xllm.engine.errors import InvalidParameter
from xllm.engine.outputs import TokenLogprob
from xllm.engine.processor import InputProcessor
from xllm.inputs import PromptInput

VOCAB = 1000


def chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def params_for(req, defaults=None, max_tokens=16, logprobs=None):
    return build_sampling_params(req, max_tokens=max_tokens, logprobs=logprobs,
                                 defaults=defaults or {})


def check(prompt_len: int, params, max_model_len: int = 128) -> None:
    """The engine's request check (no tokenizer needed), as the API answers it."""
    defaults = EngineConfig()
    processor = InputProcessor(None, max_model_len, VOCAB, defaults.max_n,
                               defaults.max_beam_width)
    try:
        processor.check(PromptInput.of([1] * prompt_len), params)
    except InvalidParameter as exc:
        raise from_engine_error(exc) from None


# --- request models -----------------------------------------------------------------------


def test_unknown_fields_are_ignored():
    req = chat(frequency_penalty=0.5, tools=[], response_format={"type": "text"}, foo=1)
    assert req.frequency_penalty == 0.5 and not hasattr(req, "foo")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "10"), ("temperature", "hot"), ("stream", "yes"), ("n", 1.5),
    ("messages", "hello"), ("stop", 5), ("logprobs", 3),
])
def test_wrong_json_types_are_rejected(field, value):
    with pytest.raises(ValidationError) as info:
        chat(**{field: value})
    err = from_validation_error(info.value)
    assert err.status == 400 and err.param == field


@pytest.mark.parametrize("prompt,expected", [
    ("a", ["a"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, expected):
    req = CompletionRequest.model_validate_json(json.dumps({"model": "m", "prompt": prompt}))
    assert split_prompts(req.prompt) == expected


def test_empty_prompt_list_is_400():
    with pytest.raises(APIError) as info:
        split_prompts([])
    assert info.value.status == 400


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b'"text"', b""])
def test_malformed_or_non_object_body_is_400(raw):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(raw)
    body = from_validation_error(info.value).body()
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == "INVALID_ARGUMENT"


def test_missing_field_names_it():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b'{"messages": []}')
    err = from_validation_error(info.value)
    assert err.param == "model" and "model" in err.message


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("status,code", [
    (400, "INVALID_ARGUMENT"), (404, "UNKNOWN"), (429, "RESOURCE_EXHAUSTED"),
    (500, "INTERNAL"), (503, "UNAVAILABLE"),
])
def test_status_names(status, code):
    assert APIError(status, "x").body()["error"]["code"] == code


def test_invalid_parameter_names_its_field_and_can_be_renamed():
    err = from_engine_error(InvalidParameter.must("top_p", "must be in (0, 1]"))
    assert (err.status, err.param, err.message) == (400, "top_p", "top_p must be in (0, 1]")
    err = from_engine_error(InvalidParameter.must("logprobs", "must be in [0, 20]"),
                            {"logprobs": "top_logprobs"})
    assert (err.param, err.message) == ("top_logprobs", "top_logprobs must be in [0, 20]")


# --- sampling params ----------------------------------------------------------------------


def test_unset_fields_take_generation_config_then_openai_defaults():
    p = params_for(chat(), defaults={"temperature": 0.3, "top_p": 0.9})
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.n) == (0.3, 0.9, -1, 1.0, 1)
    p = params_for(chat(temperature=0, top_p=1))
    assert p.temperature == 0.0 and p.top_p == 1.0
    p = params_for(chat(temperature=0.0), defaults={"temperature": 0.3})
    assert p.temperature == 0.0


def test_fields_reach_sampling_params():
    req = chat(stop="END", stop_token_ids=[7], logit_bias={"5": -100, "9": 2.5}, seed=3, n=2,
               presence_penalty=0.5, ignore_eos=True, skip_special_tokens=False,
               include_stop_str_in_output=True, top_k=40, min_p=0.1)
    p = params_for(req, logprobs=2)
    assert p.stop == ["END"] and p.stop_token_ids == [7]
    assert p.logit_bias == {5: -100.0, 9: 2.5}
    assert (p.seed, p.n, p.presence_penalty, p.top_k, p.min_p) == (3, 2, 0.5, 40, 0.1)
    assert p.ignore_eos and not p.skip_special_tokens and p.include_stop_str_in_output
    assert p.logprobs == 2 and p.max_tokens == 16


@pytest.mark.parametrize("fields,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_k": 0, "min_p": 2}, "min_p"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    ({"logit_bias": {"1": 500}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_out_of_range_is_400(fields, param):
    with pytest.raises(APIError) as info:
        check(4, params_for(chat(**fields)))
    assert info.value.status == 400 and info.value.param == param


def test_beam_fields_become_engine_fields():
    assert beam_fields(chat()) == {}
    assert beam_fields(chat(beam_width=1)) == {"temperature": 0.0}  # greedy
    assert beam_fields(chat(beam_width=3, length_penalty=0.5, early_stopping="never")) == {
        "beam_width": 3, "length_penalty": 0.5, "early_stopping": "never"}
    params = params_for(chat(beam_width=2, temperature=0.7))
    assert params.beam_width == 2 and params.num_choices == 2


@pytest.mark.parametrize(("fields", "param"), [
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 2, "stream": True}, "stream"),
    ({"beam_width": 2, "n": 2}, "n"),
    ({"beam_width": 2, "length_penalty": float("inf")}, "length_penalty"),
])  # fmt: skip
def test_beam_fields_refused(fields, param):
    with pytest.raises(APIError) as info:
        beam_fields(chat(**fields))
    assert info.value.status == 400 and info.value.param == param


def test_beam_width_above_the_server_limit_is_refused():
    with pytest.raises(APIError) as info:
        check(4, params_for(chat(beam_width=9)))
    assert info.value.param == "beam_width" and "at most 8" in info.value.message


def test_prompt_length_checks_name_the_numbers():
    check(100, params_for(chat(), max_tokens=28))
    check(127, params_for(chat(), max_tokens=None))
    with pytest.raises(APIError) as info:
        check(100, params_for(chat(), max_tokens=29))
    assert all(str(x) in info.value.message for x in (100, 29, 128))
    assert info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        check(128, params_for(chat(), max_tokens=None))
    assert "128" in info.value.message and info.value.status == 400
    assert info.value.param == "prompt"


# --- chat content -------------------------------------------------------------------------


def test_text_parts_are_joined_and_images_refused():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert message_content(parts, "messages[0]", None) == "ab"
    assert message_content(None, "messages[0]", None) == ""
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
    with pytest.raises(APIError) as info:
        message_content(image, "messages[0]", None)
    assert info.value.status == 400


# --- logprobs and SSE ---------------------------------------------------------------------


class _Tokens:
    """Token i is the letter chr(97 + i)."""

    def token_text(self, token_id: int) -> str:
        return chr(97 + token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        return [97 + token_id]


def test_chat_logprobs_shape():
    [entry] = chat_logprobs(_Tokens(), [TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.5)])])
    assert entry == {
        "token": "b", "logprob": -0.5, "bytes": [98],
        "top_logprobs": [{"token": "b", "logprob": -0.5, "bytes": [98]},
                         {"token": "c", "logprob": -1.5, "bytes": [99]}],
    }


def test_completion_logprobs_offsets_run_on_across_chunks():
    acc = CompletionLogprobs(_Tokens())
    acc.add([None, TokenLogprob(1, -1.0, [(0, -0.1)])], [0, 1])
    first = acc.take()
    assert first == {"tokens": ["a", "b"], "token_logprobs": [None, -1.0],
                     "top_logprobs": [None, {"a": -0.1}], "text_offset": [0, 1]}
    acc.add([TokenLogprob(2, -float("inf"), [])])
    second = acc.take()
    assert second["text_offset"] == [2] and math.isfinite(second["token_logprobs"][0])
    assert finite(float("nan")) < -1000


def test_chunks_share_head_and_usage_chunk_has_no_choices():
    writer = ChunkWriter("cmpl-1", "text_completion", 123, "m", include_usage=True)
    events = [writer.choice({"index": 0, "text": "é"}), writer.usage({"total_tokens": 3})]
    for event in events:
        assert event.startswith("data: ") and event.endswith("\n\n")
    a, b = (json.loads(e[len("data: "):]) for e in events)
    assert {k: a[k] for k in ("id", "object", "created", "model")} == \
        {k: b[k] for k in ("id", "object", "created", "model")}
    assert a["choices"][0]["text"] == "é" and a["usage"] is None
    assert b["choices"] == [] and b["usage"] == {"total_tokens": 3}


# --- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,size", [
    ("1073741824", 1 << 30), ("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
    ("64kb", 64 << 10),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "2X", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_served_model_name():
    assert served_model_name("default", None) == "SmolLM2-135M-Instruct"
    assert served_model_name("/models/Qwen2-7B-Instruct/", None) == "Qwen2-7B-Instruct"
    assert served_model_name("default", "Qwen2-7B-Instruct") == "Qwen2-7B-Instruct"


def test_serve_flags_and_help():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert args.port == 9977 and args.model == "default"
    serve = parser._subparsers._group_actions[0].choices["serve"]
    help_text = serve.format_help()
    flags = ["--model", "--served-model-name", "--host", "--port", "--max-model-len",
             "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-memory", "--num-blocks",
             "--block-size", "--dtype", "--seed", "--max-concurrent-requests", "--log-level"]
    for flag in flags:
        assert flag in help_text
    args = parser.parse_args(["serve", "--kv-cache-memory", "2G", "--port", "1234"])
    assert args.kv_cache_memory == 2 << 30 and args.port == 1234
    assert engine_config(args).matmul_precision == "highest"
    assert engine_config(args).kv_cache_dtype == "auto"
    args = parser.parse_args(["serve", "--matmul-precision", "medium",
                              "--kv-cache-dtype", "bfloat16"])
    assert engine_config(args).matmul_precision == "medium"
    assert engine_config(args).kv_cache_dtype == "bfloat16"
