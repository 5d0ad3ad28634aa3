"""ControlNet preprocessors: shapes and dtypes, canny on a known edge, depth from a tiny random model on disk."""

from __future__ import annotations

import numpy as np
import pytest

from sdbridge.engines.preprocessors import Options, Preprocessors
from sdbridge.errors import ModelError, ParamError
from sdbridge.params import PREPROCESSORS


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """Tiny random depth (DPT) and pose (ViTPose) models, saved as their users would put them there."""
    import torch
    from transformers import (DPTConfig, DPTForDepthEstimation, VitPoseBackboneConfig, VitPoseConfig,
                              VitPoseForPoseEstimation)

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])
    folder = tmp_path_factory.mktemp("annotators")
    DPTForDepthEstimation(config).save_pretrained(folder / "depth", safe_serialization=True)
    backbone = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=[64, 48],
                                     patch_size=[8, 8], mlp_ratio=2, out_indices=[2], part_features=8)
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17, use_simple_decoder=True)
                             ).save_pretrained(folder / "pose", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def registry(annotators) -> Preprocessors:
    return Preprocessors(annotators)


def step_edge(width: int = 64, height: int = 48) -> np.ndarray:
    """Black on the left, white from column 32 on: one vertical edge."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, 32:] = 255
    return image


def test_schema_choices_are_the_registry(registry):
    assert set(PREPROCESSORS) <= set(registry.names())


@pytest.mark.parametrize("name", PREPROCESSORS)
def test_every_preprocessor_keeps_shape_and_dtype(registry, name):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = registry.run(name, image)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8


def test_canny_finds_the_edge_and_nothing_else(registry):
    out = registry.run("canny", step_edge())
    columns = np.nonzero(out[..., 0].any(axis=0))[0]
    assert set(columns) <= {31, 32} and len(columns) >= 1
    assert set(np.unique(out)) == {0, 255}
    assert (out[..., 0] == out[..., 1]).all()  # grey edges in RGB


def test_canny_thresholds_matter(registry):
    faint = np.full((48, 64, 3), 100, np.uint8)
    faint[:, 32:] = 130  # a step of 30 grey levels
    assert registry.run("canny", faint, Options(20, 40)).any()
    assert not registry.run("canny", faint, Options(200, 250)).any()


def test_canny_takes_its_thresholds_in_either_order_as_opencv_does(registry):
    """A low threshold above the high one is the same map, as cv2.Canny (and so the A1111 extension) makes it; it was
    refused: a 422 over A1111, a live slot switched off while an LFO swept one threshold past the other (QA 86 F6)."""
    import cv2

    rng = np.random.default_rng(4)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), (0, 0), 2.0)
    swapped = registry.run("canny", image, Options(60, 20))
    in_order = registry.run("canny", image, Options(20, 60))
    assert np.array_equal(swapped, in_order)
    assert np.array_equal(swapped[..., 0], cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 60, 20))
    # both numbers count, not one of them twice
    assert not np.array_equal(swapped, registry.run("canny", image, Options(60, 60)))
    assert not np.array_equal(swapped, registry.run("canny", image, Options(20, 20)))
    with pytest.raises(ParamError, match="-5"):
        registry.run("canny", image, Options(-5, 100))


def test_softedge_and_lineart_peak_at_the_edge(registry):
    for name in ("softedge", "lineart"):
        out = registry.run(name, step_edge())[..., 0].astype(int)
        profile = out.mean(axis=0)
        assert profile[28:36].max() > 100, name
        assert profile[:20].max() < 10 and profile[44:].max() < 10, name


def test_invert_and_none(registry):
    image = step_edge()
    assert registry.run("none", image) is image
    assert np.array_equal(registry.run("invert", image), 255 - image)


def test_processor_resolution_runs_smaller_and_returns_the_same_size(registry):
    out = registry.run("canny", step_edge(128, 96), Options(resolution=48))
    assert out.shape == (96, 128, 3)
    assert out[:, 28:38].any() and not out[:, 44:].any() and not out[:, :24].any()


def test_depth_from_a_tiny_random_model(registry):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = registry.run("depth", image)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() >= 250  # normalised to the full range
    assert np.array_equal(out, registry.run("depth", image))


def test_depth_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="depth preprocessor needs its model") as caught:
        Preprocessors(tmp_path).run("depth", step_edge())
    assert caught.value.code == "model_not_found"


def test_unknown_preprocessor(registry):
    with pytest.raises(ParamError, match="unknown preprocessor 'segmentation'") as caught:
        registry.run("segmentation", step_edge())
    assert caught.value.code == "unknown_preprocessor"


def test_openpose_order_from_coco():
    from sdbridge.engines.preprocessors import COCO_TO_OPENPOSE

    coco = ["nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist",
            "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle"]
    openpose = ["nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
                "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear"]
    assert [None if index is None else coco[index] for index in COCO_TO_OPENPOSE] == [
        None if name == "neck" else name for name in openpose]


def test_pose_from_a_tiny_random_vitpose_is_drawn_in_openpose_colours(registry):
    from sdbridge.engines.preprocessors import OPENPOSE_COLOURS

    pose = registry.get("pose")
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    out = registry.run("pose", image)
    assert out.shape == image.shape and out.dtype == np.uint8
    pose.threshold = -np.inf  # every point found: all 18 drawn, the neck between the shoulders
    try:
        points = pose.keypoints(image)
        drawn = registry.run("pose", image)
    finally:
        pose.threshold = 0.3
    assert len(points) == 18 and all(point is not None for point in points)
    neck, right, left = points[1], points[2], points[5]
    assert neck == ((right[0] + left[0]) / 2, (right[1] + left[1]) / 2)
    stick = 2  # at this size
    checked = 0
    for index, (point, colour) in enumerate(zip(points, OPENPOSE_COLOURS)):
        later = points[index + 1:]
        if any(abs(p[0] - point[0]) <= 2 * stick + 1 and abs(p[1] - point[1]) <= 2 * stick + 1 for p in later):
            continue  # a later point's dot covers this one
        x, y = min(round(point[0]), 127), min(round(point[1]), 95)
        assert tuple(int(v) for v in drawn[y, x]) == colour, index
        checked += 1
    assert checked >= 3
    assert (drawn == 0).all(axis=2).mean() > 0.3  # a black background


def test_openpose_module_in_the_a1111_list():
    from sdbridge.bridge.a1111_controlnet import MODULES

    assert MODULES["openpose"] == "pose"


def test_processor_resolution_never_makes_a_side_past_the_limit(registry):
    from sdbridge.engines.preprocessors import MAX_SIDE

    strip = np.zeros((2, 600, 3), np.uint8)  # 4096 on the short side would make it 1,228,800 wide
    assert registry.run("canny", strip, Options(resolution=4096)).shape == (2, 600, 3)
    assert MAX_SIDE == 4096
