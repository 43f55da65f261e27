"""Each turn goes to the decoder replica that holds its KV, spills when that one is saturated, and
moves on when it dies (issue 10 point 2), with real processes: one encoder, two decoders, a real
Redis, a gateway over both decoders (`--decoder A,B`) and a one-replica gateway for reference answers.

Which replica served a call is read from the replicas' own /metrics (Generate calls per replica), as
an operator would see it; what the gateway decided and how it sees each replica, from the gateway's
/metrics. The decoders run one sequence at a time (`--max-num-seqs 1`), so one long generation
saturates a replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.hardening import LONG_GENERATION, LONG_GENERATION_GATEWAY_ARGS, fresh_image
from tests.integration.observe import Metrics, scrape
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import model_args
from tests.redis_server import RedisServer, RedisServerMissing

KIT = load_kit()
GENERATE = ("internvl.v1.LanguageDecoder", "Generate")
BLOCK_TOKENS = 16  # the decoder's default --block-size: the prefix cache reuses whole blocks
SOON_S = 10.0  # "within seconds", generous for a loaded 2-core machine
# A four-turn conversation with images: (text, images) per turn.
SCRIPT = [
    ("<image>\nDescribe the image.", [fresh_image(5001)]),
    ("<image>\nAnd this one?", [fresh_image(5002)]),
    ("Compare the two images.", []),
    ("<image>\nWhat about this one?", [fresh_image(5003)]),
]


@dataclass
class Decoder:
    process: ServiceProcess
    metrics_port: int

    def generates(self) -> int:
        """Generate calls it has finished, any status (-1 while the process is down)."""
        if self.process.proc is None:
            return -1
        m = scrape(self.metrics_port)
        service, method = GENERATE
        return int(sum(value for (name, labels), value in m.samples.items()
                       if name == "ivl_grpc_requests_total" and ("grpc_service", service) in labels
                       and ("grpc_method", method) in labels))

    def busy(self) -> bool:
        m = scrape(self.metrics_port)
        return bool(m.get("ivl_decoder_active_sequences") or m.get("ivl_decoder_waiting_sequences"))


@dataclass
class Gateway:
    process: ServiceProcess
    metrics_port: int
    stub: gateway_pb2_grpc.GatewayStub
    channel: grpc.Channel

    def metrics(self) -> Metrics:
        return scrape(self.metrics_port)

    def decisions(self, outcome: str) -> float:
        return self.metrics().get("ivl_gateway_routing_decisions_total", model="default", outcome=outcome)


@dataclass
class Cluster:
    decoders: list[Decoder]
    routed: Gateway  # over both decoders
    single: Gateway  # over decoders[0] alone: the reference

    def generates(self) -> list[int]:
        return [d.generates() for d in self.decoders]


def start_gateway(encoder: str, decoders: list[Decoder], redis_url: str) -> Gateway:
    port = free_port()
    process = ServiceProcess("gateway", [
        "--encoder", encoder, "--decoder", ",".join(d.process.address for d in decoders), "--redis-url", redis_url,
        "--insecure-open", "--metrics-port", str(port), "--route-load-interval", "0.2",
        *LONG_GENERATION_GATEWAY_ARGS,
    ]).start()
    channel = grpc.insecure_channel(process.address, options=channel_options())
    return Gateway(process, port, gateway_pb2_grpc.GatewayStub(channel), channel)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    try:
        redis = RedisServer(tmp_path_factory.mktemp("routing") / "redis")
    except RedisServerMissing as exc:  # fail, never skip (see tests/integration/conftest.py)
        pytest.fail(str(exc), pytrace=False)
    one_thread = ["--torch-threads", "1"]
    encoder = ServiceProcess("services.vision_encoder", [*model_args(KIT.root), *one_thread])
    decoders = []
    for _ in range(2):
        port = free_port()
        decoders.append(Decoder(ServiceProcess("services.language_decoder", [
            *model_args(KIT.root), *one_thread, "--max-num-seqs", "1", "--metrics-port", str(port)]), port))
    models = [encoder, *(d.process for d in decoders)]
    gateways: list[Gateway] = []
    try:
        redis.start()
        with ThreadPoolExecutor(len(models)) as pool:
            for started in [pool.submit(p.start) for p in models]:
                started.result()
        gateways.append(start_gateway(encoder.address, decoders, redis.url))
        gateways.append(start_gateway(encoder.address, decoders[:1], redis.url))
        yield Cluster(decoders, *gateways)
    finally:
        for gw in gateways:
            gw.channel.close()
            gw.process.stop()
        with ThreadPoolExecutor(len(models)) as pool:
            list(pool.map(ServiceProcess.stop, models))
        redis.stop()


def turn(gw: Gateway, session_id: str, text: str, images: list[bytes] = (), **generation) -> gateway_pb2.ChatResponse:
    request = gateway_pb2.ChatRequest(
        session_id=session_id, text=text, images=[vision_pb2.ImageInput(data=d) for d in images],
        generation=decoder_pb2.SamplingParams(max_new_tokens=generation.pop("max_new_tokens", 8), **generation))
    request.tiling.max_tiles = 1
    return gw.stub.Chat(request, timeout=120)


def new_session(gw: Gateway) -> str:
    return gw.stub.CreateSession(gateway_pb2.CreateSessionRequest(), timeout=30).session_id


def served_by(cluster: Cluster, call: Callable[[], gateway_pb2.ChatResponse]) -> tuple[int, gateway_pb2.ChatResponse]:
    """Which decoder (index) served the one Generate call `call` makes, and its reply."""
    before = cluster.generates()
    reply = call()
    deadline = time.monotonic() + SOON_S  # a server counts a call a moment after its last message
    while (after := cluster.generates()) == before:
        assert time.monotonic() < deadline, "no decoder counted the call"
        time.sleep(0.05)
    grown = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a != b]
    assert len(grown) == 1 and after[grown[0]] == before[grown[0]] + 1, (before, after)
    return grown[0], reply


def embedding_bytes(gw: Gateway) -> dict[str, float]:
    """The gateway's embedding byte counters (gateway/transfer_stats.py), per hop."""
    m = gw.metrics()
    return {"from_encoder": m.get("ivl_gateway_embedding_received_bytes_total", hop="encoder"),
            "from_redis": m.get("ivl_gateway_embedding_received_bytes_total", hop="feature_cache"),
            "to_decoder": m.get("ivl_gateway_embedding_sent_bytes_total", hop="decoder"),
            "held_by_decoder": m.get("ivl_gateway_embedding_skipped_bytes_total", hop="decoder")}


