"""zero-shot-classification with DeBERTa-v2/v3 NLI checkpoints (the MoritzLaurer/DeBERTa-v3-*-mnli-fever-anli
family) against transformers' pipeline, on tiny random checkpoints with a SentencePiece-style Unigram tokenizer:
both label orders of the Hub's NLI heads, token types (v2 layouts), batch sizes 1 and 4, multi_label, a text longer
than the model."""

import pytest
import torch

from deberta_helpers import tiny_deberta
from zero_shot_helpers import SEED_LABELS, SEED_TEXT, TEXTS, assert_same, both

LABEL_ORDERS = {
    "mnli-fever-anli": ["entailment", "neutral", "contradiction"],  # MoritzLaurer's DeBERTa-v3 NLI checkpoints
    "mnli": ["CONTRADICTION", "NEUTRAL", "ENTAILMENT"],  # microsoft/deberta-v2-xlarge-mnli's
}
LAYOUTS = {
    "v3": {},
    "v2-types-absolute-positions": dict(type_vocab_size=2, position_biased_input=True, share_att_key=False),
}


@pytest.fixture(scope="module")
def nli(tmp_path_factory):
    made = {}

    def make(order: str = "mnli-fever-anli", layout: str = "v3"):
        if (order, layout) not in made:
            folder = tmp_path_factory.mktemp(f"deberta-nli-{order}-{layout}")
            made[order, layout] = tiny_deberta(folder, "sequence-classification", labels=LABEL_ORDERS[order],
                                               seed=len(made), **LAYOUTS[layout])
        return made[order, layout]

    return make


@pytest.mark.parametrize("order", LABEL_ORDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_outputs_equal_transformers(nli, order, layout, multi_label, batch_size):
    ours, ref = both(nli(order, layout))
    params = dict(candidate_labels=SEED_LABELS, multi_label=multi_label)
    assert_same(ours(TEXTS, batch_size=batch_size, **params), ref(TEXTS, batch_size=batch_size, **params))


def test_one_text_labels_as_a_string_and_a_template(nli):
    ours, ref = both(nli())
    got = ours(SEED_TEXT, candidate_labels=SEED_LABELS)
    assert isinstance(got, dict) and abs(sum(got["scores"]) - 1.0) <= 1e-5
    assert_same(got, ref(SEED_TEXT, candidate_labels=SEED_LABELS))
    params = dict(candidate_labels="sports, politics ,cooking", hypothesis_template="The topic is {}!")
    assert_same(ours(TEXTS[1], **params), ref(TEXTS[1], **params))


def test_the_hypothesis_gets_its_own_token_type(nli):
    """A v2 layout with token types reads premise and hypothesis as types 0 and 1: dropping the types would
    change the scores (the parity above then rests on them)."""
    folder = nli(layout="v2-types-absolute-positions")
    ours, ref = both(folder)
    features = ours.preprocess(SEED_TEXT, candidate_labels=["urgent"])[0].features
    types = features["token_type_ids"].tolist()
    assert 0 in types and 1 in types
    assert types == ref.tokenizer(SEED_TEXT, "This example is urgent.")["token_type_ids"]
    batch = {key: value[None] for key, value in features.items()}
    with torch.inference_mode():
        typed = ours.model(**batch)["logits"]
        untyped = ours.model(**{**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])})["logits"]
    assert (typed - untyped).abs().max() > 1e-3


def test_a_text_longer_than_the_model_is_truncated_as_transformers_does(nli):
    long_text = "Paris is the capital of France, and John Smith works at Google in London. " * 4
    ours, ref = both(nli())
    assert len(ref.tokenizer(long_text)["input_ids"]) > ref.tokenizer.model_max_length
    for params in (dict(candidate_labels=SEED_LABELS), dict(candidate_labels=SEED_LABELS, multi_label=True)):
        assert_same(ours([long_text, SEED_TEXT], batch_size=4, **params), ref([long_text, SEED_TEXT], **params))
