"""The decoder replicas of one model deployment: found, watched, and one chosen per turn.

Replicas come from the `--decoder` target: `host:port` is one replica (gRPC resolves and balances the
name itself, exactly as before routing existed); `ip:port,ip:port` (or `ipv4:`/`ipv6:` lists) is one
replica per entry; `dns:///name:port` (a headless Service) is resolved here every
`resolve_interval_s`, one replica per address, so pods that come and go are added and dropped. Each
replica has its own channel.

Load: with two replicas or more, every replica is asked `GetLoad` every `load_interval_s`, all
concurrently, never once per request. A poll that fails (connection refused, deadline, a draining or
loading decoder refusing calls) or reports a failing engine marks the replica down at once, and the
next poll that succeeds brings it back, so a lost replica is routed around within about one
interval; a Generate call that ends UNAVAILABLE marks its replica down at once too. Polling, not a
server stream: an open stream would hold every decoder's graceful drain for its whole grace period.
Between polls this gateway's own open calls per replica count too (router.Load), so a burst does not
pile onto one replica for a whole interval.

The choice itself is gateway/router.py (pure). Keys that moved (a spill, a failover) are remembered in
a bounded LRU so the session's later turns follow its KV instead of returning to a replica that
lacks it; across gateways rendezvous ranking alone keeps them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.peers import DecoderClient
from gateway.router import Decision, Load, Outcome, ReplicaView, SpillRule, choose, rank
from internvl.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.wire import DEFAULT_CHUNK_BYTES

log = logging.getLogger(__name__)

MAX_MOVED_KEYS = 65536  # remembered spills/failovers (LRU): ~100 bytes each
# A replica gone from DNS keeps its channel this long for the calls still running on it.
RETIRE_AFTER_S = 60.0
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PoolConfig:
    load_interval_s: float = 1.0
    resolve_interval_s: float = 5.0
    spill: SpillRule = SpillRule()

    def __post_init__(self) -> None:
        if self.load_interval_s <= 0:
            raise ValueError("--route-load-interval must be > 0 seconds")
        if self.resolve_interval_s <= 0:
            raise ValueError("--route-resolve-interval must be > 0 seconds")


@dataclass(frozen=True)
class ReplicaSource:
    """Where replicas come from: fixed targets, or a DNS name re-resolved (`dns_host`, `dns_port`)."""

    targets: tuple[str, ...] = ()
    dns_host: str = ""
    dns_port: int = 0

    @classmethod
    def parse(cls, target: str) -> ReplicaSource:
        if target.startswith("dns:"):
            rest = target[len("dns:"):]
            if rest.startswith("//"):  # dns://[authority]/host:port: the system resolver is used
                rest = rest[2:].partition("/")[2]
            host, sep, port = rest.rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"decoder target {target!r}: expected dns:///name:port")
            return cls(dns_host=host, dns_port=int(port))
        scheme = ""
        for prefix in ("ipv4:", "ipv6:"):
            if target.startswith(prefix):
                scheme, target = prefix, target[len(prefix):]
        entries = [t.strip() for t in target.split(",")]
        if not all(entries):
            raise ValueError(f"decoder target {target!r} has an empty entry")
        return cls(targets=tuple(scheme + t if scheme else t for t in entries))


def _address_target(family: int, ip: str, port: int) -> str:
    return f"ipv6:[{ip}]:{port}" if family == socket.AF_INET6 else f"ipv4:{ip}:{port}"


@dataclass
class Replica:
    address: str  # its channel target: also its label in metrics
    client: DecoderClient
    healthy: bool = True  # until a poll says otherwise (a new replica gets traffic at once)
    report: decoder_pb2.DecoderLoad | None = None
    in_flight: int = 0
    in_flight_at_report: int = 0
    problem: str = ""

    def view(self) -> ReplicaView:
        r = self.report
        if r is None:
            return ReplicaView(self.address, self.healthy, Load(local_in_flight=self.in_flight))
        return ReplicaView(self.address, self.healthy, Load(
            running=r.running_sequences, waiting=r.waiting_sequences, kv_blocks_used=r.kv_blocks_used,
            kv_blocks_total=r.kv_blocks_total, max_num_seqs=r.max_num_seqs, local_in_flight=self.in_flight,
            local_at_report=self.in_flight_at_report))


@dataclass
class RoutingStats:
    decisions: Counter = field(default_factory=Counter)  # Outcome -> turns


class RoutedDecoder:
    """The chosen replica's client for one turn; counts the call as open on it until it ends, and a
    call the replica could not take (UNAVAILABLE: gone, draining) marks it down at once, without
    waiting for the next poll (which brings it back when it answers again)."""

    def __init__(self, replica: Replica, decision: Decision, watch: Callable[[Replica, object], None]):
        self.replica = replica
        self.decision = decision
        self._watch = watch

    def generate(self, *args, **kwargs):
        """Push-everything Generate (DecoderClient.generate) on the chosen replica."""
        return self._track(self.replica.client.generate(*args, **kwargs))

    def open_generate(self, **kwargs):
        """A Generate call to drive with write()/read() (the lazy-images conversation, gateway/decoder_exchange.py)."""
        return self._track(self.replica.client.open_generate(**kwargs))

    @property
    def chunk_bytes(self) -> int:
        return self.replica.client.chunk_bytes

    async def model_info(self, timeout: float | None = None) -> decoder_pb2.DecoderInfo:
        """This replica's DecoderInfo (whether it speaks lazy images is a property of its build)."""
        return await self.replica.client.model_info(timeout)

    def _track(self, call):
        replica = self.replica
        replica.in_flight += 1

        def done(ended) -> None:
            replica.in_flight -= 1
            if not ended.cancelled():
                self._watch(replica, ended)

        call.add_done_callback(done)
        return call


