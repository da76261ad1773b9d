"""CLIP model parity with transformers on tiny random checkpoints: text and image features, logits."""

import json

import pytest
import torch
import transformers

from clip_helpers import IMAGE_SIZE, sample_images, tiny_clip_checkpoint
from lightpipe import loading
from lightpipe.errors import CheckpointError, InvalidInput
from lightpipe.models import clip

TEXTS = ["This is a photo of a cat.", "a dog", "What is the capital of France? Paris, the old city at night!",
         "ÜNÏCÖDÉ   spaces\tand CAPITALS 1998"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_clip_checkpoint(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def models(folder):
    ours = loading.load_model(folder, "contrastive")
    ref = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    return ours, ref


@pytest.fixture(scope="module")
def text_inputs(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def pixel_values(folder):
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    return processor(images=sample_images(5), return_tensors="pt")["pixel_values"]


def test_config_parses_both_towers(folder):
    config = loading.load_config(folder)
    assert isinstance(config, clip.CLIPConfig)
    assert config.text_config.hidden_size == 32 and config.text_config.hidden_act == "quick_gelu"
    assert config.vision_config.image_size == IMAGE_SIZE and config.vision_config.patch_size == 8
    assert config.projection_dim == 16
    assert config.text_config.eos_token_id == json.loads((folder / "config.json").read_text())["text_config"]["eos_token_id"]


def test_legacy_sub_config_dicts_win_like_transformers(tmp_path):
    raw = {"model_type": "clip", "projection_dim": 16,
           "text_config": {"hidden_size": 32, "eos_token_id": 2, "num_hidden_layers": 3, "num_attention_heads": 4},
           "text_config_dict": {"hidden_size": 64, "num_attention_heads": 4},
           "vision_config": {"hidden_size": 32, "num_attention_heads": 4}, "vision_config_dict": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = loading.load_config(tmp_path)
    ref = transformers.CLIPConfig.from_pretrained(str(tmp_path))
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "eos_token_id", "intermediate_size"):
            if hasattr(getattr(ref, tower), key):
                assert getattr(getattr(ours, tower), key) == getattr(getattr(ref, tower), key), (tower, key)


def test_text_features(models, text_inputs):
    ours, ref = models
    with torch.inference_mode():
        got = ours.get_text_features(text_inputs["input_ids"], text_inputs["attention_mask"])
        want = ref.get_text_features(**text_inputs).pooler_output
        hidden = ours.text_model(text_inputs["input_ids"], text_inputs["attention_mask"])["last_hidden_state"]
        ref_hidden = ref.text_model(**text_inputs).last_hidden_state
    assert got.shape == (len(TEXTS), 16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    real = text_inputs["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], ref_hidden[real], atol=1e-4, rtol=1e-4)


def test_text_padding_changes_nothing(models, folder):
    ours, _ = models
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # the batch is really padded
    with torch.inference_mode():
        together = ours.get_text_features(batch["input_ids"], batch["attention_mask"])
        for row, text in enumerate(TEXTS):
            alone = tokenizer([text], return_tensors="pt")
            single = ours.get_text_features(alone["input_ids"], alone["attention_mask"])
            torch.testing.assert_close(together[row:row + 1], single, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ours.text_model(batch["input_ids"], batch["attention_mask"])["last_hidden_state"]).all()


def test_left_padding_stays_finite_and_matches(models):
    """Padding before the text leaves padded query rows with no real key before them: the output stays finite
    and the real tokens agree with transformers."""
    ours, ref = models
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 500, (3, 8), generator=gen)
    ids[:, -1] = ref.config.text_config.eos_token_id
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    with torch.inference_mode():
        hidden = ours.text_model(ids, mask)["last_hidden_state"]
        got = ours.get_text_features(ids, mask)
        want = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_image_features(models, pixel_values):
    ours, ref = models
    with torch.inference_mode():
        got = ours.get_image_features(pixel_values)
        want = ref.get_image_features(pixel_values=pixel_values).pooler_output
    assert got.shape == (pixel_values.shape[0], 16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_logits(models, text_inputs, pixel_values):
    ours, ref = models
    with torch.inference_mode():
        got = ours(text_inputs["input_ids"], pixel_values, text_inputs["attention_mask"])
        want = ref(**text_inputs, pixel_values=pixel_values)
    assert got["logits_per_image"].shape == (pixel_values.shape[0], len(TEXTS))
    for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        torch.testing.assert_close(got[key], getattr(want, key), atol=1e-4, rtol=1e-4)
    # The pipeline's path: features once, then similarity, gives the same logits.
    with torch.inference_mode():
        split = ours.similarity(ours.get_image_features(pixel_values),
                                ours.get_text_features(text_inputs["input_ids"], text_inputs["attention_mask"]))
    torch.testing.assert_close(split, want.logits_per_image, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eos_token_id", [2, 100])
def test_pooling_rules(tmp_path, eos_token_id):
    """Configs older than transformers PR #24773 say eos_token_id=2 and pool at the largest id; newer ones at
    the first eos_token_id. The ids are drawn so that the two rules pick different positions."""
    folder = tiny_clip_checkpoint(tmp_path, seed=1, text_overrides={"eos_token_id": eos_token_id})
    ours = loading.load_model(folder, "contrastive")
    ref = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (4, 9), generator=gen)
    ids[:, 3] = ref.config.text_config.vocab_size - 1  # the largest id
    ids[:, 6] = eos_token_id
    ids[0, 1] = eos_token_id  # an earlier second one in the first row
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 8:] = 0
    with torch.inference_mode():
        got = ours.get_text_features(ids, mask)
        want = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        positions = ours.text_model.end_of_text_positions(ids)
    assert positions.tolist() == ([3] * 4 if eos_token_id == 2 else [1, 6, 6, 6])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_too_long_text_and_wrong_image_size(models):
    ours, _ = models
    with pytest.raises(InvalidInput, match="77"):
        ours.get_text_features(torch.zeros(1, 80, dtype=torch.long))
    with pytest.raises(InvalidInput, match="crop_size"):
        ours.get_image_features(torch.zeros(1, 3, 48, 48))


def test_old_checkpoint_buffers_are_dropped(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json",):
        (tmp_path / name).write_text((folder / name).read_text())
    state = load_file(str(folder / "model.safetensors"))
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    model = loading.load_model(tmp_path, "contrastive")
    assert isinstance(model, clip.CLIPModel)
    del state["logit_scale"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="logit_scale"):
        loading.load_model(tmp_path, "contrastive")
