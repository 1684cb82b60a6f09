"""The command lines as a user meets them: help text, and config mistakes reported in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_train_help_lists_the_stages():
    result = run_script("train.py", "--help")

    assert result.returncode == 0
    for stage in ("vqgan", "condition", "transformer", "bundle"):
        assert stage in result.stdout
    assert "--resume" in result.stdout


def test_train_rejects_an_unknown_stage():
    result = run_script("train.py", "painting")

    assert result.returncode == 2
    assert "invalid choice: 'painting'" in result.stderr


def test_train_reports_a_bad_override_in_one_line(tmp_path):
    result = run_script(
        "train.py",
        "vqgan",
        "run.steps=notanumber",
        f"data.index={tmp_path / 'absent.jsonl'}",
        f"run.out={tmp_path / 'runs'}",
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "run.steps" in line]
    assert len(lines) == 1
    assert "ERROR" in lines[0]
    assert "notanumber" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_train_reports_a_missing_config_file_in_one_line(tmp_path):
    result = run_script("train.py", "vqgan", "--config", str(tmp_path / "absent.yaml"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "absent.yaml does not exist" in result.stderr


@pytest.mark.skipif(not (REPO_ROOT / "app.py").exists(), reason="app.py is not written yet")
def test_app_help_exits_cleanly():
    result = run_script("app.py", "--help")

    assert result.returncode == 0
    assert "usage" in result.stdout.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "--temperature must be above 0, got -1"),
        (["--layout", "docs/examples/lake_layout.png", "--scene", "lake"], "free mode only"),
    ],
)
def test_sample_refuses_settings_that_cannot_work_together(args, message):
    result = run_script("-m", "core.sample", *args)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
