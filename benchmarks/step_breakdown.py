"""Where a decode step's time goes on the CPU, per batch size.

For each batch size B the default model runs offline (`xllm.engine.llm.LLM`, device cpu)
on B fixed prompts of 64 tokens (deterministic text, one distinct prompt per sequence),
greedy, ignore_eos, N new tokens. A first run warms up (other prompts, nothing patched);
the second run is measured: the functions that do the work are wrapped (monkeypatched,
restored afterwards) with perf_counter accumulators, time and call count per category,
and one markdown table per batch size gives each category's ms per decode step, its share
of the step and its calls per step.

What is wrapped, looked up where it is called from:

- `ops.decoder_stack`: the one-call kernel of every decoder layer it builds is timed as one
  row (`--layer-by-layer`: it builds none, and the model calls each layer's kernels, timed
  below);

- kernels, via the `xllm.ops` module that llama.py calls as `ops.<name>`: `linear`,
  `quant_linear`, `int8_linear` and `panel_linear` (one row per projection, qkv_proj,
  o_proj, gate_up_proj, down_proj, told by the storage of the weight passed in; the LM head
  apart: the `lm_head` module's weight, or else a weight with as many rows as the
  vocabulary), `paged_attention`,
  `write_kv`, `rotary_write_kv`, `rms_norm`, `silu_mul`, `dequantize` (the quantized
  embedding lookup), `topk_logprobs` (0 calls here: greedy without logprobs);
- llama.py's own `rotate` (a module global), and `torch.nn.functional.rms_norm` / `silu`
  (llama.py calls them as `F.rms_norm`, `F.silu`; the patch is on torch's module, seen by
  every caller, but nothing else runs them during a step). The activation row is F.silu
  alone; the `* up` product after it falls in "rest of the model";
- the model's `forward` and `logits` (the runner's model calls), `ModelRunner.run` (on the
  engine's runner), `Sampler.__call__` (the engine calls its sampler as `self.sampler(...)`),
  and `LLMEngine.step` (what `LLM.generate` loops on).

A function that does not exist is skipped with a note, and one that exists but is not
called from the place that would use it gets a note too, so the script keeps working while
llama.py moves to fused kernels (`ops.rms_norm`, `ops.silu_mul`, `ops.rotary_write_kv`).

Accounting: wrappers keep a stack, so each category's time is exclusive (its own time less
that of the measured calls inside it) and the rows add up to the engine step. Kernels are
leaves: a wrapped call made inside a kernel (a backend falling back to torch's F.rms_norm,
say) is not counted again. "rest of the model" is the model calls less their kernels,
"runner" is `ModelRunner.run` less the model calls (input tensors, attention context), and
"other (Python, scheduler, detokenizer)" is the engine step less everything measured in it.

Decode steps are told apart from prefill steps per engine step: the `ModelRunner.run`
wrapper looks at the batch it is handed, and a step counts as decode only when every
sequence in it brings exactly one token whose position lies past its prompt (a prompt whose
blocks the prefix cache holds still computes its last prompt token alone: that is prefill).
A step that runs the model several times (a failed step computed request by request) is
decode only if all its runs are. Prefill and mixed steps are accumulated apart and only
summarized. So that every decode step carries all B sequences, the engine is built with
max_num_seqs >= B and max_num_batched_tokens >= B * 64 (the whole prefill in one step).

The wrappers add about a microsecond per call (measured at start and printed, with what
that comes to per step); the kernels are synchronous on the CPU, so perf_counter around
them is their time. On a machine that other work keeps busy, an OpenMP kernel whose
threads outnumber the free cores waits for descheduled threads at every parallel region
(milliseconds per call): the load average is printed, and `--threads 1` is then the steadier
measure.

    python benchmarks/step_breakdown.py --batch 1 16 64 --tokens 64 --threads 2
"""

import argparse
import inspect
import os
import platform
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xllm import ops
from xllm.config import EngineConfig
from xllm.engine import llm_engine, sampler
from xllm.engine.llm import LLM
from xllm.engine.sampling_params import SamplingParams
from xllm.model import llama, runner
from xllm.model.device import MATMUL_PRECISIONS

PROMPT_TOKENS = 64
TEXT = (
    "The river ran past the old mill where the miller kept his ledgers, and every spring "
    "the water rose over the lower field, carrying branches, leaves and the occasional "
    "lost boot downstream toward the town, whose people gathered on the bridge to watch "
    "the current and argue about whether this year the flood would reach the church steps."
)

