"""Reliability (issue 7): manifests, one-line errors that leave nothing behind, crash safety, safe loading.

Sections, top to bottom:
- manifests: what every written model directory carries, and what loading verifies;
- bad input: one parametrized case per kind of bad input, run through the real CLI in-process;
  each must exit 2 with one line naming the culprit and leave its workspace byte-for-byte as it
  was; a few run in a subprocess to check the real exit code and stderr;
- a full disk, simulated in-process and, where the machine allows it, on a real tiny tmpfs;
- numerical guards and fp32 routers;
- safe loading: a scan of the package source;
- the kill test: SIGKILL at 20 seeded random moments across `bam train`, `bam mix` and `bam run`,
  each followed by a re-run that must end bit-identical to an uninterrupted run, while the output
  tree is polled: no visible directory may lack a valid manifest at any observed moment.
"""

from __future__ import annotations

import ast
import builtins
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _train_assets import Assets, build_assets, read_metrics, tensors, train_losses

import bam.train.loop as train_module
from bam.formats.model_dir import load_model, open_model, save_model
from bam.io.atomic import atomic_output_dir
from bam.io.manifest import MANIFEST_NAME, read_manifest, verify_manifest
from bam.cli import main
from bam.modeling.config import BamConfig
from bam.errors import BamError
from bam.modeling.model import BamForCausalLM

TESTS = Path(__file__).parent
PACKAGE = TESTS.parent / "bam"


@pytest.fixture(scope="module")
def assets() -> Assets:
    return build_assets()


