"""The gateway's OpenAI-compatible HTTP API with the official `openai` client, against real processes.

Redis, the encoder, the decoder and the gateway run as real processes on loopback; images are sent as
data URIs or fetched by the gateway from a real HTTP server on loopback (allowed with
`--allowed-media-domains localhost --allow-private-media-addresses`). The decoder has one sequence
slot and two queue places (two, so that the two requests of an `n=2` call, which may both arrive before
the engine admits either, always fit), so concurrent requests beyond that get 429. Encode calls are counted on the
encoder's own metrics.
"""

from __future__ import annotations

import base64
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from openai import OpenAI

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2
from services.common.server import channel_options
from tests.conftest import Kit, load_kit
from tests.integration.hardening import LONG_GENERATION, LONG_GENERATION_GATEWAY_ARGS, LONG_GENERATION_TOKENS
from tests.integration.observe import scrape, wait_for_metrics
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import model_args
from tests.media_server import MediaServer
from tests.redis_server import RedisServer
from tests.tls_certs import make_pki

KIT = load_kit()
CASES = KIT.chat_cases
API_KEY = "test-key-openai-api"
ENCODER_SERVICE = "internvl.v1.VisionEncoder"
DECODER_SERVICE = "internvl.v1.LanguageDecoder"


@dataclass
class HttpStack:
    redis: RedisServer
    encoder: ServiceProcess
    decoder: ServiceProcess
    gateway: ServiceProcess
    media: MediaServer
    http_port: int
    encoder_metrics: int
    decoder_metrics: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def client(self, api_key: str = API_KEY, **kw) -> OpenAI:
        return OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, **kw)

    def encodes(self) -> float:
        return scrape(self.encoder_metrics).rpc(ENCODER_SERVICE, "Encode", "OK")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[HttpStack]:
    workdir = tmp_path_factory.mktemp("openai")
    keys = workdir / "keys"
    keys.write_text(API_KEY + "\n")
    files = {f"/{Path(img['file']).name}": KIT.path(img["file"]).read_bytes() for img in KIT.images.values()}
    started: list = []
    try:
        media = MediaServer(files).__enter__()
        started.append(media)
        redis = RedisServer(workdir / "redis").start()
        started.append(redis)
        encoder_metrics, decoder_metrics, http_port = free_port(), free_port(), free_port()
        encoder = ServiceProcess("services.vision_encoder",
                                 [*model_args(KIT.root), "--metrics-port", str(encoder_metrics)]).start()
        started.append(encoder)
        decoder = ServiceProcess("services.language_decoder",
                                 [*model_args(KIT.root), "--metrics-port", str(decoder_metrics),
                                  "--max-num-seqs", "1", "--max-queue-size", "2"]).start()
        started.append(decoder)
        gateway = ServiceProcess("gateway", [
            "--encoder", encoder.address, "--decoder", decoder.address, "--redis-url", redis.url,
            "--api-keys-file", str(keys), "--http-port", str(http_port),
            "--allowed-media-domains", "localhost", "--allow-private-media-addresses",
            *LONG_GENERATION_GATEWAY_ARGS]).start()  # a generation long enough to disconnect from mid-way
        started.append(gateway)
        wait_http_ready(http_port)
    except BaseException:
        for thing in reversed(started):
            thing.__exit__(None, None, None) if isinstance(thing, MediaServer) else thing.stop()
        raise
    yield HttpStack(redis, encoder, decoder, gateway, media, http_port, encoder_metrics, decoder_metrics)
    gateway.stop()
    decoder.stop()
    encoder.stop()
    redis.stop()
    media.__exit__(None, None, None)


