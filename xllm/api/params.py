"""Request fields -> SamplingParams, with the model's defaults and the context-length checks."""

from xllm.api.errors import from_value_error, invalid
from xllm.api.protocol import SamplingRequest
from xllm.engine.sampling_params import SamplingParams

MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _pick(value, defaults: dict, name: str, fallback):
    if value is not None:
        return value
    return defaults.get(name, fallback)


def check_beam_fields(req: SamplingRequest) -> None:
    """Beam search is accepted in the models but not served yet."""
    if req.beam_width is None:
        return
    if req.beam_width < 1:
        raise invalid("beam_width must be at least 1", "beam_width")
    if req.beam_width > 1:
        raise invalid("beam search is not supported yet", "beam_width")


def build_sampling_params(
    req: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    defaults: dict,
    vocab_size: int,
) -> SamplingParams:
    """The engine's parameters for `req`; unset fields take `defaults` (generation_config),
    else OpenAI's defaults. Raises APIError (400) on anything out of range."""
    if isinstance(req.stop, str):
        stop = [req.stop] if req.stop else []
    else:
        stop = [s for s in (req.stop or []) if s]
    logit_bias = None
    if req.logit_bias:
        logit_bias = {}
        for key, bias in req.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                message = f"logit_bias keys must be token ids, got {key!r}"
                raise invalid(message, "logit_bias") from None
            if not 0 <= token_id < vocab_size:
                raise invalid(f"logit_bias token id {token_id} is out of range", "logit_bias")
            logit_bias[token_id] = bias
    for token_id in req.stop_token_ids or []:
        if not 0 <= token_id < vocab_size:
            raise invalid(f"stop_token_ids: token id {token_id} is out of range", "stop_token_ids")
    if req.seed is not None and not _SEED_RANGE[0] <= req.seed <= _SEED_RANGE[1]:
        raise invalid("seed is out of range", "seed")
    params = SamplingParams(
        n=1 if req.n is None else req.n,
        temperature=float(_pick(req.temperature, defaults, "temperature", 1.0)),
        top_p=float(_pick(req.top_p, defaults, "top_p", 1.0)),
        top_k=int(_pick(req.top_k, defaults, "top_k", -1)),
        min_p=float(_pick(req.min_p, defaults, "min_p", 0.0)),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=float(
            _pick(req.repetition_penalty, defaults, "repetition_penalty", 1.0)
        ),
        logit_bias=logit_bias,
        max_tokens=max_tokens,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
    )
    if params.top_k == 0:  # some generation configs use 0 for "off"
        params.top_k = -1
    try:
        params.validate()
    except ValueError as exc:
        raise from_value_error(exc) from None
    return params


def check_prompt_length(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    """400 when the prompt (plus max_tokens, when set) does not fit the model's context."""
    if prompt_len == 0:
        raise invalid("the prompt is empty", "prompt")
    if prompt_len >= max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {prompt_len} tokens, leaving no room to generate.",
            "prompt",
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_len} prompt tokens plus max_tokens {max_tokens} make "
            f"{prompt_len + max_tokens} tokens.",
            "max_tokens",
        )