@pytest.fixture
def one_thread():
    """One torch thread for in-process training: fast on a busy 2-core machine, and a fixed
    thread count, so that two runs in one test sum floats in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dense(path: Path, seed: int = 0, **fields) -> Path:
    shape = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    config = BamConfig(**{**shape, **fields})
    torch.manual_seed(seed)
    return save_model(BamForCausalLM(config), path)


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under `root`, hidden ones included: relative path -> sha256 of a file, or "dir"."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `bam argv...` in-process; (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Manifests


def test_every_model_directory_written_carries_a_manifest(tmp_path):
    dense = tiny_dense(tmp_path / "dense")
    manifest = read_manifest(dense)
    assert sorted(manifest) == ["config.json", "model.safetensors"]
    for name, entry in manifest.items():
        data = (dense / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # mix writes through atomic_output_dir without asking for a manifest: it gets one anyway.
    assert main(["mix", "--method", "bam", "--out", str(tmp_path / "moe"), str(dense), str(dense)]) == 0
    assert sorted(read_manifest(tmp_path / "moe")) == ["config.json", "mix.json", "model.safetensors"]
    assert verify_manifest(tmp_path / "moe")

    # export goes the same way: --format hf writes code files, listed too.
    from bam.formats.export import export

    export(tmp_path / "moe", "hf", tmp_path / "exported")
    listed = read_manifest(tmp_path / "exported")
    assert {"config.json", "model.safetensors", "modeling_bam.py"} <= set(listed)
    assert verify_manifest(tmp_path / "exported")

    # Directories that hold no weights (caches, tokenizers, reports) are not hashed.
    with atomic_output_dir(tmp_path / "report") as tmp:
        (tmp / "report.md").write_text("# r\n")
    assert not (tmp_path / "report" / MANIFEST_NAME).exists()


def test_training_checkpoints_and_final_model_carry_manifests(assets, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["train", str(assets.seed), "--data", *assets.data("code", "prose"), "--out", str(out),
                 "--cache-dir", str(assets.cache), "--max-steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--save-every", "1", "--eval-every", "0", "--no-progress"]) == 0
    step = out / "checkpoints" / "step_000002"
    assert sorted(read_manifest(step)) == ["optimizer.safetensors", "rng.safetensors", "trainer.json"]
    for directory in (step, step / "model", out / "model"):
        assert verify_manifest(directory), directory
    assert "tokenizer.json" in read_manifest(out / "model")


def test_a_flipped_weight_byte_is_detected_at_load_naming_the_file(tmp_path, capsys):
    dense = tiny_dense(tmp_path / "dense")
    expected = read_manifest(dense)["model.safetensors"]["sha256"]
    flip_middle_byte(dense / "model.safetensors")

    with pytest.raises(BamError) as err:
        load_model(dense)
    message = str(err.value)
    assert message.startswith(f"{dense / 'model.safetensors'}: sha256 mismatch (expected {expected}, got ")
    assert message.endswith("): the file is corrupt or was modified")
    actual = hashlib.sha256((dense / "model.safetensors").read_bytes()).hexdigest()
    assert f"got {actual}" in message

    # Through the CLI: one line, exit 2, before any data is read.
    code, err_text = cli(capsys, "eval", dense, "--data", f"x={tmp_path / 'unused.txt'}")
    assert code == 2 and err_text.count("\n") == 1, err_text
    assert err_text.startswith(f"bam eval: error: {dense / 'model.safetensors'}: sha256 mismatch"), err_text


def test_verification_is_lazy_and_once_per_file(tmp_path, monkeypatch):
    from bam.io import manifest

    dense = tiny_dense(tmp_path / "dense")
    calls = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: calls.append(Path(path).name) or real(path))
    source = open_model(dense)
    assert source.config.hidden_size == 64 and len(source.tensor_names) > 5
    assert calls == ["config.json"]  # small, checked at once
    source.tensor(source.tensor_names[0])
    source.tensor(source.tensor_names[1])
    assert calls == ["config.json", "model.safetensors"]  # hashed before the first tensor, once


def test_the_manifest_takes_the_writers_digest_unless_the_file_changed_after(tmp_path, monkeypatch):
    from bam.io import manifest, tensor_files

    calls = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: calls.append(Path(path).name) or real(path))
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    specs = {"x": (torch.float32, (5, 4)), "y": (torch.float32, (4,))}

    def write(out: Path, change_after_close: bool = False) -> Path:
        with atomic_output_dir(out, manifest=True) as tmp:
            with tensor_files.StreamingSafetensorsWriter(tmp / "w.safetensors", specs) as writer:
                writer.write("x", iter([a, b]))  # row blocks: x is their concatenation
                writer.write("y", torch.arange(4.0))
            if change_after_close:
                path = tmp / "w.safetensors"
                flip_middle_byte(path)
                mtime = path.stat().st_mtime_ns  # a later mtime even if the clock did not tick
                os.utime(path, ns=(mtime, mtime + 1_000_000))
        return out / "w.safetensors"

    path = write(tmp_path / "a")
    assert calls == []  # not read back: hashed while written
    assert read_manifest(tmp_path / "a")["w.safetensors"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors.torch import load_file
    written = load_file(str(path))
    assert torch.equal(written["x"], torch.cat([a, b])) and torch.equal(written["y"], torch.arange(4.0))

    # Changed between the writer's close and the manifest: the manifest describes the file as it is.
    path = write(tmp_path / "b", change_after_close=True)
    assert calls == ["w.safetensors"]
    assert read_manifest(tmp_path / "b")["w.safetensors"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_directories_without_our_manifest_load_as_before(tmp_path, capsys):
    dense = tiny_dense(tmp_path / "dense")
    reference = load_model(dense).state_dict()
    (dense / MANIFEST_NAME).unlink()  # e.g. a Hugging Face checkpoint from elsewhere
    assert all(torch.equal(reference[k], v) for k, v in load_model(dense).state_dict().items())
    (dense / MANIFEST_NAME).write_text(json.dumps({"files": ["something else's"]}))  # not ours: ignored
    load_model(dense)

    # Ours, but damaged; or silent about a weight file it should list: refused, naming the file.
    tiny_dense(tmp_path / "other")
    (tmp_path / "other" / MANIFEST_NAME).write_text('{"generator": "bam", "format": 1, "files": {"config.j')
    with pytest.raises(BamError, match=f"{tmp_path / 'other' / MANIFEST_NAME}: not valid JSON"):
        load_model(tmp_path / "other")
    tiny_dense(tmp_path / "third")
    manifest = json.loads((tmp_path / "third" / MANIFEST_NAME).read_text())
    del manifest["files"]["model.safetensors"]
    (tmp_path / "third" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BamError, match="model.safetensors: not listed in .*manifest.json"):
        load_model(tmp_path / "third")


def test_atomic_output_dir_cleans_up_after_itself_and_after_killed_writers(tmp_path):
    # A failing block leaves nothing: neither the temporary directory nor parents it created.
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    # Temporaries of killed writers on this host are removed by the next write of the same output;
    # a live writer's, and another host's, are left alone.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid, host = int(finished.stdout), socket.gethostname()
    dead = tmp_path / f".out.tmp-{dead_pid}@{host}-abc123"
    alive = tmp_path / f".out.tmp-{os.getpid()}@{host}-def456"
    elsewhere = tmp_path / f".out.tmp-{dead_pid}@not-{host}-ghi789"
    moved_aside = tmp_path / f".out.old-{dead_pid}@{host}-jkl012"  # killed between an overwrite's renames
    other_output = tmp_path / f".out2.tmp-{dead_pid}@{host}-mno345"
    for path in (dead, alive, elsewhere, moved_aside, other_output):
        path.mkdir()
    (moved_aside / "out").mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, other_output.name, "out"])

    # An overwrite moves the old copy aside under an owned name and leaves nothing behind.
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "y").write_text("y")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, other_output.name, "out"])


def test_pruning_training_states_finishes_a_killed_pruning(tmp_path):
    """A study stage prunes its run's training states once the stage is done; a kill in the middle of
    that leaves a state moved aside, which the re-run (finding the stage done) prunes again and removes."""
    from bam.train.state import STATES_DIR, prune_training_states

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    states = tmp_path / "run" / STATES_DIR
    moved_aside = states / f".step_000004.old-{int(finished.stdout)}@{socket.gethostname()}-abc123"
    live = states / f".step_000006.tmp-{os.getpid()}@{socket.gethostname()}-def456"  # a writer still at work
    (moved_aside / "step_000004").mkdir(parents=True)
    live.mkdir()
    (states / "step_000002").mkdir()
    (states / "step_000002" / "trainer.json").write_text("{}")
    prune_training_states(tmp_path / "run", keep=0)
    assert [p.name for p in states.iterdir()] == [live.name]


# ---------------------------------------------------------------------------------------------
# Bad input: one parametrized case each, through the real CLI


@dataclass
class Workspace:
    """Where one case builds its inputs; after the failed command it must be exactly as before."""

    root: Path
    assets: Assets
    finished_run: Path  # a short completed training run, for the resume cases

    @property
    def out(self) -> Path:
        return self.root / "out"

    def dense(self, name: str, **fields) -> Path:
        return tiny_dense(self.root / name, **fields)

    def copy(self, source: Path, name: str, manifest: bool = True) -> Path:
        target = Path(shutil.copytree(source, self.root / name))
        if not manifest:  # as a hand-edited or foreign directory would be
            (target / MANIFEST_NAME).unlink()
        return target

    def edited_config(self, name: str, **changes) -> Path:
        """A dense model whose config.json was edited by hand (so it has no manifest)."""
        path = self.copy(self.dense(f"{name}-src"), name, manifest=False)
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        config = {k: v for k, v in config.items() if v is not None}
        (path / "config.json").write_text(json.dumps(config))
        return path

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def train(self, model, *data: str, extra=()) -> list:
        return ["train", model, "--data", *data, "--out", self.out, "--cache-dir", self.assets.cache,
                "--max-steps", 2, "--batch-size", 2, "--seq-len", 16, "--eval-every", 0, "--no-progress",
                *extra]

    def mix(self, *dirs, method: str = "btx", extra=()) -> list:
        return ["mix", "--method", method, "--out", self.out, *extra, *dirs]


CASES = {}


def case(name: str):
    """Register `build(ws) -> (argv, needles)`: argv must fail with every needle in the message."""
    def register(build):
        CASES[name] = build
        return build
    return register


# Missing, unreadable, or not what was asked for

@case("missing-model-directory")
def _(ws):
    return ws.mix(ws.dense("a"), ws.root / "missing"), ["missing", "no such file or directory"]


@case("missing-data-file")
def _(ws):
    return ws.train(ws.assets.seed, f"x={ws.root / 'nope.txt'}"), ["nope.txt", "does not exist"]


@case("unreadable-config")
def _(ws):
    model = ws.copy(ws.dense("src"), "model", manifest=False)
    (model / "config.json").unlink()
    (model / "config.json").mkdir()  # reading it fails whatever the permissions (tests may run as root)
    return ws.mix(model, model), ["config.json", "cannot be read"]


@case("not-a-checkpoint")
def _(ws):
    (ws.root / "notes").mkdir()
    ws.text("notes/readme.txt", "hello")
    return ws.mix(ws.root / "notes", ws.root / "notes"), ["notes: not a model directory (no config.json)"]


@case("config-without-weights")
def _(ws):
    model = ws.copy(ws.dense("src"), "model", manifest=False)
    (model / "model.safetensors").unlink()
    return ws.mix(model, model), ["model: no model.safetensors"]


@case("pickled-weights-only")
def _(ws):
    model = ws.copy(ws.dense("src"), "model", manifest=False)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return ws.mix(model, model), ["pytorch_model.bin", "never pickles"]


# Corrupt or truncated safetensors

def _truncated(ws, manifest: bool) -> Path:
    model = ws.copy(ws.dense("src"), "model", manifest=manifest)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model


@case("truncated-safetensors")
def _(ws):
    model = _truncated(ws, manifest=False)
    return ws.mix(ws.dense("a"), model), [f"{model / 'model.safetensors'}", "corrupt or truncated"]


@case("truncated-safetensors-with-manifest")
def _(ws):
    model = _truncated(ws, manifest=True)
    return ws.mix(ws.dense("a"), model), [f"{model / 'model.safetensors'}", "truncated"]


@case("garbage-safetensors-header")
def _(ws):
    model = ws.copy(ws.dense("src"), "model", manifest=False)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(b"\xff" * 16 + data[16:])
    return ws.mix(model, model), [f"{model / 'model.safetensors'}", "not a readable safetensors file"]


@case("flipped-weight-byte")
def _(ws):
    seed = ws.copy(ws.assets.seed, "seed")
    flip_middle_byte(seed / "model.safetensors")
    return ws.train(seed, *ws.assets.data("code")), [f"{seed / 'model.safetensors'}: sha256 mismatch",
                                                     "corrupt or was modified"]


# Config fields out of range

@case("negative-size")
def _(ws):
    model = ws.edited_config("model", hidden_size=-64)
    return ws.mix(model, model), [f"{model / 'config.json'}", "hidden_size=-64", "positive integer"]


@case("top-k-above-experts")
def _(ws):
    model = ws.edited_config("model", n_ffn_experts=2, ffn_top_k=3)
    return ws.train(model, *ws.assets.data("code")), ["ffn_top_k=3", "at most n_ffn_experts=2"]


@case("heads-not-dividing-width")
def _(ws):
    model = ws.edited_config("model", num_attention_heads=5, num_key_value_heads=5, head_dim=None)
    return ws.mix(model, model), ["num_attention_heads=5", "divisor of hidden_size=64"]


@case("unknown-block-kind")
def _(ws):
    model = ws.edited_config("model", block="serial")
    return ws.mix(model, model), ["block='serial'", "parallel", "sequential"]


@case("init-config-negative-size")
def _(ws):
    config = ws.text("shape.json", json.dumps({"hidden_size": -8, "num_attention_heads": 2}))
    return (["init", "--config", config, "--tokenizer", ws.assets.tokenizer, "--out", ws.out],
            ["hidden_size=-8", "positive integer"])


@case("mix-top-k-above-experts")
def _(ws):
    a = ws.dense("a")
    return ws.mix(a, a, extra=["--top-k", "3"]), ["--top-k 3", "number of experts (2)"]


# Experts that do not fit together

@case("experts-with-mismatched-shapes")
def _(ws):
    return ws.mix(ws.dense("a"), ws.dense("b", intermediate_size=96)), ["intermediate_size", "128", "96"]


@case("experts-with-mismatched-vocabularies")
def _(ws):
    return ws.mix(ws.dense("a"), ws.dense("b", vocab_size=96)), ["vocab_size", "128", "96"]


@case("experts-with-mismatched-tokenizers")
def _(ws):
    a, b = ws.dense("a"), ws.dense("b")
    ws.text("a/tokenizer.json", json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    ws.text("b/tokenizer.json", json.dumps({"model": {"type": "BPE", "vocab": {"b": 0}}}))
    return ws.mix(a, b), ["different tokenizers", "vocabulary or merges"]


@case("experts-with-mismatched-block-kinds")
def _(ws):
    return ws.mix(ws.dense("a"), ws.dense("b", block="sequential")), ["block", "'parallel'", "'sequential'"]


# Unknown names

@case("unknown-mix-method")
def _(ws):
    a = ws.dense("a")
    return ws.mix(a, a, method="btxx"), ["--method", "invalid choice: 'btxx'", "bam mix --help"]


@case("unknown-export-format")
def _(ws):
    return ["export", ws.dense("a"), "--format", "gguf", "--out", ws.out], ["--format", "invalid choice: 'gguf'"]


@case("unknown-pipeline-method")
def _(ws):
    spec = ws.text("PIPELINE.yaml", f"demo: tiny\nmethods: [btx, moe]\nout: {ws.out}\n")
    return ["run", spec], ["methods", "unknown method 'moe'"]


# Data

@case("data-glob-matches-nothing")
def _(ws):
    return ws.train(ws.assets.seed, f"x={ws.root}/*.nothing"), ["*.nothing matches no files"]


@case("empty-data")
def _(ws):
    empty = ws.text("empty.txt", "")
    return ws.train(ws.assets.seed, f"x={empty}"), ["domain 'x'", "no documents", "empty.txt"]


@case("non-utf8-data")
def _(ws):
    latin = ws.text("latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    return ws.train(ws.assets.seed, f"x={latin}"), ["latin1.txt", "not UTF-8", "offset 3"]


@case("jsonl-without-text-field")
def _(ws):
    data = ws.text("docs.jsonl", json.dumps({"body": "some text"}) + "\n")
    return ws.train(ws.assets.seed, f"x={data}"), ["docs.jsonl:1", "no field 'text'"]


@case("sequence-beyond-context")
def _(ws):
    return (ws.train(ws.assets.seed, *ws.assets.data("code"), extra=["--seq-len", "100000"]),
            ["seq_len=100000", "beyond the model's context", "max_position_embeddings="])


def _small_vocab_model(ws) -> Path:
    return ws.dense("small-vocab", vocab_size=300)  # no tokenizer of its own: one is passed


@case("tokenizer-larger-than-vocab-train")
def _(ws):
    model = _small_vocab_model(ws)
    return (ws.train(model, *ws.assets.data("code"), extra=["--tokenizer", ws.assets.tokenizer]),
            ["512 tokens", "vocab_size=300"])


@case("tokenizer-larger-than-vocab-eval")
def _(ws):
    model = _small_vocab_model(ws)
    return (["eval", model, "--data", *ws.assets.data("code"), "--tokenizer", ws.assets.tokenizer,
             "--cache-dir", ws.assets.cache], ["512 tokens", "vocab_size=300"])


# Resume

@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(assets.seed), "--data", *assets.data("code", "prose"), "--out", str(out),
                     "--cache-dir", str(assets.cache), "--max-steps", "2", "--batch-size", "2", "--seq-len",
                     "16", "--eval-every", "0", "--save-every", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _resume(ws, model, lr: str = "3e-4") -> list:
    run = ws.copy(ws.finished_run, "run")
    argv = ws.train(model, *ws.assets.data("code", "prose"), extra=["--resume", "--lr", lr])
    argv[argv.index("--out") + 1] = run
    return argv


@case("resume-with-other-settings")
def _(ws):
    return _resume(ws, ws.assets.seed, lr="1e-3"), ["--resume", "belongs to a different run (train.lr"]


@case("resume-with-other-model")
def _(ws):
    other = ws.copy(ws.assets.seed, "other-seed", manifest=False)
    flip_middle_byte(other / "model.safetensors")  # other weights, same shapes: another starting model
    return _resume(ws, other), ["--resume", "belongs to a different run (model"]


@case("resume-with-other-data")
def _(ws):
    argv = _resume(ws, ws.assets.seed)
    prose = argv.index(f"prose={ws.assets.prose}")
    argv[prose] = f"prose={ws.assets.code}"  # same domain name, other text behind it
    return argv, ["--resume", "belongs to a different run (data.prose"]


@case("resume-from-corrupt-checkpoint")
def _(ws):
    argv = _resume(ws, ws.assets.seed)
    flip_middle_byte(ws.root / "run" / "checkpoints" / "step_000002" / "optimizer.safetensors")
    return argv, ["step_000002/optimizer.safetensors: sha256 mismatch", "to resume from the checkpoint before it"]


# Existing outputs

@case("existing-output-without-overwrite")
def _(ws):
    a = ws.dense("a")
    assert main(["mix", "--method", "btx", "--out", str(ws.out), str(a), str(a)]) == 0
    return ws.mix(a, a), ["out: output already exists", "--overwrite"]


@case("existing-output-kept-when-overwrite-fails")
def _(ws):
    a = ws.dense("a")
    assert main(["mix", "--method", "btx", "--out", str(ws.out), str(a), str(a)]) == 0
    corrupt = ws.copy(a, "corrupt")
    flip_middle_byte(corrupt / "model.safetensors")
    return ws.mix(a, corrupt, extra=["--overwrite"]), ["corrupt/model.safetensors: sha256 mismatch"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_and_leaves_nothing_behind(name, assets, finished_run, tmp_path, capsys):
    ws = Workspace(tmp_path / "ws", assets, finished_run)
    ws.root.mkdir()
    argv, needles = CASES[name](ws)
    before = tree_state(ws.root)

    code, err = cli(capsys, *argv)
    verb = argv[0]
    assert code == 2, err
    assert err.startswith(f"bam {verb}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    # Nothing created (no output, no temporary, no parent), nothing changed, inputs included.
    assert tree_state(ws.root) == before


def test_subprocess_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    dense = tiny_dense(tmp_path / "dense")
    corrupt = Path(shutil.copytree(dense, tmp_path / "corrupt"))
    flip_middle_byte(corrupt / "model.safetensors")
    argv = ["mix", "--method", "bam", "--out", str(tmp_path / "out"), str(dense), str(corrupt)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    done = subprocess.run([sys.executable, "-m", "bam.cli", *argv], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"bam mix: error: {corrupt / 'model.safetensors'}: sha256 mismatch")
    assert not (tmp_path / "out").exists() and done.stdout == ""

    debug = subprocess.run([sys.executable, "-m", "bam.cli", "--debug", *argv], capture_output=True, text=True,
                           env=env, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "BamError" in debug.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A full disk


class FullDisk:
    """Make writes to files under `root` fail with ENOSPC once `budget` bytes went there.

    Installed over builtins.open and io.open (which pathlib uses), so it reaches every write bam
    makes from Python: the streamed safetensors writer, json files, config.save_pretrained. The
    Rust writer of safetensors' save_file is out of its reach; the tmpfs test covers that.
    """

    def __init__(self, root: Path, budget: int):
        self.root, self.budget, self.used, self.failures = Path(root).resolve(), budget, 0, 0

    def install(self, monkeypatch) -> None:
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                    and Path(os.path.abspath(file)).is_relative_to(self.root):
                return _MeteredFile(handle, self)
            return handle

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)


class _MeteredFile:
    def __init__(self, handle, disk: FullDisk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if self._disk.used + size > self._disk.budget:
            self._disk.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.used += size
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_disk_full_while_mixing_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    dense = tiny_dense(tmp_path / "inputs" / "dense")
    existing = tmp_path / "outputs" / "existing"
    assert main(["mix", "--method", "btx", "--out", str(existing), str(dense), str(dense)]) == 0
    before = tree_state(tmp_path / "outputs")
    disk = FullDisk(tmp_path / "outputs", budget=(dense / "model.safetensors").stat().st_size)
    disk.install(monkeypatch)

    for out, extra in ((tmp_path / "outputs" / "new", []), (existing, ["--overwrite"])):
        code, err = cli(capsys, "mix", "--method", "bam", "--out", out, *extra, dense, dense)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"bam mix: error: no space left on device while writing {out} "), err
    assert disk.failures == 2
    assert tree_state(tmp_path / "outputs") == before  # no new directory, the existing one untouched


def test_disk_full_during_a_training_checkpoint_then_resume_is_identical(assets, tmp_path, capsys, monkeypatch,
                                                                         one_thread):
    def argv(out: Path, *extra) -> list:
        return ["train", assets.seed, "--data", *assets.data("code", "prose"), "--out", out, "--cache-dir",
                assets.cache, "--max-steps", 6, "--batch-size", 2, "--seq-len", 16, "--save-every", 2,
                "--eval-every", 0, "--no-progress", *extra]

    assert cli(capsys, *argv(tmp_path / "reference"))[0] == 0
    # Room for the first checkpoint's weights but not the second's.
    weights = (assets.seed / "model.safetensors").stat().st_size
    disk = FullDisk(tmp_path / "full", budget=int(1.5 * weights))
    with monkeypatch.context() as patch:
        disk.install(patch)
        code, err = cli(capsys, *argv(tmp_path / "full"))
    step_4 = tmp_path / "full" / "checkpoints" / "step_000004"
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"bam train: error: no space left on device while writing {step_4} "), err
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_000002"]
    assert not (tmp_path / "full" / "model").exists()

    # Space is back: --resume finishes the same run.
    assert cli(capsys, *argv(tmp_path / "full", "--resume"))[0] == 0
    expected, actual = tensors(tmp_path / "reference" / "model"), tensors(tmp_path / "full" / "model")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "reference")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB file system, where the machine lets us mount one (root in a container)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_a_real_small_file_system(tmp_path, tiny_tmpfs, capsys):
    """The kernel's own ENOSPC, reaching Python and Rust writers alike (mix streams ~900 kB here)."""
    dense = tiny_dense(tmp_path / "dense")
    out = tiny_tmpfs / "moe"
    code, err = cli(capsys, "mix", "--method", "bam", "--out", out, dense, dense, dense)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"bam mix: error: no space left on device while writing {out} "), err
    assert list(tiny_tmpfs.iterdir()) == []

    # safetensors' Rust writer (training checkpoints use it) fails the same way.
    from safetensors.torch import save_file

    with (pytest.raises(BamError, match=f"no space left on device while writing {tiny_tmpfs / 'ckpt'}"),
          atomic_output_dir(tiny_tmpfs / "ckpt") as tmp):
        save_file({"x": torch.zeros(1 << 17)}, str(tmp / "optimizer.safetensors"))
    assert list(tiny_tmpfs.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Numerical guards


def test_a_skipped_step_is_reported_on_stderr_and_in_the_metrics(assets, tmp_path, capsys, monkeypatch, one_thread):
    original = train_module.micro_step_loss
    calls = {"n": 0}

    def nan_on_third_call(run, tokens):
        calls["n"] += 1
        loss, parts = original(run, tokens)
        return (loss * float("nan"), [float("nan"), *parts[1:]]) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(train_module, "micro_step_loss", nan_on_third_call)
    out = tmp_path / "run"
    code, err = cli(capsys, "train", assets.seed, "--data", *assets.data("code"), "--out", out, "--cache-dir",
                    assets.cache, "--max-steps", 4, "--batch-size", 2, "--seq-len", 16, "--eval-every", 0,
                    "--save-every", 0, "--no-progress")
    assert code == 0
    assert "bam train: step 3 skipped (non-finite loss); 1 in a row, at most 5 allowed" in err
    skipped = [r for r in read_metrics(out) if r.get("skipped")]
    assert [(r["step"], r["reason"]) for r in skipped] == [(3, "non-finite loss")]


def test_router_logits_and_z_loss_stay_fp32_under_autocast():
    """Training runs under bf16 autocast on GPU; CPU autocast applies the same casting rules."""
    from bam.modeling.moe import MoEFFN

    config = BamConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, n_ffn_experts=4, n_attn_experts=2)
    torch.manual_seed(0)
    model = BamForCausalLM(config).eval()
    h = torch.randn(2, 5, 32)
    ffn: MoEFFN = model.model.layers[0].ffn
    with torch.no_grad():
        reference = ffn(h).routing.logits_TE
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ffn(h)
            gates = model.model.layers[0].attn.gates(h)
    assert out.routing.logits_TE.dtype == torch.float32 and out.z_loss.dtype == torch.float32
    assert gates.dtype == torch.float32
    torch.testing.assert_close(out.routing.logits_TE, reference)