def wait_http_ready(port: int, timeout_s: float = 60.0) -> None:
    """Poll /health until 200 (the gRPC health check passed already; uvicorn binds before that)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if reply.status_code == 200:
                return
            last = reply.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"HTTP API on port {port} not ready: {last}")


# ---------------------------------------------------------------------------------------------- helpers


def data_uri(path: Path) -> str:
    kind = "video/mp4" if path.suffix == ".mp4" else f"image/{path.suffix.lstrip('.').replace('jpg', 'jpeg')}"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def case_user_message(kit: Kit, case: dict) -> tuple[dict, dict]:
    """The user message of a case's first use of its media (as the gRPC tests build it), and extra_body."""
    inputs = case["inputs"]
    media = inputs["images"]
    parts: list[dict] = []
    extra: dict = {}
    if media == ["video"]:
        video = kit.manifest["video"]
        args = video["load_video_args"]
        parts.append({"type": "video_url", "video_url": {"url": data_uri(kit.path(video["file"])),
                                                         "num_segments": args["num_segments"],
                                                         "max_dynamic_patch": args["max_num"]}})
    elif media:
        tiles = kit.images[media[0]]["max_num"]
        for image_id in media:
            parts.append({"type": "image_url", "image_url": {"url": data_uri(kit.path(kit.images[image_id]["file"])),
                                                             "max_dynamic_patch": tiles}})
        if inputs["num_patches_list"] is None and len(media) > 1:
            extra["image_layout"] = "combined"
    parts.append({"type": "text", "text": inputs["question"]})
    return {"role": "user", "content": parts}, extra


def case_messages(case: dict) -> tuple[list[dict], dict]:
    """The stateless form of a case: earlier rounds sent along as history, with their media."""
    chain = [case]
    while chain[0]["inputs"]["history_from_case"]:
        chain.insert(0, CASES[chain[0]["inputs"]["history_from_case"]])
    first, extra = case_user_message(KIT, chain[0])
    messages = [first]
    for earlier, step in zip(chain, chain[1:], strict=False):
        messages.append({"role": "assistant", "content": earlier["expected"]["responses"][0]})
        messages.append({"role": "user", "content": step["inputs"]["question"]})
    return messages, extra


def greedy(case: dict) -> dict:
    gen = case["inputs"]["generation_config"]
    assert not gen["do_sample"]
    return {"temperature": 0, "max_tokens": gen["max_new_tokens"]}


def model_id(stack: HttpStack) -> str:
    return stack.client().models.list().data[0].id


# ---------------------------------------------------------------------------------------------- tests


def test_models_list_names_the_checkpoint(stack):
    models = stack.client().models.list().data
    assert [m.id for m in models] == [KIT.root.name]  # default: the checkpoint directory's name
    assert stack.client().models.retrieve(KIT.root.name).id == KIT.root.name


CHAT_CASES = [c for c in CASES if CASES[c]["api"] == "chat"]


@pytest.mark.parametrize("case_id", CHAT_CASES)
def test_chat_case_over_http_matches_upstream(stack, case_id):
    case = CASES[case_id]
    messages, extra = case_messages(case)
    reply = stack.client().chat.completions.create(model=model_id(stack), messages=messages, extra_body=extra,
                                                   **greedy(case))
    choice = reply.choices[0]
    assert choice.message.content == case["expected"]["responses"][0]
    assert choice.finish_reason == ("stop" if case["expected"]["stopped_on_eos"][0] else "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("case_id", [c for c in CASES if CASES[c]["api"] == "batch_chat"])
def test_batch_case_over_http_matches_upstream(stack, case_id):
    case = CASES[case_id]
    client = stack.client()
    answers = []
    for question, image_id in zip(case["inputs"]["questions"], case["inputs"]["images"], strict=True):
        image = KIT.images[image_id]
        content = [{"type": "image_url", "image_url": {"url": data_uri(KIT.path(image["file"])),
                                                       "max_dynamic_patch": image["max_num"]}},
                   {"type": "text", "text": question}]
        reply = client.chat.completions.create(model=model_id(stack), messages=[{"role": "user", "content": content}],
                                               **greedy(case))
        answers.append(reply.choices[0].message.content)
    assert answers == case["expected"]["responses"]


def test_the_model_cards_openai_snippet(stack):
    """LMDeploy's snippet from the InternVL2 model card, as written, with a URL the gateway may fetch."""
    client = OpenAI(api_key=API_KEY, base_url=stack.base_url)
    model_name = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model_name,
        messages=[{
            'role':
            'user',
            'content': [{
                'type': 'text',
                'text': 'describe this image',
            }, {
                'type': 'image_url',
                'image_url': {
                    'url':
                    stack.media.url("/img0_800x600.png", "localhost"),
                },
            }],
        }],
        temperature=0.8,
        top_p=0.8)
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 256  # the image's tokens are in the prompt