def run_script(cluster: Cluster, gw: Gateway, moved: list[dict[str, float]] | None = None,
               ) -> tuple[list[int], list[gateway_pb2.ChatResponse]]:
    """The script as one session; `moved` (if given) gets each turn's embedding bytes per hop."""
    session_id = new_session(gw)
    replicas, replies = [], []
    for text, images in SCRIPT:
        before = embedding_bytes(gw)
        replica, reply = served_by(cluster, lambda t=text, i=images: turn(gw, session_id, t, i))
        if moved is not None:
            moved.append({k: v - before[k] for k, v in embedding_bytes(gw).items()})
        replicas.append(replica)
        replies.append(reply)
    return replicas, replies


def wait_idle(cluster: Cluster) -> None:
    """Both decoders idle, and the routing gateway has seen it (its view is a load poll old: a turn the
    reference gateway just ran would otherwise count as load, and rightly make the next turn spill)."""
    deadline = time.monotonic() + 60
    while any(d.busy() for d in cluster.decoders):
        assert time.monotonic() < deadline, "a decoder is still busy"
        time.sleep(0.05)

    def seen_busy() -> bool:
        m = cluster.routed.metrics()
        return any(m.get(f"ivl_gateway_decoder_replica_{what}_sequences", model="default", replica=d.process.address)
                   for d in cluster.decoders for what in ("running", "waiting"))

    while seen_busy():
        assert time.monotonic() < deadline, "the gateway still sees a busy decoder"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ affinity


def test_a_sessions_turns_stay_on_one_replica_and_reuse_its_kv(cluster: Cluster):
    expected_replicas, expected = run_script(cluster, cluster.single)
    assert expected_replicas == [0] * len(SCRIPT)
    wait_idle(cluster)
    affinity_before = cluster.routed.decisions("affinity")

    moved: list[dict[str, float]] = []
    replicas, replies = run_script(cluster, cluster.routed, moved)

    assert len(set(replicas)) == 1, f"the session's turns went to replicas {replicas}"
    # Every image of a turn's prompt is either sent or declared held by the replica (the reference run may
    # have left this very prefix on it); an earlier turn's image is never sent again, and a text-only turn
    # reads nothing from Redis. The script's images are the same size: `one` image's bytes each.
    one = moved[0]["to_decoder"] + moved[0]["held_by_decoder"]
    assert one > 0
    in_prompt = 0
    for i, ((_text, images), bytes_moved) in enumerate(zip(SCRIPT, moved, strict=True)):
        in_prompt += len(images)
        assert bytes_moved["to_decoder"] + bytes_moved["held_by_decoder"] == one * in_prompt, (i, bytes_moved)
        assert bytes_moved["to_decoder"] <= one * len(images), (i, bytes_moved)
        if not images:
            assert bytes_moved["from_redis"] == bytes_moved["from_encoder"] == 0, (i, bytes_moved)
    assert [r.text for r in replies] == [r.text for r in expected]  # identical to one replica
    for previous, reply in zip(replies, replies[1:], strict=False):
        # The whole earlier prompt (history and images) came from the replica's prefix cache.
        assert reply.usage.cached_prompt_tokens >= previous.usage.prompt_tokens - 2 * BLOCK_TOKENS, (
            [(r.usage.prompt_tokens, r.usage.cached_prompt_tokens) for r in replies])
    assert cluster.routed.decisions("affinity") - affinity_before == len(SCRIPT)
    m = cluster.routed.metrics()
    for d in cluster.decoders:  # the gateway sees both replicas up and reports their load
        assert m.get("ivl_gateway_decoder_replica_healthy", model="default", replica=d.process.address) == 1
        assert m.get("ivl_gateway_decoder_replica_running_sequences", model="default",
                     replica=d.process.address) >= 0


