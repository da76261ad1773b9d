"""image-feature-extraction parity with transformers on tiny random checkpoints."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lightpipe import InvalidInput, pipeline
from vision_helpers import sample_files, tiny_vision_checkpoint

ARCHS = ("vit", "deit", "convnext", "beit", "swin")


def assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return [str(p) for p in sample_files(tmp_path_factory.mktemp("images"))]


@pytest.fixture(scope="module", params=ARCHS)
def pipes(request, tmp_path_factory):
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp(request.param), request.param, "base")
    return (pipeline("image-feature-extraction", model=str(folder)),
            transformers.pipeline("image-feature-extraction", model=str(folder)))


@pytest.mark.parametrize("pool", [False, True])
def test_parity(pipes, files, pool):
    ours, ref = pipes
    got, expected = ours(files, pool=pool), ref(files, pool=pool)
    assert isinstance(got, list) and isinstance(got[0], list)
    for o, r in zip(got, expected):
        assert_close(o, r)
    assert_close(ours(files[0], pool=pool), ref(files[0], pool=pool))


def test_return_tensors_and_forms(pipes, files):
    ours, ref = pipes
    tensor = ours(files[0], return_tensors=True)
    expected = ref(files[0], return_tensors=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == expected.shape
    assert (tensor - expected).abs().max() <= 1e-4
    image = Image.open(files[1])
    for form in (image, open(files[1], "rb").read(), np.array(image.convert("RGB"))):
        assert_close(ours(form), ref(image))


def test_batched_equals_unbatched(pipes, files):
    ours, _ = pipes
    one, many = ours(files), ours(files, batch_size=4)
    for o, m in zip(one, many):
        assert_close(m, o, tol=1e-5)


def test_image_processor_kwargs(pipes, files):
    ours, ref = pipes
    options = {"do_normalize": False}
    assert_close(ours(files[0], image_processor_kwargs=options), ref(files[0], image_processor_kwargs=options))
    with pytest.raises(InvalidInput, match="unknown image processor option"):
        ours(files[0], image_processor_kwargs={"flip": True})


def test_task_inferred_from_checkpoint(tmp_path, files):
    folder = tiny_vision_checkpoint(tmp_path, "vit", "base")
    assert pipeline(model=str(folder)).task == "image-feature-extraction"


def test_pool_without_pooler_is_invalid_input(tmp_path, files):
    """A ViT classifier's checkpoint has no pooler weights: pool=True cannot be answered (transformers
    answers with a randomly initialised pooler)."""
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification")
    ours = pipeline("image-feature-extraction", model=str(folder))
    with pytest.raises(InvalidInput, match="pooler"):
        ours(files[0], pool=True)
    ref = transformers.pipeline("image-feature-extraction", model=str(folder))
    assert_close(ours(files[0]), ref(files[0]))


def test_bad_input_then_still_answers(pipes, files, tmp_path):
    ours, ref = pipes
    (tmp_path / "empty.png").write_bytes(b"")
    for bad in (str(tmp_path / "empty.png"), b"\x89PNG\r\n\x1a\nbroken", "not a path"):
        with pytest.raises(InvalidInput):
            ours(bad)
    assert_close(ours(files[0]), ref(files[0]))
