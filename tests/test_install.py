"""The install is one fact in several files: README's commands, .ci/run, the lock files, pyproject.

CI runs .ci/run, users run README's commands; if the two drift, a green CI says nothing about what a
user gets. The lock files are the tested set (scripts/releases.py lock), and pyproject.toml's ranges
must admit what they pin.
"""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return block.group(1).strip().splitlines()


def lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, sep, version = line.partition("==")
            assert sep, f"requirements/{name}.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(package)] = Version(version)
    return pins


def test_readme_starts_with_the_demo_and_the_test_command_and_ci_runs_the_latter_verbatim():
    demo, tests = readme_commands()
    assert demo.endswith("&& bam demo") and "-c requirements/default.txt" in demo
    assert tests.endswith("&& python -m pytest -q") and "-c requirements/test.txt" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_lock_files_pin_one_consistent_tested_set():
    default, test = lock("default"), lock("test")
    assert default, "requirements/default.txt is empty"
    assert {name: test.get(name) for name in default} == default  # the default set is the test set's subset
    torch_in_readme = {re.search(r"torch==([\w.]+)", command).group(1) for command in readme_commands()}
    assert torch_in_readme == {str(test["torch"])}


def test_pyproject_ranges_admit_the_locked_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    test = lock("test")
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "bam":
            continue
        assert name in test, f"{requirement} is not in requirements/test.txt"
        assert requirement.specifier.contains(test[name], prereleases=True), f"{requirement} excludes the lock's {test[name]}"
