"""POST /v1/sample (API.md section 4): the next-token distributions at the places of a
prompt that a literal selector marks, all read from one prefill of the prompt.

Nothing of the prompt is logged here: only the request id, each sample id, the match count
and the model.
"""

from xllm.api.context import ServingContext
from xllm.api.errors import invalid
from xllm.api.generate import Choice, ChoiceNews, Generation, Renderer
from xllm.api.guards import usable_id
from xllm.api.protocol import SampleRequest
from xllm.engine.outputs import TokenLogprob
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.tokenizer import Tokenizer

MAX_SAMPLE_LOGPROBS = 5
DEFAULT_SAMPLE_LOGPROBS = 5


def split_matches(text: str, value: str) -> list[str]:
    """`text` cut around the non-overlapping matches of `value`, left to right: pieces
    alternate text, match, text, ..., text (so a match is every odd piece)."""
    pieces, start = [], 0
    while (at := text.find(value, start)) >= 0:
        pieces += [text[start:at], value]
        start = at + len(value)
    return pieces + [text[start:]]


class SampleRenderer(Renderer):
    object = "sample_completion"
    chunk_object = "sample_completion"
    id_prefix = "sample"

    def __init__(self, tokenizer: Tokenizer, points: list[int | None]) -> None:
        self.tokenizer = tokenizer
        self.points = points  # per match: its prompt position, None with no token before

    def chunk(self, news: ChoiceNews) -> dict | None:
        raise NotImplementedError("/v1/sample is not streamed")

    def choices(self, choices: list[Choice]) -> list[dict]:
        distributions = iter(choices[0].logprobs if choices else [])
        return [self._point(i, None if point is None else next(distributions))
                for i, point in enumerate(self.points)]

    def _point(self, index: int, entry: TokenLogprob | None) -> dict:
        if entry is None:
            return {"index": index, "text": "",
                    "logprobs": {"tokens": [], "token_ids": [], "token_logprobs": []},
                    "finish_reason": "empty_logprobs"}
        tokens = [self.tokenizer.token_text(token_id) for token_id, _ in entry.top]
        return {
            "index": index,
            "text": tokens[0],
            "logprobs": {"tokens": tokens, "token_ids": [t for t, _ in entry.top],
                         "token_logprobs": [lp for _, lp in entry.top]},
            "finish_reason": "selector_match",
        }

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        points = sum(point is not None for point in self.points)
        return super().usage(prompt_tokens, points)


async def prepare_sample(ctx: ServingContext, req: SampleRequest) -> Generation:
    selector = req.selector
    if selector.type != "literal":
        raise invalid("selector.type must be 'literal'", "selector")
    if not selector.value:
        raise invalid("selector.value must not be empty", "selector")
    k = DEFAULT_SAMPLE_LOGPROBS if req.logprobs is None else req.logprobs
    if not 1 <= k <= MAX_SAMPLE_LOGPROBS:
        raise invalid(f"logprobs must be in [1, {MAX_SAMPLE_LOGPROBS}]", "logprobs")
    if req.stream:
        raise invalid("/v1/sample answers once: send stream false", "stream")
    if req.request_id is not None and not usable_id(req.request_id):
        raise invalid("request_id must be 1 to 128 printable ASCII characters, no spaces",
                      "request_id")
    pieces = split_matches(req.prompt, selector.value)
    prompt, starts = await ctx.engine.pieces_prompt(pieces)
    # the distribution at a match is the one after the token before it
    points = [start - 1 if start > 0 else None for start in starts[1::2]]
    params = SamplingParams(max_tokens=0, logprobs=k,
                            sample_points=tuple(p for p in points if p is not None))
    ctx.metrics.count_sample(len(points))
    return Generation("sample", [prompt], params, SampleRenderer(ctx.engine.tokenizer, points),
                      request_id=req.request_id,
                      summary=f"sample, model {ctx.model_name}, match_count {len(points)}")