def test_a_url_image_gives_the_same_answer_as_its_data_uri(stack):
    case = CASES["image_single_round"] if "image_single_round" in CASES else next(
        c for c in CASES.values() if c["api"] == "chat" and len(c["inputs"]["images"]) == 1
        and c["inputs"]["images"] != ["video"] and not c["inputs"]["history_from_case"])
    image = KIT.images[case["inputs"]["images"][0]]
    url = stack.media.url(f"/{Path(image['file']).name}", "localhost")
    content = [{"type": "image_url", "image_url": {"url": url, "max_dynamic_patch": image["max_num"]}},
               {"type": "text", "text": case["inputs"]["question"]}]
    reply = stack.client().chat.completions.create(model=model_id(stack),
                                                   messages=[{"role": "user", "content": content}], **greedy(case))
    assert reply.choices[0].message.content == case["expected"]["responses"][0]


def test_streaming_with_usage_equals_the_unary_answer(stack):
    case = next(CASES[c] for c in CHAT_CASES if CASES[c]["inputs"]["images"]
                and not CASES[c]["inputs"]["history_from_case"])
    messages, extra = case_messages(case)
    stream = stack.client().chat.completions.create(model=model_id(stack), messages=messages, extra_body=extra,
                                                    stream=True, stream_options={"include_usage": True},
                                                    **greedy(case))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == case["expected"]["responses"][0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if case["expected"]["stopped_on_eos"][0] else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


def test_multi_turn_with_an_image_in_history_encodes_it_once(stack):
    """A stateless client sends the image again in its history: features come from the shared cache."""
    image = KIT.images["img4"] if "img4" in KIT.images else next(iter(KIT.images.values()))
    # A tiling no other test uses, so the first request is certainly a cache miss.
    part = {"type": "image_url", "image_url": {"url": data_uri(KIT.path(image["file"])), "max_dynamic_patch": 3}}
    client = stack.client()
    first_turn = {"role": "user", "content": [part, {"type": "text", "text": "What is in the image?"}]}
    before = stack.encodes()
    first = client.chat.completions.create(model=model_id(stack), messages=[first_turn], temperature=0, max_tokens=8)
    after_first = wait_for_metrics(stack.encoder_metrics,
                                   lambda m: m.rpc(ENCODER_SERVICE, "Encode", "OK") >= before + 1)
    assert after_first.rpc(ENCODER_SERVICE, "Encode", "OK") == before + 1
    second = client.chat.completions.create(model=model_id(stack), messages=[
        first_turn, {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And its colours?"}], temperature=0, max_tokens=8)
    assert second.choices[0].message.content
    assert stack.encodes() == before + 1  # no second encode
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # The decoder reused the first turn's KV (image keys match): cached prompt tokens are reported.
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_two_images_and_a_video_answer_as_over_grpc(stack):
    """The same media and text over HTTP and over gRPC: the same prompt, so the same greedy answer."""
    img_a, img_b = (KIT.images[i] for i in list(KIT.images)[:2])
    video = KIT.manifest["video"]
    requests = [
        ([{"type": "image_url", "image_url": {"url": data_uri(KIT.path(img_a["file"])), "max_tiles": 2}},
          {"type": "image_url", "image_url": {"url": data_uri(KIT.path(img_b["file"])), "max_tiles": 2}},
          {"type": "text", "text": "Compare the two images."}],
         gateway_pb2.ChatRequest(text="Compare the two images.", images=[
             vision_pb2.ImageInput(data=KIT.path(img_a["file"]).read_bytes()),
             vision_pb2.ImageInput(data=KIT.path(img_b["file"]).read_bytes())])),
        ([{"type": "video_url", "video_url": {"url": data_uri(KIT.path(video["file"])), "num_segments": 4}},
          {"type": "text", "text": "What happens in the video?"}],
         gateway_pb2.ChatRequest(text="What happens in the video?",
                                 video=vision_pb2.VideoInput(data=KIT.path(video["file"]).read_bytes(),
                                                                          num_segments=4))),
    ]
    channel = grpc.insecure_channel(stack.gateway.address, options=channel_options())
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        for content, grpc_request in requests:
            if grpc_request.images:
                grpc_request.tiling.max_tiles = 2
            grpc_request.generation.CopyFrom(decoder_pb2.SamplingParams(max_new_tokens=12))
            over_grpc = stub.Chat(grpc_request, timeout=120, metadata=[("authorization", f"Bearer {API_KEY}")])
            over_http = stack.client().chat.completions.create(
                model=model_id(stack), messages=[{"role": "user", "content": content}], temperature=0, max_tokens=12)
            assert over_http.choices[0].message.content == over_grpc.text
            assert over_http.usage.prompt_tokens == over_grpc.usage.prompt_tokens
            assert over_http.choices[0].message.boxes == [] and list(over_grpc.boxes) == []
    finally:
        channel.close()


def test_n_choices_and_seeds(stack):
    reply = stack.client().chat.completions.create(model=model_id(stack), messages=[{"role": "user", "content": "Hi"}],
                                                   n=2, temperature=0.9, seed=7, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1]
    again = stack.client().chat.completions.create(model=model_id(stack), messages=[{"role": "user", "content": "Hi"}],
                                                   n=2, temperature=0.9, seed=7, max_tokens=6)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        stack.client().chat.completions.create(model=model_id(stack), messages=[{"role": "user", "content": "Hi"}],
                                               n=100)


def test_request_ids_come_back(stack):
    raw = stack.client().chat.completions.with_raw_response.create(
        model=model_id(stack), messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_headers={"x-request-id": "req-openai-1"})
    returned = raw.headers["x-request-id"]
    assert returned.startswith("req-openai-1.")  # the client's id, made unique per call (issue 16)
    assert raw.parse().id == f"chatcmpl-{returned}"


# ---------------------------------------------------------------------------------------------- errors


def hi(stack, **kw):
    """A small chat with the given overrides (`client` = keyword arguments of the client)."""
    client = stack.client(**kw.pop("client", {}))
    return client.chat.completions.create(model=kw.pop("model", None) or model_id(stack),
                                          messages=kw.pop("messages", [{"role": "user", "content": "Hi"}]),
                                          max_tokens=kw.pop("max_tokens", 4), **kw)


def test_400_bad_values_and_unhonoured_fields_are_named(stack):
    with pytest.raises(openai.BadRequestError) as info:
        hi(stack, temperature=-1)
    assert "temperature must be >= 0" in info.value.message and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        hi(stack, presence_penalty=0.5)
    assert info.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as info:
        hi(stack, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as info:  # the gRPC API's placeholder message
        hi(stack, messages=[{"role": "user", "content": "<image> without an image"}])
    assert "placeholder" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        hi(stack, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": stack.media.url("/img0_800x600.png", "127.0.0.1")}}]}])
    assert "not in --allowed-media-domains" in info.value.message


def test_400_fetched_bytes_that_are_not_an_image(stack):
    stack.media.files["/fake.png"] = b"<html>I am not a PNG</html>"
    with pytest.raises(openai.BadRequestError, match="not an image"):
        hi(stack, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": stack.media.url("/fake.png", "localhost")}}]}])


def test_401_without_a_valid_key(stack):
    with pytest.raises(openai.AuthenticationError) as info:
        hi(stack, client={"api_key": "wrong"})
    assert info.value.status_code == 401 and "invalid API key" in info.value.message
    assert httpx.get(f"http://127.0.0.1:{stack.http_port}/v1/models").status_code == 401
    assert httpx.get(f"http://127.0.0.1:{stack.http_port}/health").status_code == 200  # open, like gRPC health


def test_404_unknown_model(stack):
    with pytest.raises(openai.NotFoundError) as info:
        hi(stack, model="gpt-4o")
    assert info.value.body["code"] == "model_not_found"


def test_413_media_too_large(stack):
    too_big = stack.media.url(f"/big?n={25 * 1024 * 1024}", "localhost")  # over the 20 MiB image limit
    with pytest.raises(openai.APIStatusError) as info:
        hi(stack, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": too_big}}]}])
    assert info.value.status_code == 413


def test_429_with_retry_after_when_the_decoder_queue_is_full(stack):
    start = threading.Barrier(8)

    def one(_):
        start.wait()
        try:
            # Long enough to hold the slot (greedy "Hi" ends after a few tokens): see LONG_GENERATION.
            hi(stack, client={}, max_tokens=LONG_GENERATION_TOKENS, temperature=LONG_GENERATION["temperature"],
               seed=LONG_GENERATION["seed"])
            return None
        except openai.RateLimitError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    refused = [e for e in outcomes if e is not None]
    assert refused, "one slot and two queue places: some of 8 concurrent long requests must be refused"
    for exc in refused:
        assert exc.status_code == 429 and int(exc.response.headers["retry-after"]) >= 1


def test_504_on_deadline(stack):
    with pytest.raises(openai.APIStatusError) as info:
        hi(stack, max_tokens=400, extra_headers={"x-request-timeout": "0.001"})
    assert info.value.status_code == 504


def test_a_client_disconnect_cancels_generation(stack):
    before = scrape(stack.decoder_metrics).rpc(DECODER_SERVICE, "Generate", "CANCELLED")
    # Greedy "Hi" ends after a few tokens on the tiny model, before a disconnect could land: this seeded
    # near-uniform sampling runs LONG_GENERATION_TOKENS without meeting <|im_end|>.
    stream = stack.client().chat.completions.create(
        model=model_id(stack), messages=[{"role": "user", "content": "Hi"}], stream=True,
        max_tokens=LONG_GENERATION_TOKENS, temperature=LONG_GENERATION["temperature"], seed=LONG_GENERATION["seed"])
    next(iter(stream))
    stream.close()
    metrics = wait_for_metrics(stack.decoder_metrics,
                               lambda m: m.rpc(DECODER_SERVICE, "Generate", "CANCELLED") > before, timeout_s=30)
    assert metrics.rpc(DECODER_SERVICE, "Generate", "CANCELLED") > before


def test_503_while_peers_are_down(stack, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    http_port = free_port()
    gateway = ServiceProcess("gateway", ["--encoder", dead, "--decoder", dead, "--redis-url", stack.redis.url,
                                         "--insecure-open", "--http-port", str(http_port),
                                         "--served-model-name", "InternVL2-test"]).start()
    try:
        client = OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{http_port}/v1", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="InternVL2-test", messages=[{"role": "user", "content": "Hi"}])
        assert info.value.status_code == 503 and "language decoder" in info.value.message
        health = httpx.get(f"http://127.0.0.1:{http_port}/health")
        assert health.status_code == 503 and "vision encoder" in health.json()["error"]["message"]
    finally:
        gateway.stop()


class TlsProcess(ServiceProcess):
    """A gateway whose start-up health checks go over (mutual) TLS."""

    def __init__(self, module: str, args: list[str], credentials: grpc.ChannelCredentials):
        super().__init__(module, args)
        self.credentials = credentials

    def channel(self, options=()) -> grpc.Channel:
        return grpc.secure_channel(self.address, self.credentials, options=list(options))


def test_https_with_the_grpc_servers_certificates_and_client_certificates(stack, tmp_path):
    """--tls-cert/--tls-key/--tls-ca serve HTTPS too, requiring a client certificate signed by the CA."""
    pki = make_pki(tmp_path / "pki")
    http_port = free_port()
    credentials = grpc.ssl_channel_credentials(pki.ca_bytes, pki.client.key_bytes, pki.client.cert_bytes)
    gateway = TlsProcess("gateway", [
        "--encoder", stack.encoder.address, "--decoder", stack.decoder.address, "--redis-url", stack.redis.url,
        "--insecure-open", "--http-port", str(http_port), "--tls-cert", str(pki.server.cert),
        "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca.cert)], credentials).start()
    try:
        verify = ssl.create_default_context(cafile=str(pki.ca.cert))
        verify.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        with httpx.Client(verify=verify) as http:
            client = OpenAI(api_key="unused", base_url=f"https://localhost:{http_port}/v1", http_client=http,
                            max_retries=0)
            reply = client.chat.completions.create(model=KIT.root.name, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3, temperature=0)
            assert reply.choices[0].message.content is not None
        anonymous = ssl.create_default_context(cafile=str(pki.ca.cert))  # no client certificate
        with pytest.raises((httpx.HTTPError, ssl.SSLError, OSError)), httpx.Client(verify=anonymous) as http:
            http.get(f"https://localhost:{http_port}/health").raise_for_status()
    finally:
        gateway.stop()
