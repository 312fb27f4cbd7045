"""Request fields -> SamplingParams: OpenAI's names and JSON types to the engine's, with the
model's defaults for unset fields. The ranges are checked by the engine, once."""

import math
from typing import Any

from xllm.api.errors import invalid, quoted
from xllm.api.protocol import ChatCompletionRequest, SamplingRequest
from xllm.engine.sampling_params import SamplingParams


def _pick(value, defaults: dict, name: str, fallback):
    if value is not None:
        return value
    return defaults.get(name, fallback)


def beam_fields(req: SamplingRequest) -> dict[str, Any]:
    """The SamplingParams fields of the beam search fields (API.md section 3): beam_width
    above 1 searches, not streamed and with n 1; beam_width 1 is greedy decoding."""
    if req.length_penalty is not None and not math.isfinite(req.length_penalty):
        raise invalid("length_penalty must be a finite number", "length_penalty")
    width = req.beam_width
    if width is None:
        return {}
    if width < 1:
        raise invalid("beam_width must be at least 1", "beam_width")
    if width == 1:
        return {"temperature": 0.0}
    if req.stream:
        raise invalid("beam search answers once, with all its beams: send stream false",
                      "stream")
    if req.n not in (None, 1):
        raise invalid("n must be 1 with beam search: beam_width sets how many choices "
                      "come back", "n")
    return {
        "beam_width": width,
        "length_penalty": 1.0 if req.length_penalty is None else req.length_penalty,
        "early_stopping": False if req.early_stopping is None else req.early_stopping,
    }


def check_unserved(req: ChatCompletionRequest) -> None:
    """Tools, function calls and response formats are not served: a request that asks for
    them is refused rather than answered as if it had not."""
    asked = {
        "tools": bool(req.tools),
        "functions": bool(req.functions),
        "tool_choice": req.tool_choice not in (None, "none"),
        "function_call": req.function_call not in (None, "none"),
        "response_format": req.response_format is not None
        and req.response_format != {"type": "text"},
    }
    for name, used in asked.items():
        if used:
            raise invalid(f"{name} is not supported by this server", name)


def check_max_tokens(value: int | None, param: str, scoring: bool = False) -> None:
    """At least 1 token to generate; 0 only to score the prompt (completions' echo)."""
    if value is not None and value < (0 if scoring else 1):
        need = "non-negative" if scoring else "at least 1 (0 only with echo, on completions)"
        raise invalid(f"{param} must be {need}", param)


def _logit_bias(req: SamplingRequest) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {quoted(key)}",
                          "logit_bias") from None
    return bias


def build_sampling_params(
    req: SamplingRequest,
    *,
    defaults: dict,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    **fields: Any,
) -> SamplingParams:
    """The engine's parameters for `req`; unset fields take `defaults` (generation_config),
    else OpenAI's defaults. `fields` are endpoint-specific SamplingParams fields (e.g.
    `max_tokens`; left out, SamplingParams' own default holds)."""
    if isinstance(req.stop, str):
        stop = [req.stop] if req.stop else []
    else:
        stop = [s for s in (req.stop or []) if s]
    top_k = int(_pick(req.top_k, defaults, "top_k", -1))
    beam = beam_fields(req)
    temperature = beam.pop("temperature", None)
    if temperature is None:
        temperature = float(_pick(req.temperature, defaults, "temperature", 1.0))
    return SamplingParams(
        n=1 if req.n is None else req.n,
        temperature=temperature,
        top_p=float(_pick(req.top_p, defaults, "top_p", 1.0)),
        top_k=-1 if top_k == 0 else top_k,  # some generation configs use 0 for "off"
        min_p=float(_pick(req.min_p, defaults, "min_p", 0.0)),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=float(
            _pick(req.repetition_penalty, defaults, "repetition_penalty", 1.0)
        ),
        logit_bias=_logit_bias(req),
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
        **beam,
        **fields,
    )
