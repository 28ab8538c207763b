"""The ``adadamp`` command line: what it needs installed, and its help texts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import adadamp

INSTALL_HINT = 'pip install "adadamp[experiments]"'


def _python(
    args: list[str], tmp_path: Path, blocked: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` as if the packages ``blocked`` were not installed.

    A ``sitecustomize`` puts a None entry in ``sys.modules`` for each before
    anything else is imported, which makes importing them fail as for a
    missing package.
    """
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    )
    path = [str(tmp_path), str(Path(adadamp.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "adadamp.cli", "compare"],
        ["-m", "adadamp.cli", "train", "--help"],
        ["-m", "adadamp.experiments.synthetic"],
    ],
)
def test_experiments_without_the_extra_say_what_to_install(args, tmp_path):
    done = _python(args, tmp_path, blocked=("matplotlib",))
    assert done.returncode == 1, done.stderr
    assert INSTALL_HINT in done.stderr
    assert "matplotlib is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_message_names_every_missing_package(tmp_path):
    done = _python(["-m", "adadamp.cli", "compare"], tmp_path, blocked=("matplotlib", "mnist1d"))
    assert done.returncode == 1
    assert "matplotlib and mnist1d are not installed" in done.stderr


def test_the_core_needs_no_extra(tmp_path):
    code = (
        "import sys, adadamp, adadamp.simulate; from adadamp import DaskClassifier; "
        "print(sorted(m for m in ('matplotlib', 'mnist1d') if m in sys.modules))"
    )
    done = _python(["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    done = _python(
        ["-m", "adadamp.cli", "simulate", "--paper"], tmp_path, blocked=("matplotlib", "mnist1d")
    )
    assert done.returncode == 0, done.stderr
    assert "78,200" in done.stdout


@pytest.mark.parametrize("argv", [[], ["train"], ["compare"], ["simulate"]])
def test_help_is_plain_text(argv, capsys):
    from adadamp.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: adadamp")
    assert "``" not in printed


def test_synthetic_help_is_plain_text(capsys):
    from adadamp.experiments.synthetic import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out
