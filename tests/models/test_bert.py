"""BERT parity with transformers on tiny random checkpoints (weights at std 0.2): every head, token types,
padded and unpadded rows, right and left padding."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import PAIRS, TEXTS, assert_text_model_parity, encode_texts, randomize, tiny_checkpoint
from lightpipe import UnsupportedModel
from lightpipe.loading import load_model

HEADS = ["base", "sequence-classification", "token-classification", "question-answering", "masked-lm"]


@pytest.mark.parametrize("head", HEADS)
def test_parity(checkpoint, head):
    got = assert_text_model_parity(checkpoint("bert", head), "bert", head)
    if head == "base":
        assert got["last_hidden_state"].shape[:1] == (len(TEXTS),) and got["last_hidden_state"].shape[-1] == 32
        assert got["pooler_output"].shape == (len(TEXTS), 32)


@pytest.mark.parametrize("head", ["base", "sequence-classification", "question-answering"])
def test_text_pairs_use_both_token_types(checkpoint, head):
    folder = checkpoint("bert", head)
    assert_text_model_parity(folder, "bert", head, pairs=PAIRS)
    # The second segment's type matters: all-zero types give another answer.
    batch = encode_texts(folder, "bert", TEXTS, PAIRS)
    assert batch["token_type_ids"].any()
    model = load_model(folder, head)
    with torch.inference_mode():
        typed = model(**batch)
        untyped = model(**{**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])})
    key = next(iter(typed))
    assert (typed[key] - untyped[key]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{"hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
                                       {"hidden_act": "relu", "type_vocab_size": 3},
                                       {"tie_word_embeddings": False}])
def test_config_variants(tmp_path, overrides):
    folder = tiny_checkpoint(tmp_path, "bert", "masked-lm", **overrides)
    assert_text_model_parity(folder, "bert", "masked-lm", pairs=PAIRS)


def test_without_attention_mask_equals_an_all_ones_mask(checkpoint):
    folder = checkpoint("bert", "base")
    model = load_model(folder, "base")
    batch = encode_texts(folder, "bert", TEXTS[1:2])
    with torch.inference_mode():
        masked = model(**batch)
        bare = model(batch["input_ids"])
    for key in masked:
        assert (masked[key] - bare[key]).abs().max() <= 1e-6


def test_pretraining_checkpoint_serves_fill_mask(tmp_path, checkpoint):
    """BertForPreTraining: its MLM head is used, its next-sentence head dropped."""
    base = checkpoint("bert", "base")
    config = transformers.BertConfig.from_pretrained(str(base))
    torch.manual_seed(0)
    ref = randomize(transformers.BertForPreTraining(config))
    folder = tmp_path / "pretraining"
    ref.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(base / name, folder / name)
    ours = load_model(folder, "masked-lm")
    batch = encode_texts(folder, "bert", TEXTS)
    with torch.inference_mode():
        want, got = ref(**batch).prediction_logits, ours(**batch)["logits"]
    real = batch["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4


def test_old_layer_norm_names_gamma_and_beta(tmp_path, checkpoint):
    """Checkpoints from the first BERT ports name LayerNorm parameters gamma / beta."""
    folder = tmp_path / "old"
    shutil.copytree(checkpoint("bert", "token-classification"), folder)
    state = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert_text_model_parity(folder, "bert", "token-classification")


def test_relative_positions_are_unsupported_model(tmp_path, checkpoint):
    folder = tmp_path / "relative"
    shutil.copytree(checkpoint("bert", "base"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(UnsupportedModel, match="position_embedding_type"):
        load_model(folder, "base")
