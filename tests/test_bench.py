"""Smoke test of the benchmark suite: every benchmark runs at a trivial size for one repeat and
returns a result of the documented schema. No timing is asserted (timings at this size are noise)."""

from __future__ import annotations

import json

import pytest
import torch

from _train_assets import code_documents, prose_documents, write_jsonl
from bam.errors import BamError
from bam.study.settings import StudySettings
from bam.study.study import run_study
from bench import __main__ as driver
from bench import kv_compression
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


def test_kv_compression_measures_the_mixtures_a_study_trained(context, tmp_path):
    """--study OUT: the seed and the data-matched BAM mixtures of a finished study, found by its report.json."""
    train = {"steps": 2, "batch_size": 4, "lr": 0.003, "warmup": 1, "save_every": 2}
    domains = {"general": str(write_jsonl(tmp_path / "prose.jsonl", prose_documents())),
               "code": str(write_jsonl(tmp_path / "code.jsonl", code_documents()))}
    settings = StudySettings(domains=domains, preset="tiny", vocab_size=300, seq_len=32, pretrain=train, cpt=train,
                             mixture=train, methods=["bam", "bam-shared"], compute_matched=False,
                             eval_max_tokens=128, eval_batch_size=4, routing_max_tokens=64, seeds=[0])
    out = tmp_path / "study"
    run_study(settings, out)
    opts = Options(size="tiny", repeats=1, warmup=0, install=False, peers=False, context=context, study=out)
    result = kv_compression.run(opts)
    check_result(result)
    assert "2 experts" in result["tables"][0]["title"] and str(out) in result["tables"][0]["title"]
    labels = {r["model"] for r in result["tables"][0]["rows"]}
    assert labels == {label for label, _, _ in kv_compression.VARIANTS}
    # The study's own models were measured: its seed and its two data-matched BAM mixtures.
    report = json.loads((out / "report" / "report.json").read_text())
    by_key = {(m["group"], m["method"], m["setting"]): out / m["model_dirs"]["0"] for m in report["models"].values()}
    assert kv_compression.study_models(out) == {"dense": by_key["dense", None, None], "bam": by_key["moe", "bam", "DM"],
                                                "bam-shared": by_key["moe", "bam-shared", "DM"]}
    assert result["config"]["study"] == str(out)
    assert not any("equal to the dense model's" in c["name"] for c in result["checks"])  # experts differ

    (out / "report" / "report.json").unlink()
    with pytest.raises(BamError, match="report.json: not found"):
        kv_compression.study_models(out)


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
