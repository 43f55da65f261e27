"""Start-up refusals of service-to-service trust and secrets on command lines (pure config parsing)."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from services.common.argv_secrets import argv_secret_problem, has_password
from services.language_decoder.config import DecoderConfig
from services.tools import run_local
from services.vision_encoder.config import EncoderConfig

TLS = ["--tls-cert", "s.crt", "--tls-key", "s.key"]


@pytest.mark.parametrize("config", [EncoderConfig, DecoderConfig])
def test_model_services_refuse_a_public_bind_without_mutual_tls(config, capsys):
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        for extra in ([], TLS):  # TLS without --tls-ca authenticates the server only: still open to anyone
            with pytest.raises(SystemExit):
                config.from_args(["--model", "m", "--host", host, *extra], env={})
            err = capsys.readouterr().err
            assert f"--host {host} reaches beyond this machine" in err and "--tls-ca" in err and "make certs" in err
    assert config.from_args(["--model", "m", "--host", "0.0.0.0", *TLS, "--tls-ca", "ca.crt"], env={}).tls_ca
    assert config.from_args(["--model", "m", "--host", "0.0.0.0", "--allow-unauthenticated-peers"], env={})
    assert config.from_args(["--model", "m"], env={}).host == "127.0.0.1"  # loopback: plaintext is fine
    assert config.from_args(["--model", "m", "--host", "localhost"], env={})


def test_health_port_is_a_flag_and_env(capsys):
    prefix = "IVL_ENCODER_"
    cfg = EncoderConfig.from_args(["--model", "m"], env={prefix + "HEALTH_PORT": "50062"})
    assert cfg.health_port == 50062 and cfg.server_config().health_port == 50062
    assert DecoderConfig.from_args(["--model", "m", "--health-port", "7"], env={}).server_config().health_port == 7
    with pytest.raises(SystemExit):
        EncoderConfig.from_args(["--model", "m", "--health-port", "70000"], env={})
    assert "--health-port must be in [0, 65535]" in capsys.readouterr().err


def test_passwords_in_urls_are_found_in_any_flag_form():
    assert has_password("redis://:pw@h:6379/0") and has_password("rediss://user:pw@h/0")
    assert not has_password("redis://h:6379/0") and not has_password("redis://user@h/0")
    assert not has_password("x@y") and not has_password("http://[bad")
    for argv in (["--redis-url", "redis://:pw@h/0"], ["--redis-url=redis://:pw@h/0"], ["--redis", "redis://:pw@h/0"],
                 ["--gateway-args", "x"], ["--session-redis-url", "rediss://u:pw@h/0"]):
        problem = argv_secret_problem(argv, "ENV_X")
        if "pw" in " ".join(argv):
            assert problem and "pw" not in problem and "ENV_X" in problem and "process listing" in problem
        else:
            assert problem is None


def test_gateway_refuses_a_redis_password_on_its_command_line_but_takes_it_from_env(capsys):
    for flag in ("--redis-url", "--session-redis-url", "--feature-cache-url"):
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(["--insecure-open", flag, "redis://:hunter2@127.0.0.1:6379/0"], env={})
        err = capsys.readouterr().err
        assert "hunter2" not in err and "IVL_SESSION_REDIS_URL" in err and "command line" in err
    cfg = GatewayConfig.from_args(["--insecure-open"], env={"IVL_SESSION_REDIS_URL": "redis://:hunter2@h:1/0"})
    assert cfg.session_redis_url == "redis://:hunter2@h:1/0" and "hunter2" not in cfg.summary()


def test_run_local_refuses_a_redis_password_on_its_command_line(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        run_local.parse_args(["--redis-url", "redis://:hunter2@127.0.0.1:6379/0"])
    err = capsys.readouterr().err
    assert "hunter2" not in err and run_local.REDIS_URL_ENV in err
    monkeypatch.setenv(run_local.REDIS_URL_ENV, "redis://:hunter2@127.0.0.1:6379/0")
    assert run_local.parse_args([]).redis_url == "redis://:hunter2@127.0.0.1:6379/0"
