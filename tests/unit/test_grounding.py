"""Grounding boxes parsed from InternVL2's answer formats, mapped to the pixels of a real image."""

from __future__ import annotations

import pytest

from gateway.grounding import GroundingBox, ImageSize, image_size, parse_boxes
from tests.conftest import load_kit

KIT = load_kit()


def test_one_ref_one_box_in_pixels_of_a_single_image():
    text = "<ref>the red car</ref><box>[[100, 250, 500, 1000]]</box>"
    assert parse_boxes(text, [ImageSize(800, 600)]) == [
        GroundingBox("the red car", 80.0, 150.0, 400.0, 600.0, image_index=0, normalized=False)]


def test_several_boxes_for_one_ref_and_several_refs():
    # The model card's multi-object answers: one <ref> may carry several boxes.
    text = ("In the image, <ref>two dogs</ref><box>[[10, 20, 300, 400], [500, 520, 990, 1000]]</box> sit "
            "next to <ref>a ball</ref><box>[[0,0,1000,1000]]</box>.")
    boxes = parse_boxes(text, [ImageSize(1000, 500)])
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in boxes] == [
        ("two dogs", 10.0, 10.0, 300.0, 200.0), ("two dogs", 500.0, 260.0, 990.0, 500.0),
        ("a ball", 0.0, 0.0, 1000.0, 500.0)]


def test_a_box_without_a_ref_and_decimal_and_spaced_numbers():
    boxes = parse_boxes("<box>[[ 12.5 , 40,  600 ,700 ]]</box>", [ImageSize(2000, 1000)])
    assert boxes == [GroundingBox("", 25.0, 40.0, 1200.0, 700.0, image_index=0, normalized=False)]


def test_several_images_or_none_give_normalised_coordinates():
    text = "<ref>cat</ref><box>[[250, 500, 750, 1000]]</box>"
    expected = [GroundingBox("cat", 0.25, 0.5, 0.75, 1.0, image_index=None, normalized=True)]
    assert parse_boxes(text, [ImageSize(10, 10), ImageSize(20, 20)]) == expected
    assert parse_boxes(text, []) == expected
    assert parse_boxes(text, [None]) == expected  # a single image whose size is unknown


def test_out_of_range_values_are_clamped_and_malformed_boxes_skipped():
    boxes = parse_boxes("<ref>x</ref><box>[[-5, 0, 1200, 1000]]</box><ref>y</ref><box>[[1, 2, 3]]</box>",
                        [ImageSize(100, 100)])
    assert [(b.label, b.x1, b.x2) for b in boxes] == [("x", 0.0, 100.0)]


def test_text_without_boxes():
    assert parse_boxes("A cat on a mat. <ref>cat</ref> is mentioned without a box.", [ImageSize(1, 1)]) == []


@pytest.mark.parametrize("image_id", list(KIT.images))
def test_boxes_map_to_the_pixels_of_a_real_image(image_id):
    from PIL import Image

    path = KIT.path(KIT.images[image_id]["file"])
    with Image.open(path) as img:
        width, height = img.size
    size = image_size(path.read_bytes())
    assert size == ImageSize(width, height)
    (box,) = parse_boxes("<ref>all</ref><box>[[0, 0, 1000, 1000]]</box>", [size])
    assert (box.x1, box.y1, box.x2, box.y2) == (0.0, 0.0, float(width), float(height))
    (half,) = parse_boxes("<ref>centre</ref><box>[[250, 250, 750, 750]]</box>", [size])
    assert half.x2 - half.x1 == pytest.approx(width / 2) and half.y2 - half.y1 == pytest.approx(height / 2)


def test_not_an_image_has_no_size():
    assert image_size(b"not an image") is None


def test_boxes_on_the_final_grpc_message_and_the_http_message():
    from gateway.core import ChatEvent, Completion, TurnEnd, Usage
    from gateway.openai_api import completion_json
    from gateway.servicer import stream_response, unary_response

    text = "<ref>cat</ref><box>[[100, 200, 300, 400]]</box>"
    end = TurnEnd("stop", Usage(10, 5, 0), tuple(parse_boxes(text, [ImageSize(1000, 500)])))
    unary = unary_response(Completion(text, end), "")
    assert unary.text == text  # the text stays upstream's
    (box,) = unary.boxes
    assert (box.label, box.image_index, box.x1, box.y1, box.x2, box.y2, box.normalized) == \
        ("cat", 0, 100.0, 100.0, 300.0, 200.0, False)
    assert stream_response(ChatEvent("x"), "").boxes == []  # deltas carry none
    assert len(stream_response(ChatEvent("", end), "").boxes) == 1
    normalised = TurnEnd("stop", Usage(), tuple(parse_boxes(text, [])))
    assert not unary_response(Completion(text, normalised), "").boxes[0].HasField("image_index")
    message = completion_json("id", "m", 0, [(text, end)])["choices"][0]["message"]
    assert message["content"] == text
    assert message["boxes"] == [{"label": "cat", "image_index": 0, "box": [100.0, 100.0, 300.0, 200.0],
                                 "normalized": False}]
