"""DistilBERT parity with transformers on tiny random checkpoints (weights at std 0.2): every head, padded
and unpadded rows, right and left padding, config variants."""

import pytest
import torch

from helpers import TEXTS, assert_text_model_parity, encode_texts, tiny_checkpoint
from lightpipe.loading import load_model

HEADS = ["base", "sequence-classification", "token-classification", "question-answering", "masked-lm"]


@pytest.mark.parametrize("head", HEADS)
def test_parity(checkpoint, head):
    got = assert_text_model_parity(checkpoint("distilbert", head), "distilbert", head)
    if head == "base":
        assert set(got) == {"last_hidden_state"} and got["last_hidden_state"].shape[-1] == 32


@pytest.mark.parametrize("overrides", [{"activation": "relu"}, {"sinusoidal_pos_embds": True},
                                       {"tie_word_embeddings": False}])
def test_config_variants(tmp_path, overrides):
    folder = tiny_checkpoint(tmp_path, "distilbert", "masked-lm", **overrides)
    assert_text_model_parity(folder, "distilbert", "masked-lm")


def test_text_pairs_without_token_types(checkpoint):
    """DistilBERT has no token types: a pair is told apart by [SEP] alone."""
    folder = checkpoint("distilbert", "question-answering")
    assert_text_model_parity(folder, "distilbert", "question-answering",
                             pairs=["Where is it?", "What does John do?", "Who lives in Berlin?", "b"])


def test_left_padding_does_not_move_positions(checkpoint):
    """A left-padded row reads positions 0.. from its first real token (transformers would shift them)."""
    folder = checkpoint("distilbert", "token-classification")
    model = load_model(folder, "token-classification")
    left = encode_texts(folder, "distilbert", TEXTS, padding_side="left")
    with torch.inference_mode():
        logits = model(**left)["logits"]
        for i, text in enumerate(TEXTS):
            alone = model(**encode_texts(folder, "distilbert", [text]))["logits"][0]
            assert (logits[i][left["attention_mask"][i].bool()] - alone).abs().max() <= 1e-5
