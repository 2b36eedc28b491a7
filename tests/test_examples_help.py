"""The examples' --help prints what the program does and stops (demo.py --help used to run the whole demo)."""
import ast
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def help_of(script, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=EXAMPLES)


@pytest.mark.parametrize("script", ["demo.py", "seed_regression.py", "digits.py", "compare_peers.py",
                                    "online_learning_njit.py"])
def test_help_shows_the_whole_description_and_runs_nothing(script):
    done = help_of(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
    docstring = ast.get_docstring(ast.parse((EXAMPLES / script).read_text()))
    first_paragraph = " ".join(docstring.split("\n\n")[0].split())
    assert first_paragraph in " ".join(done.stdout.split())  # not cut mid-sentence
    assert "==" not in done.stdout and "fastbp: compiling" not in done.stderr  # nothing ran


def test_online_learning_states_its_step_limit():
    assert "at least 2000" in help_of("online_learning_njit.py", "--help").stdout
    done = help_of("online_learning_njit.py", "--steps", "200")
    assert done.returncode == 2 and "--steps must be at least 2000" in done.stderr and "got --steps 200" in done.stderr
