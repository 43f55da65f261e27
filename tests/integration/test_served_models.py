"""One gateway in front of several model deployments (issue 18 point 5), with real processes.

Three tiny checkpoints in the real layout, each with its own encoder and decoder: `small` (LLM width
64), `deep` (the same vision tower and projector, a deeper language model: a different checkpoint
whose encoder computes the same features) and `wide` (LLM width 96: its projector differs). The
gateway fronts them as `--model small=... --model deep=... --model wide=...`. The gRPC `model` field
and the OpenAI `model` pick the deployment; cached features are shared between `small` and `deep`
and never with `wide` (counted from each encoder's own /metrics).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from openai import OpenAI

from internvl.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, vision_pb2, vision_pb2_grpc
from services.common.model_identity import CUSTOM_MEMBER
from services.common.server import channel_options
from services.tools.make_tiny_checkpoint import write_tiny_checkpoint
from tests.integration.hardening import fresh_image
from tests.integration.observe import scrape
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import model_args
from tests.redis_server import RedisServer, RedisServerMissing

CHECKPOINTS = {  # served name -> make_tiny_checkpoint settings (same seed: same vision tensors)
    "small": {},
    "deep": {"llm_layers": 3},
    "wide": {"llm_hidden": 96, "llm_ffn": 192},
}
ENCODE = ("internvl.v1.VisionEncoder", "Encode")


@dataclass
class Deployment:
    model_dir: Path
    encoder: ServiceProcess
    encoder_metrics: int
    decoder: ServiceProcess

    def encodes(self) -> int:
        return int(scrape(self.encoder_metrics).rpc(*ENCODE, "OK"))


@dataclass
class Front:
    deployments: dict[str, Deployment]
    gateway: ServiceProcess
    http_port: int
    stub: gateway_pb2_grpc.GatewayStub

    def openai(self) -> OpenAI:
        return OpenAI(api_key="unused-on-an-open-gateway", base_url=f"http://127.0.0.1:{self.http_port}/v1",
                      max_retries=0)


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[Front]:
    root = tmp_path_factory.mktemp("members")
    try:
        redis = RedisServer(root / "redis")
    except RedisServerMissing as exc:  # fail, never skip (see tests/integration/conftest.py)
        pytest.fail(str(exc), pytrace=False)
    deployments = {}
    for name, settings in CHECKPOINTS.items():
        model_dir = write_tiny_checkpoint(root / name, **settings)
        args = [*model_args(model_dir), "--torch-threads", "1"]
        port = free_port()
        deployments[name] = Deployment(
            model_dir, ServiceProcess("services.vision_encoder", [*args, "--metrics-port", str(port)]), port,
            ServiceProcess("services.language_decoder", args))
    processes = [p for d in deployments.values() for p in (d.encoder, d.decoder)]
    gateway = None
    channel = None
    try:
        redis.start()
        with ThreadPoolExecutor(len(processes)) as pool:
            for started in [pool.submit(p.start) for p in processes]:
                started.result()
        http_port = free_port()
        models = [f"--model={n}={d.decoder.address}@{d.encoder.address}" for n, d in deployments.items()]
        gateway = ServiceProcess("gateway", [*models, "--redis-url", redis.url, "--insecure-open",
                                             "--http-port", str(http_port)]).start()
        channel = grpc.insecure_channel(gateway.address, options=channel_options())
        yield Front(deployments, gateway, http_port, gateway_pb2_grpc.GatewayStub(channel))
    finally:
        if channel is not None:
            channel.close()
        if gateway is not None:
            gateway.stop()
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(ServiceProcess.stop, processes))
        redis.stop()


def chat(front: Front, model: str, image: bytes) -> gateway_pb2.ChatResponse:
    request = gateway_pb2.ChatRequest(model=model, text="<image>\nDescribe the image.",
                                      images=[vision_pb2.ImageInput(data=image)],
                                      generation=decoder_pb2.SamplingParams(max_new_tokens=6))
    request.tiling.max_tiles = 1
    return front.stub.Chat(request, timeout=120)


def encoder_info(deployment: Deployment) -> vision_pb2.ModelInfo:
    with deployment.encoder.channel() as channel:
        return vision_pb2_grpc.VisionEncoderStub(channel).GetModelInfo(vision_pb2.GetModelInfoRequest(), timeout=30)


def test_each_service_says_what_it_serves(front: Front):
    infos = {name: encoder_info(d) for name, d in front.deployments.items()}
    for name, info in infos.items():
        assert info.model_name == name and info.family_member == CUSTOM_MEMBER
        assert info.vision_fingerprint and info.fingerprint
    assert infos["small"].fingerprint != infos["deep"].fingerprint  # two checkpoints...
    assert infos["small"].vision_fingerprint == infos["deep"].vision_fingerprint  # ...one tower and projector
    assert infos["wide"].vision_fingerprint != infos["small"].vision_fingerprint
    with front.deployments["wide"].decoder.channel() as channel:
        info = decoder_pb2_grpc.LanguageDecoderStub(channel).GetModelInfo(decoder_pb2.DecoderInfoRequest(), timeout=30)
    assert (info.model_name, info.family_member, info.hidden_size) == ("wide", CUSTOM_MEMBER, 96)


def test_the_model_field_picks_the_deployment_and_features_are_shared_only_by_one_tower(front: Front):
    image = fresh_image(7001)
    before = {n: d.encodes() for n, d in front.deployments.items()}
    answers = {name: chat(front, name, image) for name in ("small", "deep", "wide")}
    encoded = {n: d.encodes() - before[n] for n, d in front.deployments.items()}
    # small encoded the image; deep found small's features in the cache (same tower); wide has its own.
    assert encoded == {"small": 1, "deep": 0, "wide": 1}
    assert all(a.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED for a in answers.values())
    # An empty model is the default (the first --model), answering as `small` does.
    assert chat(front, "", image).text == answers["small"].text


def test_an_unknown_model_is_not_found(front: Front):
    with pytest.raises(grpc.RpcError) as err:
        chat(front, "huge", fresh_image(7002))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'huge'" in err.value.details() and "'wide'" in err.value.details()


def test_openai_lists_and_selects_models(front: Front):
    client = front.openai()
    assert [m.id for m in client.models.list().data] == list(CHECKPOINTS)
    assert client.models.retrieve("wide").id == "wide"
    image = fresh_image(7003)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    reply = client.chat.completions.create(
        model="wide", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "max_dynamic_patch": 1}},
            {"type": "text", "text": "Describe the image."}]}])
    assert reply.model == "wide"
    assert reply.choices[0].message.content == chat(front, "wide", image).text
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="huge", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("huge")