def test_sessions_spread_over_the_replicas(cluster: Cluster):
    """Rendezvous hashing gives new sessions to both replicas (16 sessions: all on one is 2**-15)."""
    seen = set()
    for _ in range(16):
        session_id = new_session(cluster.routed)
        seen.add(served_by(cluster, lambda s=session_id: turn(cluster.routed, s, "Hello", max_new_tokens=2))[0])
        if seen == {0, 1}:
            return
    pytest.fail(f"16 new sessions all went to replica {seen}")


# ------------------------------------------------------------------------------------ spill


def test_new_sessions_spill_from_a_saturated_replica_and_their_next_turns_follow(cluster: Cluster):
    gw = cluster.routed
    wait_idle(cluster)
    at_start = cluster.generates()
    stream = gw.stub.ChatStream(gateway_pb2.ChatRequest(
        text="Tell me a long story.", generation=decoder_pb2.SamplingParams(max_new_tokens=3000, **LONG_GENERATION)),
        timeout=120)
    try:
        next(stream)  # generating: the replica's one sequence slot is taken
        busy = next(i for i, d in enumerate(cluster.decoders) if d.busy())
        other = 1 - busy
        spills_before = gw.decisions("spill")
        spilled = None
        for _ in range(24):  # until a new session's own replica is the busy one (each does so at 1/2)
            session_id = new_session(gw)
            replica, _reply = served_by(cluster, lambda s=session_id: turn(gw, s, "Hello", max_new_tokens=2))
            assert replica == other, "a turn went to the saturated replica"
            assert cluster.decoders[busy].busy(), "the long generation ended early: the test proves nothing"
            if gw.decisions("spill") > spills_before:
                spilled = session_id
                break
        assert spilled is not None, "no new session ranked the saturated replica first"
    finally:
        stream.cancel()
    wait_idle(cluster)
    deadline = time.monotonic() + SOON_S
    while cluster.decoders[busy].generates() != at_start[busy] + 1:  # the cancelled call, counted
        assert time.monotonic() < deadline, "the cancelled generation was never counted"
        time.sleep(0.05)
    # The saturated replica is free again, but the spilled session's KV is on the other: it stays there.
    replica, reply = served_by(cluster, lambda: turn(gw, spilled, "And then?", max_new_tokens=2))
    assert replica == other
    assert reply.usage.cached_prompt_tokens > 0


# ------------------------------------------------------------------------------------ failure


def test_a_killed_replicas_sessions_continue_on_another(cluster: Cluster):
    gw = cluster.routed
    expected_replicas, expected = run_script(cluster, cluster.single)
    assert set(expected_replicas) == {0}
    wait_idle(cluster)
    # A session on the replica that will die (decoders[1]; the reference gateway needs decoders[0]).
    victim = cluster.decoders[1]
    for _ in range(24):
        session_id = new_session(gw)
        before = embedding_bytes(gw)
        replica, first = served_by(cluster, lambda s=session_id: turn(gw, s, *SCRIPT[0]))
        first_image_bytes = sum(embedding_bytes(gw)[k] - before[k] for k in ("to_decoder", "held_by_decoder"))
        if replica == 1:
            break
    else:
        pytest.fail("24 new sessions never went to the second replica")
    assert first.text == expected[0].text
    victim.process.kill()
    try:
        deadline = time.monotonic() + SOON_S
        label = {"model": "default", "replica": victim.process.address}
        while gw.metrics().get("ivl_gateway_decoder_replica_healthy", **label) != 0:
            assert time.monotonic() < deadline, "the gateway still routes to a killed replica"
            time.sleep(0.05)
        for n, ((text, images), want) in enumerate(zip(SCRIPT[1:], expected[1:], strict=True)):
            before = embedding_bytes(gw)
            replica, reply = served_by(cluster, lambda t=text, i=images: turn(gw, session_id, t, i))
            assert replica == 0
            assert reply.text == want.text  # history and images re-sent to the survivor: the same answers
            if n == 0:  # every image of the prompt sent to the survivor, or held there (the reference run's KV)
                after = embedding_bytes(gw)
                accounted = sum(after[k] - before[k] for k in ("to_decoder", "held_by_decoder"))
                assert accounted == first_image_bytes * (1 + len(images)), (before, after)
        assert gw.decisions("failover") >= 1  # then the session's KV is on the survivor: affinity
    finally:
        victim.process.start(port=victim.process.port)
    deadline = time.monotonic() + SOON_S
    while gw.metrics().get("ivl_gateway_decoder_replica_healthy", **label) != 1:
        assert time.monotonic() < deadline, "the restarted replica was not routed to again"
        time.sleep(0.05)
