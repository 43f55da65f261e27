"""A parity kit's chat cases as gateway requests (gRPC), and the multi-round chains that run as sessions."""

from __future__ import annotations

from internvl.v1 import decoder_pb2, gateway_pb2
from tests.conftest import Kit


def greedy(case: dict) -> decoder_pb2.SamplingParams:
    gen = case["inputs"]["generation_config"]
    assert not gen["do_sample"]
    return decoder_pb2.SamplingParams(max_new_tokens=gen["max_new_tokens"])


def chat_request(kit: Kit, case: dict, session_id: str = "") -> gateway_pb2.ChatRequest:
    """The gateway request that reproduces a kit case's first use of its media."""
    inputs = case["inputs"]
    request = gateway_pb2.ChatRequest(session_id=session_id, text=inputs["question"], generation=greedy(case))
    media = inputs["images"]
    if media == ["video"]:
        video = kit.manifest["video"]
        request.video.data = kit.path(video["file"]).read_bytes()
        request.video.num_segments = video["load_video_args"]["num_segments"]
        request.tiling.max_tiles = video["load_video_args"]["max_num"]
    elif media:
        images = kit.images
        for image_id in media:
            request.images.add(data=kit.path(images[image_id]["file"]).read_bytes())
        request.tiling.max_tiles = images[media[0]]["max_num"]
        if inputs["num_patches_list"] is None and len(media) > 1:
            request.image_layout = gateway_pb2.IMAGE_LAYOUT_COMBINED
    return request


def run_case_chain(kit: Kit, stub, case: dict) -> list[str]:
    """Run a case, after its history cases in the same session; the answers of every round."""
    chain = [case]
    while chain[0]["inputs"]["history_from_case"]:
        chain.insert(0, kit.case(chain[0]["inputs"]["history_from_case"]))
    session_id = ""
    if len(chain) > 1:
        session_id = stub.CreateSession(gateway_pb2.CreateSessionRequest()).session_id
    answers = []
    for i, step in enumerate(chain):
        if i == 0:
            request = chat_request(kit, step, session_id)
        else:  # later rounds: only the new question; media and history come from the session
            request = gateway_pb2.ChatRequest(session_id=session_id, text=step["inputs"]["question"],
                                              generation=greedy(step))
        answers.append(stub.Chat(request, timeout=120).text)
    if session_id:
        session = stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id))
        assert [[t.user, t.assistant] for t in session.turns] == case["expected"]["history"]
    return answers


def batch_requests(kit: Kit, case: dict) -> list[gateway_pb2.ChatRequest]:
    """The requests of a `batch_chat` case: one question and one image each."""
    inputs = case["inputs"]
    images = kit.images
    requests = []
    for question, image_id in zip(inputs["questions"], inputs["images"], strict=True):
        request = gateway_pb2.ChatRequest(text=question, generation=greedy(case))
        request.images.add(data=kit.path(images[image_id]["file"]).read_bytes())
        request.tiling.max_tiles = images[image_id]["max_num"]
        requests.append(request)
    return requests
