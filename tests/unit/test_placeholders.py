import pytest

from gateway.placeholders import PlaceholderError, place_images


def test_text_only_passes_through():
    assert place_images("Hello", num_items=0) == "Hello"


def test_text_only_with_placeholder_is_rejected():
    with pytest.raises(PlaceholderError, match="no image"):
        place_images("<image> what?", num_items=0)


def test_single_image_gets_upstream_prefix():
    assert place_images("Describe.", num_items=1) == "<image>\nDescribe."


def test_explicit_placeholder_kept():
    assert place_images("Look: <image> now", num_items=1) == "Look: <image> now"


def test_separate_images_are_labelled():
    assert place_images("Compare.", num_items=2) == "Image-1: <image>\nImage-2: <image>\nCompare."


def test_combined_images_share_one_block():
    assert place_images("Describe.", num_items=3, combined=True) == "<image>\nDescribe."
    with pytest.raises(PlaceholderError, match="exactly 1"):
        place_images("<image><image>", num_items=2, combined=True)


def test_video_frames_are_numbered():
    assert place_images("What?", num_items=2, video=True) == "Frame1: <image>\nFrame2: <image>\nWhat?"


def test_count_mismatch_is_rejected():
    with pytest.raises(PlaceholderError, match="2 <image> placeholder"):
        place_images("<image> and <image>", num_items=3)
