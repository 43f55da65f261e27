"""Every other family kit through the real system (issue #18, Tests): redis-server, encoder, decoder and
gateway as processes serving that kit's checkpoint (its vision tower, language model, tokenizer and
template), every chat case as upstream answered it.

test_end_to_end.py runs the PARITY_KIT kit (dev by default) case by case with more API checks; here one
stack per other kit runs all of its cases: chat cases (multi-round ones as sessions, the later rounds
sending only their new question), batch cases, and one single-round case streamed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from internvl.v1 import decoder_pb2, gateway_pb2
from tests.conftest import Kit, load_kit
from tests.integration.kit_chat import batch_requests, chat_request, run_case_chain
from tests.integration.stack import start_stack
from tests.kits import FAMILY_KIT_NAMES, fixture_kit

_DEFAULT_ROOT = load_kit().root.resolve()
KITS = [name for name in FAMILY_KIT_NAMES if fixture_kit(name).root.resolve() != _DEFAULT_ROOT]


@pytest.fixture(scope="module", params=KITS)
def kit_gateway(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[tuple[Kit, object]]:
    kit = fixture_kit(request.param)
    stack = start_stack(kit.root, tmp_path_factory.mktemp(f"stack-{request.param}"))
    channel, stub = stack.gateway_stub()
    try:
        yield kit, stub
    finally:
        channel.close()
        stack.stop()


def test_every_case_through_gateway(kit_gateway) -> None:
    kit, stub = kit_gateway
    got, want = {}, {}
    for case in kit.manifest["chat_cases"]:
        want[case["id"]] = case["expected"]["responses"]
        if case["api"] == "batch_chat":
            reply = stub.BatchChat(gateway_pb2.BatchChatRequest(requests=batch_requests(kit, case)), timeout=120)
            got[case["id"]] = [r.text for r in reply.responses]
        else:
            got[case["id"]] = run_case_chain(kit, stub, case)[-1:]
    assert got == want


def test_streamed_case_through_gateway(kit_gateway) -> None:
    kit, stub = kit_gateway
    single = [c for c in kit.manifest["chat_cases"] if c["api"] == "chat" and not c["inputs"]["history_from_case"]]
    if not single:
        kit.lacks("single-round chat case")
    case = max(single, key=lambda c: len(c["expected"]["responses"][0]))  # the most text to stream
    parts = list(stub.ChatStream(chat_request(kit, case), timeout=120))
    assert "".join(p.text for p in parts) == case["expected"]["responses"][0]
    stopped = case["expected"]["stopped_on_eos"][0]
    assert parts[-1].finish_reason == (decoder_pb2.FINISH_REASON_STOP if stopped else decoder_pb2.FINISH_REASON_LENGTH)
