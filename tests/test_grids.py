"""The study's grids (benchmarks/grids/*.sh) plan on this machine: every strategy, option and
axis value they name exists, and each plans the points its figure needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GRIDS = sorted((Path(__file__).parent.parent / "benchmarks" / "grids").glob("*.sh"))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.stem)
def test_each_grid_plans_its_points(grid: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["sh", str(grid), str(tmp_path / "out"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    planned = re.search(r"sweep --dry-run: (\d+) runs \((\d+) points", done.stdout)
    assert planned, done.stdout[-2000:]
    assert int(planned[2]) >= 2  # a figure needs at least two points on its axis
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.arrow"))


def test_the_readme_lists_every_grid() -> None:
    readme = (GRIDS[0].parent / "README.md").read_text()
    assert all(f"`{grid.name}`" in readme for grid in GRIDS)
