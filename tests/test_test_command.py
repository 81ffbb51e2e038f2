"""scripts/test's own exit rules, with a stand-in ``uv`` on the PATH: a type error fails the run
even though mypy runs beside pytest, and a run of no test is a failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# ``uv run [--options] TOOL ...`` exits with $FAKE_<TOOL>_EXIT (default 0) and says what ran.
FAKE_UV = """#!/usr/bin/env bash
[[ "$1" == run ]] || exit 0
shift
while [[ "$1" == --* ]]; do shift; done
tool="$1"
echo "ran $tool"
var="FAKE_${tool^^}_EXIT"
exit "${!var:-0}"
"""


def _run(tmp_path: Path, **exits: int) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    uv = bin_dir / "uv"
    uv.write_text(FAKE_UV)
    uv.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           **{f"FAKE_{tool.upper()}_EXIT": str(code) for tool, code in exits.items()}}
    return subprocess.run([str(ROOT / "scripts" / "test"), "--fast"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_every_check_passing_passes(tmp_path: Path) -> None:
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ran", "ruff", "ran", "pytest", "ran", "mypy"]


@pytest.mark.parametrize(("exits", "code"), [({"mypy": 1}, 1), ({"pytest": 1}, 1),
                                             ({"pytest": 5}, 5), ({"pytest": 2, "mypy": 1}, 2)])
def test_a_failing_check_fails_the_run(tmp_path: Path, exits: dict[str, int], code: int) -> None:
    assert _run(tmp_path, **exits).returncode == code


def test_ruff_failing_stops_the_run_before_the_tests(tmp_path: Path) -> None:
    done = _run(tmp_path, ruff=1)
    assert done.returncode == 1
    assert done.stdout.split() == ["ran", "ruff"]