# ---------------------------------------------------------------------------------------------
# Safe loading


def unsafe_loading(source: str, where: str) -> list[str]:
    """What in `source` could execute code hidden in a file: pickle libraries, torch.load without
    weights_only=True, numpy loads with allow_pickle=True, trust_remote_code not literally False.

    It reads calls, not text, so strings and docs (the export docs tell users about
    trust_remote_code=True) do not count.
    """
    def is_literal(node, value) -> bool:
        return isinstance(node, ast.Constant) and node.value is value

    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            if any(name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for name in names):
                problems.append(f"{where}:{node.lineno}: imports a pickle library")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if func == "torch.load" and not is_literal(keywords.get("weights_only"), True):
            problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        if "trust_remote_code" in keywords and not is_literal(keywords["trust_remote_code"], False):
            problems.append(f"{where}:{node.lineno}: {func}(trust_remote_code="
                            f"{ast.unparse(keywords['trust_remote_code'])})")
        if is_literal(keywords.get("allow_pickle"), True):
            problems.append(f"{where}:{node.lineno}: {func}(allow_pickle=True)")
    return problems


def test_package_source_never_unpickles_nor_trusts_remote_code():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += unsafe_loading(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert problems == []


def test_the_source_guard_catches_what_it_looks_for():
    source = ("import pickle\n"
              "x = torch.load(f)\n"
              "y = torch.load(f, weights_only=False)\n"
              "m = AutoModel.from_pretrained(p, trust_remote_code=True)\n"
              "z = np.load(f, allow_pickle=True)\n"
              "ok = torch.load(f, weights_only=True)\n"
              "fine = AutoConfig.from_pretrained(p, trust_remote_code=False)\n"
              "doc = 'AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)'\n")
    flagged = [int(problem.split(":")[1]) for problem in unsafe_loading(source, "example.py")]
    assert flagged == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# The kill test: SIGKILL at 20 seeded random moments, re-run, same result; never a visible
# directory without a valid manifest

KILLS = {"train": 8, "mix": 6, "run": 6}
POLL_SECONDS = 0.005


class Zygote:
    """Client of tests/_reliability_zygote.py: `bam` processes that start without importing."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "MPLBACKEND": "Agg"}
        self.proc = subprocess.Popen([sys.executable, str(TESTS / "_reliability_zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the zygote died"
        return json.loads(answer)

    def start(self, argv: list, log: Path) -> int:
        return self._ask({"run": [str(a) for a in argv], "log": str(log)})["pid"]

    def poll(self, pid: int) -> int | None:
        return self._ask({"poll": pid})["status"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


class VisibleTree:
    """Polls an output tree while a process writes it; collects what a reader must never see.

    A visible (not hidden) directory holding weights or a config.json must have a manifest that
    lists those files and that every file it lists matches. A directory pruned or replaced while
    being read is looked at again under its new identity, not reported.
    """

    def __init__(self, root: Path):
        self.root = root
        self.verified: set[tuple[str, int, int]] = set()
        self.problems: list[str] = []
        self.polls = 0

    def poll(self) -> None:
        self.polls += 1
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # temporaries are hidden
            needed = [f for f in filenames if f.endswith(".safetensors") or f == "config.json"]
            if needed:
                self._check(Path(dirpath), needed)

    def _check(self, directory: Path, needed: list[str], attempts: int = 3) -> None:
        try:
            identity = (str(directory), directory.stat().st_ino, directory.stat().st_mtime_ns)
        except FileNotFoundError:
            return
        if identity in self.verified:
            return
        try:
            listed = read_manifest(directory)
            if listed is None:
                raise BamError(f"{directory}: visible without a manifest")
            missing = [name for name in needed if name not in listed]
            if missing:
                raise BamError(f"{directory}: {missing[0]} is not in its manifest")
            verify_manifest(directory)
            self.verified.add(identity)
        except BamError as err:
            try:
                replaced = directory.stat().st_ino != identity[1]
            except FileNotFoundError:
                return  # renamed away (pruned) while we read it
            if replaced and attempts:
                self._check(directory, needed, attempts - 1)
            else:
                self.problems.append(str(err))


def run_to_end(zygote: Zygote, argv: list, log: Path, tree: VisibleTree) -> None:
    pid = zygote.start(argv, log)
    while (status := zygote.poll(pid)) is None:
        tree.poll()
        time.sleep(POLL_SECONDS)
    tree.poll()
    assert status == 0, log.read_text()[-3000:]


def run_and_kill(zygote: Zygote, argv: list, log: Path, delay: float, tree: VisibleTree) -> bool:
    """Start `bam argv`, SIGKILL it after `delay` seconds; False if it had finished by then."""
    pid = zygote.start(argv, log)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        status = zygote.poll(pid)
        if status is not None:
            assert status == 0, log.read_text()[-3000:]
            return False
        tree.poll()
        time.sleep(POLL_SECONDS)
    os.kill(pid, signal.SIGKILL)
    status = zygote.wait(pid)
    tree.poll()
    return status == -signal.SIGKILL


def leftovers(root: Path) -> list[str]:
    """Temporaries of killed writers (hidden entries, *.tmp files) still there after the re-run."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# Each command: how to run it into a fresh directory, how to re-run it, what must come out equal.

@dataclass
class Scenario:
    argv: Callable[[Path], list]  # the command, writing under a fresh root
    rerun: Callable[[Path], list | None]  # what finishes the job after a kill (None: nothing to do)
    result: Callable[[Path], object]  # what must equal the uninterrupted run's


def train_scenario(assets: Assets) -> Scenario:
    def argv(root: Path) -> list:
        return ["train", assets.seed, "--data", *assets.data("code", "prose"), "--out", root / "run",
                "--cache-dir", root / "cache", "--max-steps", 10, "--batch-size", 4, "--seq-len", 32,
                "--save-every", 2, "--eval-every", 5, "--eval-tokens", 256, "--no-progress"]

    def result(root: Path):
        metrics = read_metrics(root / "run")
        return (tensors(root / "run" / "model"), train_losses(root / "run"),
                [r["step"] for r in metrics], [r["val"] for r in metrics if "val" in r])

    return Scenario(argv, lambda root: [*argv(root), "--resume"], result)


def mix_scenario(experts: list[Path]) -> Scenario:
    def argv(root: Path) -> list:
        return ["mix", "--method", "bam", "--top-k", "2", "--seed", "3", "--out", root / "moe", *experts]

    def rerun(root: Path) -> list | None:
        # Killed after the rename: the output is complete and a re-run would be refused as existing.
        return None if (root / "moe").exists() else argv(root)

    return Scenario(argv, rerun, lambda root: tree_state(root / "moe"))


def run_scenario(assets: Assets, spec: Path) -> Scenario:
    def argv(root: Path) -> list:
        return ["run", spec, "--out", root / "study"]

    def result(root: Path):
        report = json.loads((root / "study" / "report" / "report.json").read_text())
        numbers = {name: {d: stat["per_seed"] for d, stat in model["perplexity"].items()}
                   for name, model in report["models"].items()}
        # Every stage's model too: stage directories are named by what they depend on, so the
        # same names appear in every run.
        stages = root / "study" / "stages"
        models = {str(p.relative_to(stages)): tensors(p) for p in sorted(stages.glob("*/run/model"))}
        models |= {str(p.relative_to(stages)): tensors(p) for p in sorted(stages.glob("mix-*/model"))}
        return numbers, models

    return Scenario(argv, argv, result)


def assert_equal_results(expected, actual, where: str = "") -> None:
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_equal_results(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual)):
            assert_equal_results(a, b, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs"
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


@pytest.fixture(scope="module")
def mix_experts(tmp_path_factory) -> list[Path]:
    """Two dense experts of ~8 MB, each given twice: mixing writes ~34 MB, long enough to be killed
    in the middle of writing."""
    root = tmp_path_factory.mktemp("experts")
    shape = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
    a, b = tiny_dense(root / "a", 0, **shape), tiny_dense(root / "b", 1, **shape)
    return [a, b, a, b]


@pytest.fixture(scope="module")
def pipeline_spec(assets, tmp_path_factory) -> Path:
    """The tiny demo, made tinier: two domains of this machine's text, a few steps per stage."""
    spec = tmp_path_factory.mktemp("pipeline") / "PIPELINE.yaml"
    spec.write_text(
        "demo: tiny\n"
        f"domains: {{general: {assets.prose}, code: {assets.code}}}\n"
        "vocab_size: 300\nseq_len: 32\n"
        "pretrain: {steps: 4, batch_size: 4, lr: 0.003, warmup: 1, save_every: 2}\n"
        "cpt: {steps: 4, batch_size: 4, lr: 0.002, warmup: 1, save_every: 2}\n"
        "mixture: {steps: 4, batch_size: 4, lr: 0.002, warmup: 1, save_every: 2}\n"
        "methods: [btx, bam]\ncompute_matched: false\n"
        "eval_max_tokens: 256\neval_batch_size: 4\nrouting_max_tokens: 128\n")
    return spec


@pytest.mark.parametrize("command", list(KILLS))
def test_sigkill_at_random_moments_then_rerun_ends_identical(command, zygote, assets, mix_experts, pipeline_spec,
                                                             tmp_path):
    scenario = {"train": lambda: train_scenario(assets), "mix": lambda: mix_scenario(mix_experts),
                "run": lambda: run_scenario(assets, pipeline_spec)}[command]()
    # Two uninterrupted runs: they must agree with each other, and the shorter one sets the range
    # of kill delays (fsync times on a shared machine make any single duration noisy).
    durations, results = [], []
    for name in ("reference", "reference-again"):
        root = tmp_path / name
        root.mkdir()
        tree = VisibleTree(root)
        started = time.monotonic()
        run_to_end(zygote, scenario.argv(root), tmp_path / f"{name}.log", tree)
        durations.append(time.monotonic() - started)
        results.append(scenario.result(root))
        assert tree.problems == [], tree.problems[:3]
    expected = results[0]
    assert_equal_results(expected, results[1], "two uninterrupted runs")
    duration = min(durations)

    rng = random.Random(f"bam-kill-{command}")  # seeded: the same moments (relative to the run) every time
    killed = 0
    for trial in range(KILLS[command]):
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        tree = VisibleTree(root)
        delay = rng.uniform(0.0, duration)
        killed += run_and_kill(zygote, scenario.argv(root), tmp_path / f"trial{trial}.log", delay, tree)
        argv = scenario.rerun(root)
        if argv is not None:
            run_to_end(zygote, argv, tmp_path / f"trial{trial}.rerun.log", tree)
        assert tree.problems == [], f"trial {trial} (killed after {delay:.2f} s): {tree.problems[:3]}"
        assert tree.polls > 1
        assert leftovers(root) == [], f"trial {trial}: the re-run left temporaries behind"
        assert_equal_results(expected, scenario.result(root), f"trial {trial} (killed after {delay:.2f} s)")
    # Most kills land while the command works (the rest find it finished): the test has teeth.
    assert killed >= KILLS[command] // 2, (f"only {killed} of {KILLS[command]} runs were still running when "
                                           f"killed (uninterrupted runs took {durations})")
