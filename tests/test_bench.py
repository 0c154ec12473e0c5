"""Smoke test of the benchmark suite: every benchmark runs at a trivial size for one repeat and
returns a result of the documented schema. No timing is asserted (timings at this size are noise)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import __main__ as driver
from bench.common import Options, check_result, compare, render_markdown, write_json, write_markdown


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return {"tmp_dir": str(tmp_path_factory.mktemp("bench"))}


@pytest.mark.parametrize("name", driver.BENCHMARKS)
def test_benchmark_runs_and_reports_schema(name, context, tmp_path):
    opts = Options(size="tiny", repeats=1, warmup=0, install=False, peers=False, context=context)
    result = driver.load(name).run(opts)
    check_result(result)
    assert result["name"] == name and result["size"] == "tiny"
    assert result["tables"] and all(t["rows"] for t in result["tables"])
    for c in result["checks"]:
        assert c["pass"] in (True, False, None)
    path = write_json(result, tmp_path)
    assert json.loads(path.read_text())["name"] == name
    md = write_markdown(tmp_path, list(driver.BENCHMARKS)).read_text()
    assert render_markdown(result).splitlines()[0] in md
    if name == "mixing":  # mergekit is neither installed nor run here: the result says why
        assert any("mergekit-moe not measured" in n for n in result["notes"])
        assert [r["tool"] for r in result["tables"][0]["rows"]] == ["bam mix --method btx"]


def test_cli_rejects_unknown_benchmark():
    with pytest.raises(SystemExit):
        driver.parse_args(["--only", "nope"])


def test_compare_counts_memory_paged_in_by_fresh_large_blocks_not_reused_ones():
    size = 64 * 2**20  # above glibc's largest mmap threshold: mapped afresh on every allocation
    kept = torch.empty(size // 4)

    def fresh():
        torch.ones(size // 4)

    def reuse():
        kept.fill_(1.0)

    timings = compare({"fresh": fresh, "reuse": reuse}, repeats=3, warmup=1)
    assert timings["fresh"].paged_in_median >= 0.9 * size
    assert timings["reuse"].paged_in_median < 0.05 * size
