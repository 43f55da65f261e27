"""The conventions' and security's flags on all three services: names, env vars, defaults, checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.feature_cache import redis_client
from services.language_decoder.config import DecoderConfig
from services.vision_encoder.config import EncoderConfig

SERVICES = [
    (EncoderConfig, "IVL_ENCODER_", 9102),
    (DecoderConfig, "IVL_DECODER_", 9103),
]


@pytest.mark.parametrize(("cls", "prefix", "metrics_port"), SERVICES)
def test_model_services_defaults(cls, prefix: str, metrics_port: int) -> None:
    cfg = cls.from_args(["--model", "/m"], env={})
    server = cfg.server_config()
    assert server.host == "127.0.0.1"  # loopback unless told otherwise
    assert server.metrics_port == metrics_port and server.tls is None
    assert (cfg.log_format, cfg.log_level) == ("text", "INFO")


@pytest.mark.parametrize(("cls", "prefix", "metrics_port"), SERVICES)
def test_model_services_env_and_flags(cls, prefix: str, metrics_port: int) -> None:
    env = {prefix + "METRICS_PORT": "0", prefix + "LOG_FORMAT": "json", prefix + "TLS_CERT": "/c.pem",
           prefix + "TLS_KEY": "/k.pem"}
    cfg = cls.from_args(["--model", "/m", "--tls-ca", "/ca.pem", "--metrics-host", "0.0.0.0"], env=env)
    server = cfg.server_config()
    assert server.metrics_port == 0 and server.metrics_host == "0.0.0.0" and cfg.log_format == "json"
    assert (server.tls.cert, server.tls.key, server.tls.ca, server.tls.mutual) == ("/c.pem", "/k.pem", "/ca.pem", True)


@pytest.mark.parametrize(("cls", "prefix", "metrics_port"), SERVICES)
@pytest.mark.parametrize(
    "argv",
    [["--tls-cert", "/c.pem"], ["--tls-ca", "/ca.pem"], ["--log-format", "xml"], ["--metrics-port", "70000"],
     ["--log-level", "LOUD"]],
)
def test_model_services_bad_values(cls, prefix, metrics_port, argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cls.from_args(["--model", "/m", *argv], env={})
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- gateway


def _gateway(argv: list[str], env: dict[str, str] | None = None) -> GatewayConfig:
    return GatewayConfig.from_args(argv, env=env or {})


def test_gateway_refuses_to_start_without_keys_or_insecure_open(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _gateway([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no API keys" in err and "--api-keys-file" in err and "--insecure-open" in err


def test_gateway_insecure_open_by_flag_or_env() -> None:
    assert _gateway(["--insecure-open"]).insecure_open
    assert _gateway([], {"IVL_GATEWAY_INSECURE_OPEN": "true"}).insecure_open


def test_gateway_keys_from_file_and_env_are_never_shown(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    keys.write_text("file-key-123\n")
    cfg = _gateway(["--api-keys-file", str(keys)], {"IVL_GATEWAY_API_KEYS": "env-key-456,env-key-789"})
    assert cfg.api_keys == ("file-key-123", "env-key-456", "env-key-789") and not cfg.insecure_open
    shown = repr(cfg) + cfg.summary()
    assert "key-123" not in shown and "key-456" not in shown and "3 API key(s)" in cfg.summary()
    env_file = _gateway([], {"IVL_GATEWAY_API_KEYS_FILE": str(keys)})
    assert env_file.api_keys == ("file-key-123",)
    with pytest.raises(SystemExit):
        _gateway(["--api-keys-file", str(keys), "--insecure-open"])
    assert "contradicts" in capsys.readouterr().err


def test_gateway_metrics_tls_and_logging_flags() -> None:
    cfg = _gateway(["--insecure-open"])
    assert cfg.server.metrics_port == 9101 and cfg.server.tls is None and cfg.peer_tls is None
    cfg = _gateway(
        ["--insecure-open", "--tls-cert", "/s.crt", "--tls-key", "/s.key", "--peer-tls-ca", "/ca.crt",
         "--peer-tls-cert", "/g.crt", "--peer-tls-key", "/g.key", "--log-format", "json", "--grace-seconds", "5"],
        {"IVL_GATEWAY_METRICS_PORT": "0"},
    )
    assert cfg.server.metrics_port == 0 and cfg.server.grace_seconds == 5 and cfg.log_format == "json"
    assert not cfg.server.tls.mutual and (cfg.peer_tls.ca, cfg.peer_tls.cert, cfg.peer_tls.key) == (
        "/ca.crt", "/g.crt", "/g.key")
    assert "tls=on" in cfg.summary() and "peer_tls=mutual" in cfg.summary()


@pytest.mark.parametrize("argv", [["--peer-tls-cert", "/g.crt"], ["--tls-key", "/s.key"],
                                  ["--redis-tls-ca", "/ca.crt"], ["--metrics-port", "-1"]])
def test_gateway_bad_security_flags(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _gateway(["--insecure-open", *argv])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_gateway_redis_password_and_tls() -> None:
    url = "rediss://ivl:p%40ss@cache:6380/2"
    # A URL with a password comes from the environment: as a flag value it would show in `ps`.
    cfg = _gateway(["--insecure-open", "--redis-tls-ca", "/ca b.crt"], {"IVL_REDIS_URL": url})
    assert "p%40ss" not in cfg.summary() and "ivl:***@cache:6380" in cfg.summary()
    client = redis_client(cfg.redis_client_url)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_ca_certs"], kwargs["db"]) == (
        "ivl", "p@ss", "/ca b.crt", 2)


def test_decoder_engine_switches_resolve_per_device() -> None:
    cfg = DecoderConfig.from_args(["--model", "/m"], env={})
    assert cfg.resolved_compile_layers("cuda:1") and not cfg.resolved_compile_layers("cpu")
    assert cfg.resolved_warmup("cuda") and not cfg.resolved_warmup("cpu")
    env = {"IVL_DECODER_COMPILE_LAYERS": "off", "IVL_DECODER_NO_CUDA_GRAPHS": "1"}
    cfg = DecoderConfig.from_args(["--model", "/m", "--warmup", "on", "--no-cpu-prepacked-weights"], env=env)
    assert not cfg.resolved_compile_layers("cuda") and cfg.resolved_warmup("cpu")
    assert cfg.no_cuda_graphs and cfg.no_cpu_prepacked_weights


def test_decoder_rejects_unknown_compile_mode(capsys) -> None:
    with pytest.raises(SystemExit):
        DecoderConfig.from_args(["--model", "/m", "--compile-mode", "fastest"], env={})
    assert "--compile-mode" in capsys.readouterr().err


def test_gateway_two_redis_stores_default_to_redis_url() -> None:
    cfg = _gateway(["--insecure-open"], {"IVL_REDIS_URL": "redis://:pw@one:6379/0"})  # passwords: env only
    assert cfg.session_redis_url == cfg.feature_cache_url == "redis://:pw@one:6379/0"
    assert cfg.stores_share_instance  # the gateway warns: one eviction policy for both
    assert "pw" not in cfg.summary()
    env = {"IVL_SESSION_REDIS_URL": "redis://sessions:6379/0", "IVL_FEATURE_CACHE_URL": "redis://features/0"}
    cfg = GatewayConfig.from_args(["--insecure-open"], env=env)
    assert (cfg.session_redis_url, cfg.feature_cache_url) == ("redis://sessions:6379/0", "redis://features/0")
    assert not cfg.stores_share_instance
    # Two databases of one server are still one instance (maxmemory-policy is per server).
    cfg = _gateway(["--insecure-open", "--session-redis-url", "redis://h:6379/1", "--feature-cache-url", "redis://H/2"])
    assert cfg.stores_share_instance


def test_gateway_redis_cluster_urls() -> None:
    cfg = _gateway(["--insecure-open", "--feature-cache-url", "rediss+cluster://node-b:7001/0", "--redis-tls-ca",
                    "/ca.crt"], {"IVL_SESSION_REDIS_URL": "redis+cluster://:pw@node-a:7000"})
    sessions = redis_client(cfg.client_url(cfg.session_redis_url))
    features = redis_client(cfg.client_url(cfg.feature_cache_url))
    assert type(sessions).__name__ == type(features).__name__ == "RedisCluster"
    assert "ssl_ca_certs=%2Fca.crt" in cfg.client_url(cfg.feature_cache_url)
    assert "ssl_ca_certs" not in cfg.client_url(cfg.session_redis_url)  # not TLS: no CA


@pytest.mark.parametrize("argv", [["--session-redis-url", "http://x:1"], ["--feature-cache-url", "redis+cluster://h/3"],
                                  ["--feature-cache-url", "redis://"]])
def test_gateway_bad_redis_urls(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        _gateway(["--insecure-open", *argv])
    assert "redis" in capsys.readouterr().err


def test_decoder_quantize_flag_env_and_bad_value(capsys) -> None:
    assert DecoderConfig.from_args(["--model", "/m"], env={}).quantize == "none"
    assert DecoderConfig.from_args(["--model", "/m", "--quantize", "int8"], env={}).quantize == "int8"
    assert DecoderConfig.from_args(["--model", "/m"], env={"IVL_DECODER_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(SystemExit):
        DecoderConfig.from_args(["--model", "/m", "--quantize", "int4"], env={})
    assert "--quantize" in capsys.readouterr().err
