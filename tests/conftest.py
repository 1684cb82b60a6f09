"""Shared test fixtures: one CPU thread, a scratch folder as working directory, a tiny VQGAN.

Tests run beside a training job on a small machine, so torch is held to a single thread both
here and in any subprocess a test starts (they inherit OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere

import httpx
import pytest
import torch

from core.vqgan import VQGANConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Keep torch on one CPU thread for the whole session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo_root() -> Path:
    """The repository root, where train.py and app.py live."""
    return REPO_ROOT


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh empty folder that is also the current directory for the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_vqgan_config() -> VQGANConfig:
    """A VQGAN small enough to build and run in milliseconds: f = 2, 16 codes of 4 dims.

    Each test gets its own instance; derive variants with `dataclasses.replace`.
    """
    return VQGANConfig(
        channels=8,
        channel_mult=[1, 2],
        codebook_size=16,
        code_dim=4,
        z_channels=8,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory: pytest.TempPathFactory):
    """`python app.py --tiny` on a free port, stopped after the module's tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("studio") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "app.py", "--tiny", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"the studio exited early:\n{log.read_text()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the studio did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
