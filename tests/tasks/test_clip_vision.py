"""CLIP's vision tower on its own: image-feature-extraction with CLIPVisionModel,
CLIPVisionModelWithProjection and whole CLIP checkpoints, and CLIPForImageClassification, against
transformers on tiny random checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_helpers import IMAGE_SIZE, randomize_clip, sample_images, tiny_clip_checkpoint
from lightpipe import InvalidInput, pipeline

ATOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=8, projection_dim=16)
LABELS = ["cat", "dog", "bird"]


def save_vision_checkpoint(folder, cls_name: str, seed: int = 0):
    import transformers

    config = transformers.CLIPVisionConfig(**VISION)
    torch.manual_seed(seed)
    model = randomize_clip(getattr(transformers, cls_name)(config), seed)
    model.save_pretrained(str(folder))
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(folder))
    return folder


def save_classifier_checkpoint(folder, seed: int = 0):
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        vision_config={k: v for k, v in VISION.items() if k != "projection_dim"},
        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    torch.manual_seed(seed)
    model = randomize_clip(transformers.CLIPForImageClassification(config), seed)
    model.save_pretrained(str(folder))
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(folder))
    return folder


def reference(task: str, folder):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.pipeline(task, model=str(folder))


def assert_close(ours, ref):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.abs(ours - ref).max() <= ATOL


@pytest.fixture(scope="module")
def images():
    return sample_images(4, seed=3)


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    return save_vision_checkpoint(tmp_path_factory.mktemp("clip-vision"), "CLIPVisionModel")


@pytest.fixture(scope="module")
def projection_folder(tmp_path_factory):
    return save_vision_checkpoint(tmp_path_factory.mktemp("clip-vision-proj"), "CLIPVisionModelWithProjection", seed=1)


@pytest.mark.parametrize("pool", [False, True])
def test_vision_model_features_equal_transformers(vision_folder, images, pool):
    ours = pipeline("image-feature-extraction", model=str(vision_folder))
    ref = reference("image-feature-extraction", vision_folder)
    assert ours.task == "image-feature-extraction"
    got, want = ours(images, pool=pool, batch_size=3), ref(images, pool=pool)
    for g, w in zip(got, want):
        assert_close(g, w)
    assert np.asarray(got[0]).shape == ((1, 32) if pool else (1, 1 + (IMAGE_SIZE // 8) ** 2, 32))


def test_vision_model_saved_with_the_older_key_prefix_loads(vision_folder, images, tmp_path):
    # transformers 4 saved CLIPVisionModel's weights under "vision_model."; 5 saves them at the top level.
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((vision_folder / name).read_text())
    state = load_file(str(vision_folder / "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in state)
    save_file({"vision_model." + k: v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    old, new = pipeline("image-feature-extraction", model=str(tmp_path)), pipeline("image-feature-extraction",
                                                                                   model=str(vision_folder))
    assert_close(old(images[0]), new(images[0]))


@pytest.mark.parametrize("pool", [False, True])
def test_projection_checkpoint_serves_its_tower_as_transformers(projection_folder, images, pool):
    # transformers reads a CLIPVisionModelWithProjection checkpoint with CLIPVisionModel (projection unused).
    ours = pipeline("image-feature-extraction", model=str(projection_folder))
    ref = reference("image-feature-extraction", projection_folder)
    got, want = ours(images, pool=pool), ref(images, pool=pool)
    for g, w in zip(got, want):
        assert_close(g, w)
    tensors = ours(images[0], return_tensors=True, pool=pool)
    assert isinstance(tensors, torch.Tensor) and tuple(tensors.shape) == np.asarray(want[0]).shape


@pytest.mark.parametrize("pool", [False, True])
def test_whole_clip_checkpoint_serves_its_vision_tower(tmp_path, images, pool):
    # transformers' pipeline fails here (its CLIPModel needs text too); lightpipe answers with the vision
    # tower's states, which transformers' CLIPModel.vision_model gives.
    import transformers

    folder = tiny_clip_checkpoint(tmp_path, seed=2)
    ours = pipeline("image-feature-extraction", model=str(folder))
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    loaded = [transformers.image_utils.load_image(image) for image in images]  # as its pipelines load them
    with torch.no_grad():
        out = model.vision_model(**processor(loaded, return_tensors="pt"))
    want = out.pooler_output if pool else out.last_hidden_state
    for g, w in zip(ours(images, batch_size=2, pool=pool), want):
        assert_close(g, w[None])
    zero_shot = pipeline("zero-shot-image-classification", model=str(folder))  # the same folder serves both
    assert len(zero_shot(images[0], candidate_labels=LABELS)) == 3


def test_clip_image_classification_equals_transformers(tmp_path, images):
    folder = save_classifier_checkpoint(tmp_path)
    ours = pipeline("image-classification", model=str(folder))
    ref = reference("image-classification", folder)
    assert ours.task == "image-classification"
    for g, w in zip(ours(images, top_k=3, batch_size=4), ref(images, top_k=3)):
        assert [d["label"] for d in g] == [d["label"] for d in w]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(g, w)) <= ATOL
    features = pipeline("image-feature-extraction", model=str(folder))  # the classifier's tower alone
    assert np.asarray(features(images[0])).shape == (1, 1 + (IMAGE_SIZE // 8) ** 2, 32)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["CLIPForImageClassification"]


def test_processor_options_that_misfit_the_tower_are_invalid_input(vision_folder, images):
    """A call's image_processor_kwargs that make images of another size than the tower takes are the caller's
    error (InvalidInput naming crop_size), not the checkpoint's; the pipeline keeps answering."""
    ours = pipeline("image-feature-extraction", model=str(vision_folder))
    expected = ours(images[0])
    with pytest.raises(InvalidInput, match="crop_size"):
        ours(images[0], image_processor_kwargs={"crop_size": {"height": IMAGE_SIZE + 8, "width": IMAGE_SIZE + 8},
                                                "size": {"shortest_edge": IMAGE_SIZE + 8}})
    assert ours(images[0]) == expected
