"""The command lines as a user meets them: help text, and config mistakes reported in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
        (["--top-k", "-4"], "--top-k must be 0 (off) or more, got -4"),
        (["--top-p", "1.5"], "--top-p must be above 0 and at most 1 (1 = off), got 1.5"),
        (["--window", "-1"], "--window must be 0 (as trained)"),
    ],
)
def test_sample_refuses_settings_that_cannot_work_together(args, message):
    result = run_script("-m", "core.sample", *args)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def tiny_bundle(monkeypatch):
    """core.sample with the untrained tiny pipeline in place of a bundle on disk."""
    from core.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, folder: Pipeline.tiny()))


def test_sample_takes_the_sketchs_size_and_keeps_earlier_results(tiny_bundle, tmp_path, caplog):
    from core.metadata import read_metadata
    from core.sample import main

    drawing = np.full((48, 80), 255, dtype=np.uint8)
    drawing[24] = 0
    Image.fromarray(drawing).save(tmp_path / "line.png")
    args = ["--sketch", str(tmp_path / "line.png"), "--out", str(tmp_path / "out"), "--window", "0"]
    assert main([*args, "--factor", "8", "--prior", "2"]) == 0
    assert "--factor is ignored" in caplog.text and "--prior is ignored" in caplog.text
    assert main(args) == 0  # the same name again: a second file, not an overwrite

    first, second = tmp_path / "out/sketch-seed0-0.png", tmp_path / "out/sketch-seed0-0-2.png"
    assert Image.open(first).size == (80, 48) and Image.open(second).size == (80, 48)
    assert read_metadata(first)["request"]["prior"] == 0.0  # no class prior outside layouts
