"""RoBERTa and XLM-RoBERTa parity with transformers on tiny random checkpoints (weights at std 0.2): every head,
padded and unpadded rows, right and left padding, positions that start after the padding index."""

import pytest
import torch

from helpers import TEXTS, assert_text_model_parity, encode_texts, reference_model, tiny_checkpoint
from lightpipe.loading import load_model

HEADS = ["base", "sequence-classification", "token-classification", "question-answering", "masked-lm"]


@pytest.mark.parametrize("arch", ["roberta", "xlm-roberta"])
@pytest.mark.parametrize("head", HEADS)
def test_parity(checkpoint, arch, head):
    got = assert_text_model_parity(checkpoint(arch, head), arch, head)
    if head == "base":
        assert got["pooler_output"].shape == (len(TEXTS), 32)


def test_text_pairs(checkpoint):
    """Pairs are <s> a </s></s> b </s> with one token type."""
    assert_text_model_parity(checkpoint("roberta", "sequence-classification"), "roberta", "sequence-classification",
                             pairs=["Where is it?", "What does John do?", "Who lives in Berlin?", "b"])


@pytest.mark.parametrize("overrides", [{"hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
                                       {"tie_word_embeddings": False}])
def test_config_variants(tmp_path, overrides):
    folder = tiny_checkpoint(tmp_path, "roberta", "masked-lm", **overrides)
    assert_text_model_parity(folder, "roberta", "masked-lm")


def test_longest_input_uses_the_last_position(checkpoint):
    """Positions start at pad_token_id + 1 = 2: a 130-row table takes 128 tokens, the last at row 129."""
    folder = checkpoint("roberta", "base")
    model = load_model(folder, "base")
    assert model.position_offset == 2
    long_text = " ".join(["the river flows through the old city at night"] * 20)
    ids = encode_texts(folder, "roberta", [long_text])["input_ids"][:, :128]
    assert ids.shape == (1, 128)
    ref = reference_model(folder, "roberta", "base")
    with torch.inference_mode():
        got, want = model(ids)["last_hidden_state"], ref(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() <= 1e-4


def test_classifier_reads_the_first_token_of_each_row_under_left_padding(checkpoint):
    """Left padding puts <s> after the padding; the classification head reads it there, not slot 0."""
    folder = checkpoint("roberta", "sequence-classification")
    model = load_model(folder, "sequence-classification")
    left = encode_texts(folder, "roberta", TEXTS, padding_side="left")
    assert not left["attention_mask"][:, 0].all()  # some rows start with padding
    with torch.inference_mode():
        batched = model(**left)["logits"]
        alone = torch.cat([model(**encode_texts(folder, "roberta", [t]))["logits"] for t in TEXTS])
    assert (batched - alone).abs().max() <= 1e-5