# Rows of the table, in order: (category, label). Kernels first, then the remainders; the
# linear layers get one row per projection ("linear:<name>", see `linear_names`) first.
ROWS = [
    ("stack", "decoder layers in one call (ops.decoder_stack, C++)"),
    ("lm_head", "LM head (ops.*linear, vocab rows)"),
    ("attention", "attention (ops.paged_attention)"),
    ("kv_write", "KV write (ops.write_kv)"),
    ("rotary_kv", "rotary + KV write (ops.rotary_write_kv)"),
    ("rotary", "rotary (llama.rotate)"),
    ("norm", "norms (ops.rms_norm / F.rms_norm)"),
    ("activation", "activation (ops.silu_mul / F.silu)"),
    ("embedding", "embedding lookup (ops.dequantize)"),
    ("topk", "top-k logprobs (ops.topk_logprobs)"),
    ("model", "rest of the model (adds, views, rotary table)"),
    ("runner", "runner (input tensors, attention context)"),
    ("sampling", "sampling (Sampler, less top-k)"),
    ("step", "other (Python, scheduler, detokenizer)"),
]
KERNELS = {"stack", "lm_head", "attention", "kv_write", "rotary_kv", "rotary", "norm", "activation",
           "embedding", "topk"}
LINEAR_ORDER = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def is_kernel(name: str) -> bool:
    return name in KERNELS or name.startswith("linear:")


@dataclass
class Stat:
    exclusive: float = 0.0  # seconds, less the measured calls inside
    inclusive: float = 0.0
    calls: int = 0


@dataclass
class Totals:
    steps: int = 0
    stats: dict[str, Stat] = field(default_factory=lambda: defaultdict(Stat))
    seqs_per_step: list[int] = field(default_factory=list)


class Profiler:
    """Stack-based timing of wrapped calls, accumulated per engine step and then into the
    totals of the step's kind ("decode" or "prefill")."""

    def __init__(self):
        self.active = False
        self.stack: list[str] = []
        self.in_kernel = False
        self.step: dict[str, Stat] = defaultdict(Stat)
        self.kind: str | None = None
        self.step_seqs = 0
        self.totals: dict[str, Totals] = defaultdict(Totals)

    def _record(self, category: str, seconds: float) -> None:
        stat = self.step[category]
        stat.inclusive += seconds
        stat.exclusive += seconds
        stat.calls += 1
        if self.stack:
            self.step[self.stack[-1]].exclusive -= seconds

    def kernel(self, fn: Callable, category: str | Callable[..., str]) -> Callable:
        """A leaf: its time is its own; wrapped calls inside it are not counted."""
        def wrapper(*args, **kwargs):
            if not self.active or self.in_kernel:
                return fn(*args, **kwargs)
            name = category(*args, **kwargs) if callable(category) else category
            self.in_kernel = True
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_kernel = False
                self._record(name, time.perf_counter() - start)
        return wrapper

    def region(self, fn: Callable, category: str,
               before: Callable[..., None] | None = None) -> Callable:
        """A call with measured calls inside: its exclusive time is what they leave."""
        def wrapper(*args, **kwargs):
            if not self.active or self.in_kernel:
                return fn(*args, **kwargs)
            if before is not None:
                before(*args, **kwargs)
            self.stack.append(category)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                self._record(category, time.perf_counter() - start)
        return wrapper

    def engine_step(self, fn: Callable) -> Callable:
        """The engine step: per-step accumulators, filed under the step's kind at the end."""
        inner = self.region(fn, "step")

        def wrapper(*args, **kwargs):
            if not self.active or self.stack:
                return inner(*args, **kwargs)
            self.step, self.kind, self.step_seqs = defaultdict(Stat), None, 0
            result = inner(*args, **kwargs)
            if self.kind is not None:  # a step that ran no model (nothing scheduled) is left out
                totals = self.totals[self.kind]
                totals.steps += 1
                totals.seqs_per_step.append(self.step_seqs)
                for name, stat in self.step.items():
                    total = totals.stats[name]
                    total.exclusive += stat.exclusive
                    total.inclusive += stat.inclusive
                    total.calls += stat.calls
            return result
        return wrapper

    def classify(self, batch, *args, **kwargs) -> None:
        """`ModelRunner.run(batch)`: decode when each sequence brings one generated token."""
        try:
            decode = all(len(s.token_ids) == 1 and s.start >= len(s.prompt) for s in batch)
        except (AttributeError, TypeError):  # SeqInput changed: one token each, at least
            decode = all(len(getattr(s, "token_ids", ())) == 1 for s in batch)
        kind = "decode" if decode else "prefill"
        self.kind = kind if self.kind in (None, kind) else "prefill"
        self.step_seqs += len(batch)


