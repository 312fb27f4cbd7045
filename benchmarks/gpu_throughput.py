"""Offline throughput of the engine against transformers' `generate`, on one GPU.

Usage: python benchmarks/gpu_throughput.py [--batches 1,16,64] [--prompt-len 128]
       [--new-tokens 128] [--shape qwen2-0.5b] [--dtype bfloat16] [--json PATH]
       [--dry-run] [--device cpu --shape tiny ...]

The model is a random-weight Qwen2 of Qwen2-0.5B's shape (tests/engine/synthetic.py), built
on the spot with its tokenizer: no model files needed. Each batch is that many random prompts
of --prompt-len tokens, answered greedily with --new-tokens tokens each (EOS ignored), with
new prompts every run (no prefix-cache hits). Printed per batch size:

- engine tok/s: output tokens per second of the whole run (prefill included), CUDA graphs;
- decode tok/s with CUDA graphs and with --enforce-eager's engine (the steps after every
  prompt has its first token), and the graphs' speed-up;
- transformers tok/s (prefill included), and the engine's ratio to it. Where transformers
  would take longer than --hf-seconds for a run it generates fewer tokens (the table says
  how many), its rate measured on those.

Every run is preceded by a short warm-up of the same shape (Triton compiles there).
--dry-run builds the model, checks that its logits vary, prints the plan and stops.
About 1-2 minutes on an H100 with the defaults.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))  # synthetic.py, hf_oracle.py

from synthetic import SHAPES, build_model, build_tokenizer, check_logits_vary  # noqa: E402

WARMUP_TOKENS = 4


@dataclass
class EngineTiming:
    seconds: float  # add_request to the last output
    tokens: int  # output tokens
    decode_seconds: float  # from the step where every request had its first token
    decode_tokens: int
    first_tokens: list[int] = field(default_factory=list, repr=False)  # per prompt

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_rate(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else math.nan


@dataclass
class Row:
    batch: int
    engine_tok_s: float | None = None
    engine_decode_tok_s: float | None = None
    eager_tok_s: float | None = None
    eager_decode_tok_s: float | None = None
    hf_tok_s: float | None = None
    hf_new_tokens: int | None = None
    first_token_agreement: float | None = None  # engine vs transformers, greedy


class Prompts:
    """Fresh random prompts of one length for every run (so no prefix-cache hits)."""

    def __init__(self, vocab: int, length: int, seed: int = 0):
        self.vocab, self.length = vocab, length
        self.generator = torch.Generator().manual_seed(seed)
        self.low = 3  # the tokenizer's special tokens come first

    def take(self, batch: int) -> list[list[int]]:
        ids = torch.randint(self.low, self.vocab, (batch, self.length), generator=self.generator)
        return ids.tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_ids = itertools.count()


def engine_run(llm, prompts: list[list[int]], new_tokens: int) -> EngineTiming:
    """Run the prompts through the engine step by step, timing the whole and the decode part."""
    from xllm.engine.sampling_params import SamplingParams
    from xllm.inputs import PromptInput

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    tokens: dict[str, list[int]] = {}
    for prompt in prompts:
        request_id = f"bench-{next(_ids)}"
        engine.add_request(request_id, PromptInput.of(prompt), params)
        tokens[request_id] = []
    decode_start, tokens_before = None, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed") from out.error
            for choice in out.outputs:
                tokens[out.request_id] += choice.token_ids
        if decode_start is None and all(tokens.values()):
            decode_start = time.perf_counter()
            tokens_before = sum(map(len, tokens.values()))
    end = time.perf_counter()
    total = sum(map(len, tokens.values()))
    expected = len(prompts) * new_tokens
    assert total == expected, f"{total} output tokens, expected {expected}"
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks, "KV blocks still held after the run"
    return EngineTiming(end - start, total, end - (decode_start or end), total - tokens_before,
                        [ids[0] for ids in tokens.values()])


def bench_engine(folder: Path, args, prompts: Prompts, eager: bool, rows: dict[int, Row],
                 keep_first: dict[int, tuple[list[list[int]], list[int]]]) -> None:
    """Time every batch size on one engine (CUDA graphs or eager)."""
    from xllm.engine.llm import LLM

    label = "eager" if eager else "graphs" if args.device.startswith("cuda") else "engine"
    start = time.perf_counter()
    llm = LLM(str(folder), device=args.device, dtype=args.dtype, enforce_eager=eager,
              max_model_len=args.max_model_len, max_num_seqs=max(args.batches),
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=int(args.kv_cache_gib * 2**30))
    runner = llm.engine.runner
    print(f"engine ({label}) ready in {time.perf_counter() - start:.1f} s: {runner.device}, "
          f"{runner.dtype}, {runner.num_blocks} KV blocks", flush=True)
    try:
        for batch in args.batches:
            engine_run(llm, prompts.take(batch), WARMUP_TOKENS)
            batch_prompts = prompts.take(batch)
            timing = engine_run(llm, batch_prompts, args.new_tokens)
            row = rows[batch]
            if eager:
                row.eager_tok_s, row.eager_decode_tok_s = timing.rate, timing.decode_rate
            else:
                row.engine_tok_s, row.engine_decode_tok_s = timing.rate, timing.decode_rate
                keep_first[batch] = (batch_prompts, timing.first_tokens)
            print(f"  {label} batch {batch}: {timing.seconds:.2f} s, {timing.rate:.0f} tok/s, "
                  f"decode {timing.decode_rate:.0f} tok/s", flush=True)
    finally:
        del llm, runner
        release()


def bench_hf(folder: Path, args, prompts: Prompts, rows: dict[int, Row],
             keep_first: dict[int, tuple[list[list[int]], list[int]]]) -> None:
    """Time transformers' greedy generate on every batch size (same prompts as the engine's
    timed graph runs where those were kept)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    def generate(batch_prompts: list[list[int]], new_tokens: int) -> tuple[float, torch.Tensor]:
        ids = torch.tensor(batch_prompts, device=device)
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=0)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=config)
        sync(device)
        generated = out[:, ids.shape[1]:]
        assert generated.shape == (len(batch_prompts), new_tokens), generated.shape
        return time.perf_counter() - start, generated

    for batch in args.batches:
        warm_seconds, _ = generate(prompts.take(batch), WARMUP_TOKENS * 2)
        per_step = warm_seconds / (WARMUP_TOKENS * 2)  # an overestimate: prefill included
        new_tokens = args.new_tokens
        if per_step * new_tokens > args.hf_seconds:
            new_tokens = min(new_tokens, max(WARMUP_TOKENS * 4, int(args.hf_seconds / per_step)))
        batch_prompts, engine_first = keep_first.get(batch, (prompts.take(batch), None))
        seconds, generated = generate(batch_prompts, new_tokens)
        row = rows[batch]
        row.hf_new_tokens = generated.shape[1]
        row.hf_tok_s = generated.numel() / seconds
        if engine_first is not None:
            same = sum(a == b for a, b in zip(engine_first, generated[:, 0].tolist()))
            row.first_token_agreement = same / batch
        print(f"  transformers batch {batch}: {seconds:.2f} s for {row.hf_new_tokens} "
              f"tokens each, {row.hf_tok_s:.0f} tok/s", flush=True)


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def print_table(rows: list[Row], args) -> None:
    print(f"\n{args.shape} {args.dtype} on {args.device_name}: prompts of {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens each (greedy, EOS ignored); tok/s = output "
          "tokens per second, prefill included; decode = after every first token")
    decode = "decode graphs" if args.device.startswith("cuda") else "decode"
    header = ["batch", "engine tok/s", "transformers tok/s", "ratio", decode,
              "decode eager", "graphs x", "hf tokens", "same 1st tok"]
    lines = []
    for r in rows:
        ratio = r.engine_tok_s / r.hf_tok_s if r.engine_tok_s and r.hf_tok_s else None
        speedup = (r.engine_decode_tok_s / r.eager_decode_tok_s
                   if r.engine_decode_tok_s and r.eager_decode_tok_s else None)
        lines.append([str(r.batch), fmt(r.engine_tok_s), fmt(r.hf_tok_s), fmt(ratio, ".2f"),
                      fmt(r.engine_decode_tok_s), fmt(r.eager_decode_tok_s),
                      fmt(speedup, ".2f"), fmt(r.hf_new_tokens, "d"),
                      fmt(r.first_token_agreement, ".0%")])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in [header, *lines]:
        print(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64",
                        type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--shape", default="qwen2-0.5b", choices=list(SHAPES))
    parser.add_argument("--kind", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--max-model-len", type=int,
                        help="default: 2048, or the model's context if shorter")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--hf-seconds", type=float, default=20.0,
                        help="longest transformers run per batch size (fewer tokens beyond)")
    parser.add_argument("--model-dir", type=Path,
                        help="build the model here (default: a temporary folder)")
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model, check its logits, print the plan, stop")
    args = parser.parse_args(argv)
    context = SHAPES[args.shape]["max_position_embeddings"]
    args.max_model_len = args.max_model_len or min(2048, context)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA GPU: pass --device cpu (with --shape tiny) for a smoke run")
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="xllm_bench_") as tmp:
        folder = args.model_dir or Path(tmp) / args.shape
        start = time.perf_counter()
        tokenizer = build_tokenizer()
        build_model(folder, args.kind, args.shape, seed=0, dtype=getattr(torch, args.dtype),
                    tokenizer=tokenizer, device=device)
        probe = Prompts(len(tokenizer), 32, seed=123).take(1)[0]
        figures = check_logits_vary(folder, probe, device=args.device)
        print(f"built {args.kind} {args.shape} ({args.dtype}) in {folder} in "
              f"{time.perf_counter() - start:.1f} s; logits: {figures}", flush=True)
        print(f"plan: batches {args.batches}, prompt {args.prompt_len} tokens, "
              f"{args.new_tokens} new; engine graphs, "
              f"{'no eager' if args.skip_eager else 'eager'}, "
              f"{'no transformers' if args.skip_hf else 'transformers'}; {args.device_name}",
              flush=True)
        if args.dry_run:
            return
        prompts = Prompts(len(tokenizer), args.prompt_len)
        rows = {b: Row(b) for b in args.batches}
        keep_first: dict[int, tuple[list[list[int]], list[int]]] = {}
        bench_engine(folder, args, prompts, False, rows, keep_first)
        if not args.skip_eager and device.type == "cuda":
            bench_engine(folder, args, prompts, True, rows, keep_first)
        if not args.skip_hf:
            bench_hf(folder, args, prompts, rows, keep_first)
            release()
    print_table(list(rows.values()), args)
    if args.json:
        args.json.write_text(json.dumps(
            {"device": args.device_name, "shape": args.shape, "dtype": args.dtype,
             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "rows": [asdict(r) for r in rows.values()]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
