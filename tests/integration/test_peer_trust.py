"""Start-up refusals as real processes see them: a model service open to the network without mutual
TLS, and a password on a command line (issue 16, points 6 and 7). Each process exits with status 2
and a message saying what to do, before it binds anything or loads a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import load_kit
from tests.integration.hardening import DECODER, ENCODER, GATEWAY
from tests.integration.procs import REPO_ROOT
from tests.integration.stack import model_args

KIT = load_kit()


def run_module(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args, "--port", "0", "--metrics-port", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("module", [ENCODER, DECODER])
def test_a_model_service_refuses_a_public_bind_without_mutual_tls(module: str) -> None:
    out = run_module(module, [*model_args(KIT.root), "--host", "0.0.0.0"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--host 0.0.0.0 reaches beyond this machine" in out.stderr and "--tls-ca" in out.stderr
    assert "listening" not in out.stderr + out.stdout


def test_the_gateway_refuses_a_redis_password_on_its_command_line() -> None:
    out = run_module(GATEWAY, ["--insecure-open", "--session-redis-url", "redis://:hunter2@127.0.0.1:6379/0"])
    assert out.returncode == 2
    assert "hunter2" not in out.stderr and "IVL_SESSION_REDIS_URL" in out.stderr and "command line" in out.stderr
