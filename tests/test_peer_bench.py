"""benchmarks/peer_bench.py without servers: its --server syntax, round order and tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_bench  # noqa: E402
import serve_bench  # noqa: E402


def summary(tok_s: float, ttft: float, failed: int = 0, completed: int = 8) -> dict:
    return {
        "output_tokens_per_s": tok_s,
        "requests_per_s": tok_s / 16,
        "ttft_ms": {"mean": ttft, "median": ttft, "p99": 2 * ttft},
        "tpot_ms": {"mean": 5.0, "median": 5.0, "p99": 6.0},
        "total_output_tokens": 16 * completed,
        "completed": completed,
        "failed": failed,
        "errors": ["HTTP 500: boom"] if failed else [],
    }


def test_server_spec_cmd_keeps_the_rest():
    spec = peer_bench.parse_server_spec(
        "name=vllm, url=http://127.0.0.1:8002/v1/ ,model=smol,"
        "cmd=A=0-1 python -m x --origins a,b --model=m"
    )
    assert spec == peer_bench.ServerSpec(
        "vllm", "http://127.0.0.1:8002", "smol", "A=0-1 python -m x --origins a,b --model=m"
    )
    assert peer_bench.parse_server_spec("url=http://h:1,name=a") == peer_bench.ServerSpec(
        "a", "http://h:1"
    )


@pytest.mark.parametrize(
    "text",
    [
        "name=a",  # no url
        "url=http://h:1",  # no name
        "name=a,url=h:1",  # no scheme
        "name=a,url=http://h:1,port=3",  # unknown key
        "name=a,name=b,url=http://h:1",  # twice
        "name=a,url=http://h:1,cmd=",  # empty command
        "name=a,url=http://h:1,oops",  # no '='
    ],
)
def test_server_spec_errors(text):
    with pytest.raises(ValueError):
        peer_bench.parse_server_spec(text)


def test_cli_defaults_and_duplicate_names():
    args = peer_bench.parse_args(["--server", "name=a,url=http://h:1", "--concurrency", "4", "1"])
    assert args.concurrency == [4, 1] and args.output_len == 128 and args.endpoint == "chat"
    assert [peer_bench.requests_per_level(c, None) for c in (1, 4, 64)] == [8, 16, 256]
    assert peer_bench.requests_per_level(64, 10) == 10
    with pytest.raises(SystemExit):
        peer_bench.parse_args(["--server", "name=a,url=http://h:1", "--server", "name=a,url=x"])


def test_rounds_alternate_and_seeds_are_shared_per_level():
    assert [peer_bench.round_order("AB", r) for r in range(3)] == [
        ["A", "B"],
        ["B", "A"],
        ["A", "B"],
    ]
    seeds = {peer_bench.level_seed(0, r, c) for r in range(2) for c in (1, 4)}
    assert len(seeds) == 4 and peer_bench.level_seed(0, 1, 4) == peer_bench.level_seed(0, 1, 4)


def test_serve_bench_settings():
    args = serve_bench.bench_args(base_url="http://h:1", concurrency=3, output_len=16)
    assert (args.concurrency, args.output_len, args.input_len) == (3, 16, 128)
    with pytest.raises(TypeError):
        serve_bench.bench_args(concurrncy=3)


def test_table_has_ratio_rows_and_missing_servers():
    rows = [
        ("xllm", peer_bench.metrics(summary(200.0, 50.0)), ""),
        ("vllm", peer_bench.metrics(summary(100.0, 100.0, failed=1, completed=7)), ""),
        ("llama", None, "failed: see below"),
    ]
    lines = peer_bench.format_table(rows).splitlines()
    assert lines[0].startswith("| server | output tok/s | req/s | TTFT med ms | TTFT p99 ms |")
    assert lines[2] == "| xllm | 200.0 | 12.50 | 50.0 | 100.0 | 5.00 | 16.0 | 0/8 |"
    assert lines[3].endswith("| 1/8 |")
    assert lines[4] == "| llama | - | - | - | - | - | - | failed: see below |"
    assert lines[5] == "| xllm / vllm | 2.00x | 2.00x | 0.50x | 0.50x | 1.00x |  |  |"
    assert len(lines) == 6  # no ratio against a server that did not run


def test_report_means_over_rounds():
    def entry(tok_s, ttft):
        return {"levels": {"1": summary(tok_s, ttft)}, "error": None}

    result = {
        "config": {
            "concurrency": [1],
            "num_prompts": None,
            "endpoint": "chat",
            "input_len": 128,
            "output_len": 16,
            "temperature": 0.0,
            "seed": 0,
        },
        "servers": [{"name": "a"}, {"name": "b"}],
        "rounds": [
            {"round": 1, "order": ["a", "b"], "servers": {"a": entry(100, 10), "b": entry(50, 20)}},
            {"round": 2, "order": ["b", "a"], "servers": {"b": entry(70, 20), "a": entry(140, 30)}},
        ],
    }
    result["mean"] = peer_bench.compute_means(result)
    assert result["mean"]["a"]["1"]["tok_s"] == 120.0
    assert result["mean"]["b"]["1"]["requests"] == 16
    report = peer_bench.format_report(result)
    assert "### Round 2 (order: b, a)" in report and "### Mean of 2 rounds" in report
    assert report.rstrip().endswith("| a / b | 2.00x | 2.00x | 1.00x | 1.00x | 1.00x |  |  |")