class Patcher:
    """setattr with a record of what to put back; notes for what is missing or unused."""

    def __init__(self):
        self.undo: list[tuple[object, str, bool, object]] = []
        self.notes: list[str] = []

    def patch(self, owner, name: str, make: Callable[[Callable], Callable], label: str,
              used_in: tuple[object, str] | None = None) -> bool:
        """Wrap `owner.name` with `make(original)`. `used_in` (module, call): note when the
        module's source has no such call ("ops.linear(", or a regex ending in "("), i.e. the
        call site does not use this function."""
        if not hasattr(owner, name):
            self.notes.append(f"`{label}` does not exist: skipped")
            return False
        if used_in is not None:
            module, call = used_in
            pattern = call if call.endswith("\\(") else re.escape(call)
            try:
                found = re.search(pattern, inspect.getsource(module)) is not None
            except (OSError, TypeError):
                found = True  # no source to read: assume it is called
            if not found:
                self.notes.append(f"`{label}` exists but `{module.__name__}` does not call it: "
                                  "wrapped anyway (0 calls expected)")
        own = name in vars(owner)
        self.undo.append((owner, name, own, vars(owner).get(name)))
        setattr(owner, name, make(getattr(owner, name)))
        return True

    def restore(self) -> None:
        for owner, name, own, original in reversed(self.undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self.undo.clear()


def linear_names(model: torch.nn.Module) -> dict[int, str]:
    """data_ptr of each Linear's weight (quantized rows, or rows packed for int8 products or
    in float32 panels) -> its last name (qkv_proj, ...)."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            packed = getattr(module, "int8", None) or getattr(module, "panels", None)
            weight = packed.data if packed is not None else getattr(module, "qdata", None) \
                if getattr(module, "qtype", None) else module.weight
            if isinstance(weight, torch.Tensor):
                names.setdefault(weight.data_ptr(), name.rsplit(".", 1)[-1])
    return names


def install(llm: LLM, profiler: Profiler, vocab: int, layer_by_layer: bool) -> Patcher:
    engine = llm.engine
    model = engine.runner.model
    p = Patcher()
    kernel, region = profiler.kernel, profiler.region

    def stacks(build: Callable) -> Callable:
        """ops.decoder_stack whose stacks are timed, or that offers none (layer_by_layer)."""
        def timed(*args):
            stack = None if layer_by_layer else build(*args)
            return None if stack is None else kernel(stack, "stack")
        return timed

    p.patch(ops, "decoder_stack", stacks, "ops.decoder_stack", (llama, "ops.decoder_stack("))
    model._stack = None  # built again through the patch (and once more after restore)

    names = linear_names(model)

    def by_weight(*args, **kwargs) -> str:
        """The projection a linear call serves, told by its weight's storage (the LM head
        also by its row count, the vocabulary size)."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("data"))
        weight = getattr(weight, "data", weight)  # int8_linear's and panel_linear's packing
        if not isinstance(weight, torch.Tensor):
            return "linear:other"
        name = names.get(weight.data_ptr())
        if name == "lm_head" or (name is None and weight.shape[0] == vocab):
            return "lm_head"
        return f"linear:{name or 'other'}"

    # The kernels of xllm.ops that llama.py calls, by category.
    for name, category in (("linear", by_weight), ("quant_linear", by_weight),
                           ("int8_linear", by_weight), ("panel_linear", by_weight),
                           ("paged_attention", "attention"), ("write_kv", "kv_write"),
                           ("rotary_write_kv", "rotary_kv"), ("rms_norm", "norm"),
                           ("silu_mul", "activation"), ("dequantize", "embedding")):
        p.patch(ops, name, lambda f, c=category: kernel(f, c), f"ops.{name}",
                (llama, f"ops.{name}("))
    p.patch(ops, "topk_logprobs", lambda f: kernel(f, "topk"), "ops.topk_logprobs",
            (sampler, "ops.topk_logprobs("))
    p.patch(llama, "rotate", lambda f: kernel(f, "rotary"), "xllm.model.llama.rotate",
            (llama, r"(?<!def )\brotate\("))
    # torch.nn.functional itself: llama.py has called it as F (and may stop importing it).
    for name, category in (("rms_norm", "norm"), ("silu", "activation")):
        p.patch(torch.nn.functional, name, lambda f, c=category: kernel(f, c),
                f"torch.nn.functional.{name}", (llama, rf"(?:\bF|functional)\.{name}\("))
    # The runner calls self.model(...) (nn.Module.__call__ reads self.forward) and
    # self.model.logits(...): instance attributes shadow the class's methods.
    p.patch(model, "forward", lambda f: region(f, "model"), "model.forward",
            (runner, "self.model("))
    p.patch(model, "logits", lambda f: region(f, "model"), "model.logits",
            (runner, "self.model.logits("))
    p.patch(engine.runner, "run", lambda f: region(f, "runner", profiler.classify),
            "ModelRunner.run", (llm_engine, "self.runner.run("))
    # Calling an instance looks __call__ up on its class.
    p.patch(type(engine.sampler), "__call__", lambda f: region(f, "sampling"),
            f"{type(engine.sampler).__name__}.__call__", (llm_engine, "self.sampler("))
    p.patch(engine, "step", profiler.engine_step, "LLMEngine.step",
            (sys.modules[LLM.__module__], "self.engine.step("))
    return p


