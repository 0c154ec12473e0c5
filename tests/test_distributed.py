"""`torchrun --nproc_per_node 2` on CPU (gloo): DDP and FSDP2 reproduce the one-process run."""

from __future__ import annotations

import shutil

import pytest
import torch
from _train_assets import build_assets, read_metrics, run_bam, tensors, torchrun, train_losses

from bam.formats.model_dir import load_model


@pytest.fixture(scope="module")
def assets():
    return build_assets()


@pytest.fixture(scope="module")
def single_process_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    result = run_bam("train", assets.seed, *train_args(assets, out))
    assert result.returncode == 0, result.stderr
    return out


def train_args(assets, out, *extra) -> list:
    # --batch-size is the global batch: each of 2 ranks takes 4 of the 8 rows of every step.
    return ["--data", *assets.data("code", "prose"), "--out", out, "--cache-dir", assets.cache,
            "--max-steps", 6, "--batch-size", 8, "--seq-len", 32, "--lr", 3e-3, "--warmup", 2,
            "--save-every", 3, "--eval-every", 3, "--eval-tokens", 512, "--no-progress", *extra]


def assert_same_curve(actual: dict[int, float], expected: dict[int, float], rel: float) -> None:
    assert actual.keys() == expected.keys() == set(range(1, 7))
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, rel=rel), f"step {step}: {actual[step]} vs {loss}"


def test_ddp_two_ranks_match_one_process(assets, single_process_run, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun(2, "train", assets.seed, *train_args(assets, out, "--dist", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(train_losses(out), train_losses(single_process_run), rel=1e-5)
    expected, actual = tensors(single_process_run / "model"), tensors(out / "model")
    # Adam divides by sqrt(v): float noise in a near-zero gradient moves a weight by up to a small
    # fraction of one step (lr = 3e-3), hence an absolute tolerance well below that.
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=3e-5)
    # Only rank 0 writes: one record per step, not two.
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4, 5, 6]


def test_fsdp2_trains_and_its_checkpoint_loads_in_one_process(assets, single_process_run, tmp_path):
    out = tmp_path / "fsdp"
    # Two micro-batches per rank also exercises gradient accumulation under FSDP2.
    result = torchrun(2, "train", assets.seed, *train_args(assets, out, "--dist", "fsdp", "--grad-accum", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(train_losses(out), train_losses(single_process_run), rel=1e-5)

    # The sharded run's checkpoint is gathered to full tensors: one process loads it as a model...
    model = load_model(out / "checkpoints" / "step_000006" / "model")
    final = tensors(out / "model")
    assert all(torch.equal(final[name], p) for name, p in model.named_parameters())
    # ...and resumes it: drop the last checkpoint and let one process redo steps 4-6 from the
    # gathered step-3 optimizer state (a different world size keeps the run's fingerprint).
    shutil.rmtree(out / "checkpoints" / "step_000006")
    resumed = run_bam("train", assets.seed, *train_args(assets, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_curve(train_losses(out), train_losses(single_process_run), rel=1e-5)
    expected = tensors(single_process_run / "model")
    for name, tensor in tensors(out / "model").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=3e-5)
