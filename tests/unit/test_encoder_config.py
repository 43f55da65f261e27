"""EncoderConfig.from_args: flags over IVL_ENCODER_* env over defaults; bad values name the flag."""

from __future__ import annotations

import pytest

from services.vision_encoder.config import DEFAULT_PORT, EncoderConfig


def test_defaults_bind_loopback() -> None:
    cfg = EncoderConfig.from_args(["--model", "/m"], env={})
    assert cfg.host == "127.0.0.1" and cfg.port == DEFAULT_PORT
    assert cfg.server_config().address == f"127.0.0.1:{DEFAULT_PORT}"


def test_env_defaults_and_flags_override() -> None:
    env = {"IVL_MODEL": "/shared", "IVL_ENCODER_PORT": "6000", "IVL_ENCODER_BATCH_WAIT_MS": "2.5"}
    cfg = EncoderConfig.from_args([], env=env)
    assert (cfg.model, cfg.port, cfg.batch_wait_ms) == ("/shared", 6000, 2.5)
    env["IVL_ENCODER_MODEL"] = "/encoder"
    cfg = EncoderConfig.from_args(["--port", "7000"], env=env)
    assert (cfg.model, cfg.port) == ("/encoder", 7000)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        ([], {}),  # no model
        (["--model", "/m", "--max-batch-tiles", "0"], {}),
        (["--model", "/m", "--max-batch-tiles", "64", "--max-queued-tiles", "32"], {}),
        (["--model", "/m", "--dtype", "int8"], {}),
        (["--model", "/m"], {"IVL_ENCODER_PORT": "not-a-port"}),
        (["--model", "/m", "--chunk-bytes", "0"], {}),
    ],
)
def test_bad_values_exit_with_usage(argv: list[str], env: dict[str, str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        EncoderConfig.from_args(argv, env=env)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
