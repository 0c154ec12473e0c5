"""`bam demo --preset tiny` end to end, and interrupted runs that must finish with the same numbers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bam.data.corpus import DOMAINS, REFERENCE_FINGERPRINT, corpus_fingerprint
from bam.modeling.presets import preset_fields

pytestmark = pytest.mark.slow

DEMO = [sys.executable, "-m", "bam.cli", "demo", "--preset", "tiny"]


def run_demo(out: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*DEMO, "--out", str(out)], capture_output=True, text=True, timeout=timeout)


def numbers(report: dict) -> dict:
    """Every model's per-domain perplexity: what an interruption must not change."""
    return {name: {d: stat["per_seed"] for d, stat in model["perplexity"].items()}
            for name, model in report["models"].items()}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict:
    return json.loads((uninterrupted_run[0] / "report" / "report.json").read_text())


def test_tiny_demo_says_first_whether_its_corpus_is_the_readmes_and_records_fingerprints(uninterrupted_run,
                                                                                           uninterrupted):
    out, result = uninterrupted_run
    corpus = uninterrupted["provenance"]["builtin_corpus"]
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"[bam] corpus {corpus['reference_fingerprint'][:12]}")
    assert ("the same as the README's" in first) == (corpus["reference_fingerprint"] == REFERENCE_FINGERPRINT)
    # The tokenized shards' content digests (bam.data.shards) are the corpus stage's fingerprints.
    shards = {name: info["sha256"] for name, info in uninterrupted["corpus"].items()}
    assert corpus_fingerprint(shards) == corpus["fingerprint"]
    assert {"python", "torch", "transformers", "machine", "cpu_capability"} <= set(uninterrupted["provenance"]["versions"])
    assert {"torch", "sympy", "numpy"} <= set(corpus["source_versions"])
    # Every stage's record carries the same per-domain digests and counts.
    for done in out.glob("stages/*/done.json"):
        provenance = json.loads(done.read_text())["provenance"]
        if "domains" in provenance:  # the corpus and tokenizer stages finish before the shards exist
            assert {n: d["sha256"] for n, d in provenance["domains"].items()} == shards, done
            assert list(provenance["domains"]) == list(DOMAINS)
    md = (out / "report" / "report.md").read_text()
    assert f"built-in corpus fingerprint `{corpus['fingerprint']}`" in md
    assert f"| legal | `{shards['legal'][:12]}` |" in md


def test_tiny_demo_report_has_every_model_and_domain(uninterrupted, tmp_path):
    domains = ["general", "code", "math", "legal"]
    assert uninterrupted["domains"] == domains
    expected = {"seed", "expert code", "expert math", "expert legal",
                "BTX (DM)", "BTX (CM)", "BAM KV experts (DM)", "BAM KV experts (CM)",
                "BAM KV sharing (DM)", "BAM KV sharing (CM)",
                "Nexus before adding legal", "Nexus + legal", "Nexus + legal, finetuned",
                "linear reset + legal", "linear reset + legal, finetuned"}
    assert set(uninterrupted["models"]) == expected
    for name, model in uninterrupted["models"].items():
        for domain in domains:
            ppl = model["perplexity"][domain]["mean"]
            assert 1.0 < ppl < uninterrupted["settings"]["vocab_size"] * 2, (name, domain, ppl)
    for domain, info in uninterrupted["corpus"].items():
        assert info["documents"]["test"] > 0 and info["tokens"]["train"] > 10_000, domain


def test_tiny_demo_adds_the_held_out_expert(uninterrupted):
    experiment = uninterrupted["add_expert"]
    assert experiment["domain"] == "legal" and experiment["old_domains"] == ["general", "code", "math"]
    models = uninterrupted["models"]
    # The mixture before adding routes over code and math; every added model over code, math, legal.
    for role, row in experiment["rows"].items():
        routing = models[row["name"]]["routing"]
        if role == "dense":
            assert routing is None
            continue
        n_routed = 2 if role == "before" else 3
        assert all(len(expert_shares) == n_routed for layer in routing["ffn"] for expert_shares in layer)
        for layer in routing["ffn"]:
            for shares in layer:
                assert sum(shares) == pytest.approx(1.0)
        if role != "before":
            assert 0.0 <= row["new_expert_share"]["mean"] <= 1.0
    # One more routed expert: the Nexus mixture grows by exactly one expert FFN per layer and one
    # domain-embedding row; the reset variant swaps the Nexus projection for a linear router.
    cost = {role: models[row["name"]]["cost"] for role, row in experiment["rows"].items()}
    shape = preset_fields(uninterrupted["settings"]["preset"])
    d, d_ff, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    # hidden-mean embeddings are d-dimensional; the expert is SwiGLU (3 d d_ff)
    assert cost["added"]["params_total"] - cost["before"]["params_total"] == layers * (3 * d * d_ff + d)
    assert cost["added"]["params_active"] - cost["before"]["params_active"] == layers * d
    for tuned, untuned in (("added-finetuned", "added"), ("reset-finetuned", "reset")):
        for key in ("params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token"):
            assert cost[tuned][key] == cost[untuned][key], (tuned, key)
    assert len(experiment["lines"]) == 4


def test_tiny_demo_cost_is_consistent(uninterrupted):
    models = uninterrupted["models"]
    btx, bam, shared = (models[f"{m} (DM)"]["cost"] for m in ("BTX", "BAM KV experts", "BAM KV sharing"))
    assert bam["kv_cache_bytes_per_token"] == 4 * btx["kv_cache_bytes_per_token"]
    assert shared["kv_cache_bytes_per_token"] == btx["kv_cache_bytes_per_token"]
    assert btx["flops_per_token"] < shared["flops_per_token"] < bam["flops_per_token"]


def start_demo(out: Path) -> subprocess.Popen:
    # A background job of a non-interactive shell (how CI may run us) starts with SIGINT ignored,
    # and Python keeps an ignored SIGINT ignored: give the demo the default disposition, so that it
    # reacts to SIGINT as it does in a terminal.
    return subprocess.Popen([*DEMO, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(path_glob)):
        assert proc.poll() is None, f"demo ended before {path_glob} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path_glob} never appeared"
        time.sleep(0.2)


def test_interrupted_demo_resumes_to_the_same_numbers(uninterrupted, tmp_path):
    out = tmp_path / "run"
    # SIGINT while the seed model trains, after its first checkpoint ...
    proc = start_demo(out)
    wait_for("stages/seed-*/run/checkpoints/step_*/trainer.json", out, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    # ... then SIGKILL in the middle of an expert's continued pretraining ...
    proc = start_demo(out)
    wait_for("stages/expert-math-*/run/metrics.jsonl", out, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "report").exists()
    # ... and a plain re-run finishes with exactly the uninterrupted numbers.
    result = run_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((out / "report" / "report.json").read_text())
    assert numbers(resumed) == numbers(uninterrupted)