class DecoderPool:
    def __init__(self, target: str, config: PoolConfig = PoolConfig(), *,
                 credentials: grpc.ChannelCredentials | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.target = target
        self.config = config
        self.source = ReplicaSource.parse(target)
        self._credentials = credentials
        self._chunk_bytes = chunk_bytes
        self.replicas: dict[str, Replica] = {}
        self.stats = RoutingStats()
        self._moved: OrderedDict[str, str] = OrderedDict()
        self._tasks: list[asyncio.Task] = []
        self._checks: set[asyncio.Task] = set()  # ended calls being looked at (_check_ended)
        self._retired: list[DecoderClient] = []  # gone from DNS, closed after RETIRE_AFTER_S or at close()
        self._info: decoder_pb2.DecoderInfo | None = None
        for t in self.source.targets:
            self._add(t)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Begin resolving (DNS targets) and polling load; call once, inside the serving loop."""
        if self.source.dns_host:
            await self._resolve()
            self._tasks.append(asyncio.ensure_future(self._every(self.config.resolve_interval_s, self._resolve)))
        self._tasks.append(asyncio.ensure_future(self._every(self.config.load_interval_s, self._poll)))

    async def close(self) -> None:
        tasks = [*self._tasks, *self._checks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in [*(r.client for r in self.replicas.values()), *self._retired]:
            await client.close()
        self.replicas.clear()
        self._retired.clear()

    # ------------------------------------------------------------------ routing

    def route(self, key: str) -> RoutedDecoder:
        """The replica for a turn with this affinity key (router.affinity_key)."""
        if not self.replicas:
            raise NoReplicas(f"no decoder replica: {self.target} resolved to no address")
        views = [r.view() for r in self.replicas.values()]
        decision = choose(key, views, self.config.spill, self._moved.get(key, ""))
        self.stats.decisions[decision.outcome] += 1
        self._remember(key, decision, views)
        return RoutedDecoder(self.replicas[decision.address], decision, self._check_ended)

    def _check_ended(self, replica: Replica, call) -> None:
        if len(self.replicas) < 2:
            return  # one replica is not polled, so nothing would bring it back: it is always used anyway
        task = asyncio.ensure_future(self._mark_down_if_unavailable(replica, call))
        self._checks.add(task)  # referenced until done (the loop keeps only weak references)
        task.add_done_callback(self._checks.discard)

    async def _mark_down_if_unavailable(self, replica: Replica, call) -> None:
        if await call.code() == grpc.StatusCode.UNAVAILABLE:
            self._set_health(replica, False, f"UNAVAILABLE: {await call.details()}")

    def _remember(self, key: str, decision: Decision, views: Sequence[ReplicaView]) -> None:
        if decision.outcome in (Outcome.SPILL, Outcome.FAILOVER) or key in self._moved:
            if rank(key, [v.address for v in views])[0] == decision.address:
                self._moved.pop(key, None)  # back on its first choice: nothing to remember
                return
            self._moved[key] = decision.address
            self._moved.move_to_end(key)
            while len(self._moved) > MAX_MOVED_KEYS:
                self._moved.popitem(last=False)

    # ------------------------------------------------------------------ model facts and health

    async def model_info(self, timeout: float | None = None) -> decoder_pb2.DecoderInfo:
        """The deployment's DecoderInfo, from a healthy replica (all replicas serve one checkpoint)."""
        if self._info is None:
            replicas = sorted(self.replicas.values(), key=lambda r: not r.healthy)
            if not replicas:
                raise NoReplicas(f"no decoder replica: {self.target} resolved to no address")
            self._info = await replicas[0].client.model_info(timeout)
        return self._info

    async def probe(self) -> None:
        """Raises unless at least one replica's gRPC health says SERVING (the gateway's /health)."""
        if not self.replicas:
            raise NoReplicas(f"no decoder replica: {self.target} resolved to no address")

        async def one(replica: Replica) -> None:
            stub = health_pb2_grpc.HealthStub(replica.client.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError("not serving")

        results = await asyncio.gather(*(one(r) for r in self.replicas.values()), return_exceptions=True)
        if all(isinstance(r, BaseException) for r in results):
            raise next(r for r in results if isinstance(r, Exception))

    # ------------------------------------------------------------------ background work

    async def _every(self, interval_s: float, work) -> None:
        while True:
            try:
                await work()
            except Exception:  # never let the watcher die: routing would freeze on stale state
                log.exception("decoder pool %s: background update failed", self.target)
            await asyncio.sleep(interval_s)

    async def _poll(self) -> None:
        if len(self.replicas) < 2:
            return  # one replica: nothing to choose, no polling (exactly as without routing)
        timeout = max(self.config.load_interval_s, 1.0)
        replicas = list(self.replicas.values())
        results = await asyncio.gather(*(self._poll_one(r, timeout) for r in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, BaseException):
                problem = (f"{result.code().name}: {result.details()}" if isinstance(result, grpc.aio.AioRpcError)
                           else repr(result))
                self._set_health(replica, False, problem)
            else:
                replica.report, replica.in_flight_at_report = result, replica.in_flight
                healthy = result.engine_healthy
                self._set_health(replica, healthy, "" if healthy else "its engine is failing")

    @staticmethod
    async def _poll_one(replica: Replica, timeout: float) -> decoder_pb2.DecoderLoad:
        stub = decoder_pb2_grpc.LanguageDecoderStub(replica.client.channel)
        return await stub.GetLoad(decoder_pb2.GetLoadRequest(), timeout=timeout)

    def _set_health(self, replica: Replica, healthy: bool, problem: str) -> None:
        if healthy != replica.healthy:
            if healthy:
                log.info("decoder replica %s is back: routing to it again", replica.address)
            else:
                log.warning("decoder replica %s is down (%s): routing around it", replica.address, problem)
        replica.healthy, replica.problem = healthy, problem

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.source.dns_host, self.source.dns_port, type=socket.SOCK_STREAM)
        except OSError as exc:  # keep the replicas we know: a DNS hiccup must not empty the pool
            log.warning("decoder pool %s: DNS lookup failed (%s); keeping %d known replica(s)",
                        self.target, exc, len(self.replicas))
            return
        found = {_address_target(family, addr[0], addr[1]) for family, _, _, _, addr in infos}
        for address in sorted(found - set(self.replicas)):
            log.info("decoder pool %s: replica %s added", self.target, address)
            self._add(address, authority=self.source.dns_host)
        for address in sorted(set(self.replicas) - found):
            log.info("decoder pool %s: replica %s gone from DNS", self.target, address)
            self._retired.append(self.replicas.pop(address).client)
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.ensure_future(self._retire(self._retired[-1])))

    async def _retire(self, client: DecoderClient) -> None:
        await asyncio.sleep(RETIRE_AFTER_S)  # calls in flight on it keep their channel until then
        self._retired.remove(client)
        await client.close()

    def _add(self, address: str, authority: str = "") -> None:
        # A resolved address keeps the name for TLS: the certificate names the Service, not the pod IP.
        options = [("grpc.ssl_target_name_override", authority)] if authority and self._credentials else []
        client = DecoderClient(address, chunk_bytes=self._chunk_bytes, credentials=self._credentials,
                               options=options)
        self.replicas[address] = Replica(address, client)


class NoReplicas(RuntimeError):
    """The target resolved to no replica at all (a DNS name with no addresses yet)."""