def prompts(llm: LLM, count: int, salt: str) -> list[list[int]]:
    """`count` distinct prompts of PROMPT_TOKENS token ids, the same on every run."""
    out = []
    for i in range(count):
        ids = llm.tokenizer.encode(f"{salt} {i}. {TEXT} {TEXT}")
        if len(ids) < PROMPT_TOKENS:
            raise RuntimeError(f"prompt text gives {len(ids)} tokens, fewer than {PROMPT_TOKENS}")
        out.append(ids[:PROMPT_TOKENS])
    return out


def wrapper_overhead(profiler: Profiler) -> float:
    """Seconds a kernel wrapper adds to one call (a no-op timed with and without it)."""
    def noop():
        return None

    wrapped = profiler.kernel(noop, "calibration")
    profiler.active, n = True, 200_000
    try:
        start = time.perf_counter()
        for _ in range(n):
            noop()
        bare = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            wrapped()
        timed = time.perf_counter() - start
    finally:
        profiler.active = False
        profiler.step = defaultdict(Stat)
    return max(0.0, (timed - bare) / n)


def load_average() -> str:
    """The 1-minute load average against the core count: other work on the machine (an
    OpenMP kernel whose threads outnumber the free cores waits for descheduled threads)."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(totals: Totals) -> str:
    steps = totals.steps
    stats = totals.stats
    step_ms = stats["step"].inclusive / steps * 1e3

    def line(label: str, seconds: float, calls: int | None, per_call: bool = True) -> str:
        ms = seconds / steps * 1e3
        per_step = "" if calls is None else f"{calls / steps:.4g}"
        per_call = f"{seconds / calls * 1e6:.1f}" if calls and per_call else ""
        return f"| {label} | {ms:.3f} | {100 * ms / step_ms:.1f}% | {per_step} | {per_call} |"

    out = ["| category | ms / decode step | share of step | calls / step | us / call |",
           "|---|---:|---:|---:|---:|"]
    linears = [n for n in stats if n.startswith("linear:")]
    linears.sort(key=lambda n: (LINEAR_ORDER + [n[7:]]).index(n[7:]))
    linear_total = Stat()
    for name in linears:
        stat = stats[name]
        linear_total.exclusive += stat.exclusive
        linear_total.calls += stat.calls
        out.append(line(f"linear {name[7:]} (ops.*linear)", stat.exclusive,
                        stat.calls))
    for name, label in ROWS:
        stat = stats.get(name, Stat())
        out.append(line(label, stat.exclusive, stat.calls if is_kernel(name) else None))
    model = stats.get("model", Stat())
    out.append(line("*sum: linear layers without the LM head*", linear_total.exclusive,
                    linear_total.calls))
    out.append(line("*sum: model forward + logits (the runner's model calls)*",
                    model.inclusive, model.calls, per_call=False))
    out.append(line("**engine step**", stats["step"].inclusive, stats["step"].calls,
                    per_call=False))
    return "\n".join(out)


def run_batch(llm: LLM, batch: int, tokens: int, vocab: int, per_call: float,
              layer_by_layer: bool) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts(llm, batch, "Warm-up"), params)
    profiler = Profiler()
    patcher = install(llm, profiler, vocab, layer_by_layer)
    measured = prompts(llm, batch, "Request")
    try:
        profiler.active = True
        start = time.perf_counter()
        outputs = llm.generate(measured, params)
        wall = time.perf_counter() - start
    finally:
        profiler.active = False
        patcher.restore()
        llm.engine.runner.model._stack = None
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    lines = [f"### batch {batch}", ""]
    decode, prefill = profiler.totals.get("decode"), profiler.totals.get("prefill")
    lines.append(f"measured run: {wall:.2f} s, {generated} tokens generated, "
                 f"{generated / wall:.1f} tokens/s; {load_average()}.")
    if prefill is not None and prefill.steps:
        lines.append(f"prefill / mixed steps (left out): {prefill.steps}, "
                     f"{prefill.stats['step'].inclusive * 1e3:.1f} ms in all.")
    if decode is None or not decode.steps:
        lines += ["", "no decode step was measured (--tokens 1?)."]
    else:
        seqs = decode.seqs_per_step
        sizes = f"{seqs[0]}" if min(seqs) == max(seqs) else f"{min(seqs)}-{max(seqs)}"
        calls = sum(s.calls for n, s in decode.stats.items() if is_kernel(n) or n == "model")
        calls += sum(decode.stats[n].calls for n in ("runner", "sampling", "step"))
        lines.append(f"decode steps: {decode.steps} ({sizes} sequence(s) each); "
                     f"{calls / decode.steps:.0f} wrapped calls per step, about "
                     f"{calls / decode.steps * per_call * 1e3:.2f} ms of wrapper overhead "
                     f"per step (in the rows of the wrapped calls' callers).")
        lines += ["", table(decode)]
    if patcher.notes:
        lines += ["", "notes:"] + [f"- {note}" for note in patcher.notes]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--quantization", choices=["auto", "int8", "none"], default="auto")
    parser.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="highest")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16"], default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: all cores)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--layer-by-layer", action="store_true",
                        help="no decoder-stack kernel: time each layer's kernels apart")
    args = parser.parse_args()
    largest = max(args.batch)
    # An older checkout (PYTHONPATH, for a before/after) may predate these options.
    fields = EngineConfig.__annotations__
    extra = {name: value for name, value in (("quantization", args.quantization),
                                             ("matmul_precision", args.matmul_precision),
                                             ("kv_cache_dtype", args.kv_cache_dtype))
             if name in fields}
    llm = LLM(model=args.model, device="cpu", **extra,
              num_threads=args.threads, max_num_seqs=max(64, largest),
              max_num_batched_tokens=max(512, largest * PROMPT_TOKENS))
    model = llm.engine.runner.model
    vocab = llm.engine.runner.vocab_size
    qtypes = sorted({getattr(m, "qtype", None) or "float" for m in model.modules()
                     if isinstance(m, llama.Linear)})
    backend = ops.backend_for(torch.zeros(1)).__name__
    per_call = wrapper_overhead(Profiler())
    print("# Decode step breakdown (CPU)\n")
    print(f"model {args.model} ({type(model).__name__}, {len(model.layers)} layers, vocab "
          f"{vocab}), quantization {args.quantization} (linear weights: {', '.join(qtypes)}), "
          f"matmul precision {args.matmul_precision}, KV cache {args.kv_cache_dtype}, "
          f"kernels {backend}, {torch.get_num_threads()} thread(s), {cpu_name()}; "
          f"{PROMPT_TOKENS}-token prompts, {args.tokens} new tokens, greedy, "
          f"{'layer by layer' if args.layer_by_layer else 'decoder stack where offered'}. "
          f"Wrapper overhead {per_call * 1e6:.2f} us per call; {load_average()}.\n")
    for batch in args.batch:
        print(run_batch(llm, batch, args.tokens, vocab, per_call, args.layer_by_layer), "\n",
              flush=True)


if __name__ == "__main__":
    main()
