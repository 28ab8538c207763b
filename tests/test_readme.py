"""The README's Python examples, run as written: README and code cannot drift apart."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _block(marker: str) -> str:
    (block,) = [b for b in BLOCKS if marker in b]
    return block


def _run(code: str, tmp_path: Path) -> str:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _ANSI.sub("", done.stdout)


def _table(printed: str) -> dict[str, list[float]]:
    """skorch's per-epoch table as columns of numbers."""
    lines = printed.splitlines()
    top = next(i for i, line in enumerate(lines) if line.split()[:1] == ["epoch"])
    header = lines[top].split()
    rows = [line.split() for line in lines[top + 2 :] if line.strip()]
    rows = [r for r in rows if len(r) == len(header)]
    return {name: [float(r[i]) for r in rows] for i, name in enumerate(header)}


def test_every_python_block_is_covered_by_a_test():
    covered = ("DaskRegressor(", "LocalCluster(", "ShiftedDigits(")
    assert len(BLOCKS) == len(covered)
    assert all(any(m in b for b in BLOCKS) for m in covered)


def test_first_example_shows_the_batch_growing_and_the_loss_falling(tmp_path):
    table = _table(_run(_block("DaskRegressor("), tmp_path))
    assert table["epoch"] == list(range(1, 13))
    sizes = table["batch_size"]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] == 1024
    assert table["model_updates"][-1] < 1500 / 2  # far fewer than a constant batch of 16
    loss = table["train_loss"]
    assert loss[-1] < loss[0] / 10


def test_cluster_example_grows_the_workers_with_the_batch(tmp_path):
    table = _table(_run(_block("LocalCluster("), tmp_path))
    assert table["batch_size"] == [32, 32, 64, 64, 128, 128]
    assert table["workers"] == [1, 1, 2, 2, 4, 4]
    assert table["valid_acc"][-1] > 0.8


def test_dataset_example_trains_on_fresh_shifts(tmp_path):
    printed = _run(_block("ShiftedDigits("), tmp_path)
    table = _table(printed)
    assert table["epoch"] == list(range(1, 9))
    assert table["valid_acc"][-1] > 0.7  # about 0.8: the shifts make it harder than plain digits
    accuracy = float(printed.rsplit("accuracy on freshly shifted digits:", 1)[1].split()[0])
    assert accuracy > 0.7
