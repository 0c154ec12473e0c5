"""lm-evaluation-harness on our models, offline: a task defined by local YAML over local JSONL.

The reference is computed without lm-eval: each choice's log-likelihood is summed from our model's
own logits, the way lm-eval's multiple-choice tasks define it (context, then " " + choice).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lm_eval  # noqa: E402,F401  (a test dependency: pip install -e ".[test]")

from bam.formats.model_dir import load_model, save_model  # noqa: E402
from bam.cli import main  # noqa: E402
from bam.modeling.config import BamConfig  # noqa: E402
from bam.eval.harness import run_lm_eval  # noqa: E402
from bam.modeling.model import BamForCausalLM  # noqa: E402
from bam.data.tokenizer import load_tokenizer  # noqa: E402

TASK = "bam_test_arith"


def documents() -> list[dict]:
    return [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), f"{a * b + 7} apples"],
             "answer": (a + b) % 3} for a in range(1, 5) for b in range(1, 4)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stdlib_tokenizer):
    """A BAM mixture of two random dense models with a real tokenizer, and a local task."""
    root = tmp_path_factory.mktemp("lm_eval")
    stdlib_tokenizer(root / "tokenizer", 320)
    experts = []
    for seed in range(2):
        config = BamConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        generator = torch.Generator().manual_seed(seed)
        model = BamForCausalLM(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        experts.append(str(save_model(model, root / f"dense{seed}", tokenizer_dir=root / "tokenizer")))
    assert main(["mix", *experts, "--method", "bam", "--out", str(root / "bam")]) == 0

    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "arith.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents()))
    (tasks / "arith.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / "arith.jsonl"}
          cache_dir: {root / "datasets_cache"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return root / "bam", tasks


def reference_scores(model_dir: Path) -> list[list[float]]:
    """Per document, per choice: sum of log p(choice tokens | question), from our logits."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    scores = []
    for doc in documents():
        context = tokenizer(doc["question"]).input_ids
        row = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice).input_ids
            assert whole[:len(context)] == context
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            row.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        scores.append(row)
    return scores


def reference_accuracy(scores: list[list[float]]) -> float:
    hits = [max(range(len(row)), key=row.__getitem__) == doc["answer"] for row, doc in zip(scores, documents())]
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_run_lm_eval_scores_a_local_task_like_our_logits(setup):
    model_dir, tasks = setup
    results = run_lm_eval(model_dir, [TASK], include_path=tasks, log_samples=True)
    scores = reference_scores(model_dir)
    assert results["results"][TASK]["acc,none"] == pytest.approx(reference_accuracy(scores))
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(scores)
    for sample, row in zip(samples, scores):
        loglikelihoods = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert loglikelihoods == pytest.approx(row, abs=1e-4)


# lm-eval's own command line, in a process that cannot import bam, on the --format hf export.
OUTSIDE = textwrap.dedent("""
    import sys
    sys.modules["bam"] = None
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + sys.argv[1:]
    cli_evaluate()
""")


@pytest.mark.slow
def test_lm_eval_cli_on_hf_export_without_bam(setup, tmp_path):
    model_dir, tasks = setup
    assert main(["export", str(model_dir), "--format", "hf", "--out", str(tmp_path / "export")]) == 0
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["--model", "hf", "--model_args", f"pretrained={tmp_path / 'export'},trust_remote_code=True",
            "--device", "cpu", "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "1",
            "--output_path", str(tmp_path / "results")]
    proc = subprocess.run([sys.executable, "-I", "-c", OUTSIDE, *args], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "results").rglob("results_*.json")
    accuracy = json.loads(result_file.read_text())["results"][TASK]["acc,none"]
    assert accuracy == pytest.approx(reference_accuracy(reference_scores(model_dir)))
