"""The demo's built-in corpus depends on bam's pinned install only, and the README quotes its fingerprint."""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bam
from bam.data.corpus import (
    DOMAINS,
    LICENSE_DISTRIBUTIONS,
    LICENSE_PREFIXES,
    LOCK_FILE,
    MATH_DISTRIBUTIONS,
    REFERENCE_FINGERPRINT,
    build_corpus,
    corpus_fingerprint,
    locked_versions,
    source_versions,
    source_warnings,
)
from bam.data.sources import documents_sha256

REPO = Path(bam.__file__).resolve().parent.parent


def default_install() -> dict[str, importlib.metadata.Distribution]:
    """The distributions `pip install -e .` brings: bam's requirements without extras, transitively."""
    found = {}
    pending = ["bam"]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def test_the_named_sources_come_with_the_default_install_and_the_lock_file_pins_them():
    installed = default_install()
    for name in {*LICENSE_DISTRIBUTIONS, *MATH_DISTRIBUTIONS}:
        assert canonicalize_name(name) in installed, f"{name} is not brought by `pip install -e .`"
    pins = locked_versions()
    assert pins is not None, f"{LOCK_FILE} is missing"
    unpinned = sorted(n for n in {*LICENSE_DISTRIBUTIONS, *MATH_DISTRIBUTIONS} if canonicalize_name(n) not in pins)
    assert not unpinned, f"not pinned by {LOCK_FILE}: {unpinned}"


def test_the_readme_quotes_the_reference_fingerprint():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert REFERENCE_FINGERPRINT in readme
    quoted = set(re.findall(r"corpus fingerprint `([0-9a-f]{64})`", readme))
    assert quoted == {REFERENCE_FINGERPRINT}, "the README quotes another corpus fingerprint than bam.data.corpus"


def test_fingerprints_are_bam_data_content_digests_of_the_documents():
    # Length-prefixed: document boundaries are part of the digest.
    assert documents_sha256(["ab"]) != documents_sha256(["a", "b"])
    assert documents_sha256([]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    combined = corpus_fingerprint({name: documents_sha256([name]) for name in DOMAINS})
    assert combined != corpus_fingerprint({name: documents_sha256([name * 2]) for name in DOMAINS})


def test_a_version_other_than_the_lock_files_is_named_in_a_warning(tmp_path):
    versions = source_versions()
    lock = tmp_path / "default.txt"
    pins = [f"{name}=={versions[name]}" for name in sorted({*LICENSE_DISTRIBUTIONS, *MATH_DISTRIBUTIONS})]
    lock.write_text("# pinned\n" + "\n".join(pins) + "\n")
    assert not [w for w in source_warnings(versions, lock) if "pins" in w or "not installed" in w]
    # torch's local build tag (+cpu) is the pinned release; another sympy is not
    pins = [p for p in pins if not p.startswith(("torch==", "sympy=="))]
    lock.write_text("\n".join([*pins, "torch==" + versions["torch"].split("+")[0], "sympy==1.0.0 \\"]) + "\n")
    warnings = source_warnings({**versions, "mpmath": None}, lock)
    assert f"sympy {versions['sympy']} installed, default.txt pins 1.0.0: its text may differ" in warnings
    assert "mpmath is not installed: its text is missing from the corpus" in warnings
    assert not [w for w in warnings if w.startswith("torch")]
    assert [w for w in source_warnings({**versions, "python": "3.99.0"}, lock) if "Python 3.99.0 here" in w]
    assert f"{tmp_path / 'none.txt'} not found" in source_warnings(versions, tmp_path / "none.txt")[-1]


RESTRICTED = """
import importlib.metadata, json, sys
sys.path[:0] = sys.argv[1:]
from bam.data.corpus import build_corpus
corpus = build_corpus()
print(json.dumps({"domains": {n: d.fingerprint for n, d in corpus.domains.items()},
                  "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions())}))
"""


@pytest.mark.slow
def test_the_corpus_is_the_same_with_and_without_the_test_extra(tmp_path):
    """The corpus read in two environments, this one (bam with its [test] extra: pytest, datasets,
    pyarrow, lm-eval and their dependencies, dozens of distributions with licence files) and one
    that holds only what `pip install -e .` brings, gives the same documents in every domain.

    The second environment is real as far as Python can tell: a directory of links to exactly the
    default install's distributions (their packages and .dist-info, from bam's requirements without
    extras, followed transitively), run with `python -S` so that site-packages is not on sys.path.
    importlib.metadata and imports see nothing else, which is what a fresh venv with
    `pip install -e .` would show, without the minutes of installing one. The test also checks that
    the two environments differ where the old corpus looked: licence files of every installed
    distribution.
    """
    env = tmp_path / "default-install"
    env.mkdir()
    default = default_install()
    for name, dist in default.items():
        if name == "bam":
            continue  # editable: the repository itself goes on sys.path
        for top in sorted({entry.parts[0] for entry in dist.files if entry.parts[0] != ".."}):
            link = env / top
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(top)))
    result = subprocess.run([sys.executable, "-S", "-c", RESTRICTED, str(env), str(REPO)], capture_output=True,
                            text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    restricted = json.loads(result.stdout.splitlines()[-1])

    # The environments differ: the test extra's distributions, licence files and all, are here only.
    here = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    there = {canonicalize_name(n) for n in restricted["distributions"]}
    assert there <= set(default) and {"pytest", "datasets", "lm-eval"} <= here - there
    licensed_extras = [n for n in here - there
                       if any(f.name.upper().startswith(LICENSE_PREFIXES) for f in importlib.metadata.distribution(n).files or [])]
    assert licensed_extras, "no extra distribution ships a licence file: the test would show nothing"

    assert {n: d.fingerprint for n, d in build_corpus().domains.items()} == restricted["domains"]
