#!/usr/bin/env python3
"""Ask a gRPC server's standard health service (grpc.health.v1) whether it is SERVING.

The images' HEALTHCHECK runs this script (no grpc_health_probe binary to download): it needs only
`grpcio` and `grpcio-health-checking`, which every image has.

    python grpc_health_probe.py --port 50052                     # overall health of the process
    python grpc_health_probe.py --addr 10.0.0.7:50053 --service internvl.v1.LanguageDecoder
    python grpc_health_probe.py --port 50051 --tls --tls-ca ca.pem --server-name gateway.example.com

Exit status: 0 SERVING; 1 NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN; 2 the call failed (no answer
within --timeout, connection refused, TLS error, ...); 3 bad arguments. Our servers answer
NOT_SERVING while their model loads and again once a SIGTERM starts the drain.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_RPC_FAILED = 2
EXIT_USAGE = 3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grpc_health_probe", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--addr", help="host:port of the server (default 127.0.0.1:--port)")
    where.add_argument("--port", type=int, help="port on 127.0.0.1")
    p.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    p.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for servers that require mTLS")
    p.add_argument("--tls-key", help="client private key (PEM) for --tls-cert")
    p.add_argument("--server-name", help="name to verify the server certificate against (SNI override)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    if args.addr is None and args.port is None:
        p.error("one of --addr or --port is required")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if (args.tls_ca or args.tls_cert or args.server_name) and not args.tls:
        args.tls = True
    return args


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def check(args: argparse.Namespace) -> tuple[int, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.addr or f"127.0.0.1:{args.port}"
    options: list[tuple[str, object]] = []
    if args.tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(args.tls_ca),
            private_key=_read(args.tls_key),
            certificate_chain=_read(args.tls_cert),
        )
        if args.server_name:
            options.append(("grpc.ssl_target_name_override", args.server_name))
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            return EXIT_RPC_FAILED, f"{target}: health check failed: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    code = EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING
    return code, f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, errors are 2; keep 2 for "RPC failed"
        return EXIT_SERVING if exc.code == 0 else EXIT_USAGE
    try:
        code, message = check(args)
    except OSError as exc:  # an unreadable --tls-* file
        code, message = EXIT_USAGE, f"cannot read a TLS file: {exc}"
    if not args.quiet:
        print(message, file=sys.stdout if code == EXIT_SERVING else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
