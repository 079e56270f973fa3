"""The examples run as a user runs them, and print what their text promises."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], cwd=ROOT,
                       env=env, timeout=90, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.timeout(120)
def test_engines_example_lists_the_replacement(no_leaks):
    out = run_example("engines.py")
    assert "as expected: engine" in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("still serving: 1024 engines now "), out
    engines = ast.literal_eval(last.rpartition("engines now ")[2])
    assert len(engines) == 2, out  # the survivor and the replacement, a new id
    assert max(engines) == 2, out


def _readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("## Set-up", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_commands_stand_alone_and_ci_runs_the_test_one():
    demo, test = _readme_commands()
    venvs = [cmd.split("&&")[0].split()[-1] for cmd in (demo, test)]
    for cmd, venv in zip((demo, test), venvs):
        assert cmd.startswith(f"python3 -m venv {venv} && . {venv}/bin/activate && "), cmd
    # a second command in the same directory must not reuse the first one's environment
    assert venvs[0] != venvs[1], venvs
    # .ci/run: a fresh venv, then exactly the README's test command
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    installs_and_tests = test.split(f"{venvs[1]}/bin/activate && ", 1)[1]
    assert ci[-1] == installs_and_tests, (ci[-1], installs_and_tests)
