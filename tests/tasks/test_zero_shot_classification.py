"""zero-shot-classification against transformers' pipeline on tiny random NLI checkpoints (BART-MNLI shape and the
BERT family with id2label contradiction/neutral/entailment, weights at std 0.2): one and many texts, labels as a list
or a comma-separated string, templates, multi_label, batch sizes 1 and 4, a text longer than the model; bad input."""

import pytest
import transformers

import lightpipe
from zero_shot_helpers import SEED_LABELS, SEED_TEXT, TEXTS, assert_same, both
from bart_helpers import NLI_LABELS, tiny_bart
from lightpipe.errors import InvalidInput, UnsupportedModel
from lightpipe.tasks import get_task

ARCHS = ("bart", "bert", "roberta", "distilbert", "xlm-roberta")


@pytest.fixture(scope="module")
def bart_mnli(tmp_path_factory):
    return tiny_bart(tmp_path_factory.mktemp("bart-mnli"))


@pytest.fixture(scope="module")
def nli(bart_mnli, checkpoint):
    """nli(arch) -> folder of a tiny NLI checkpoint of that architecture."""
    def make(arch: str):
        return bart_mnli if arch == "bart" else checkpoint(arch, "sequence-classification", labels=NLI_LABELS)
    return make


def test_the_seed_call_on_a_tiny_bart_mnli(bart_mnli):
    ours, ref = both(bart_mnli)
    got = ours(SEED_TEXT, candidate_labels=SEED_LABELS)
    assert isinstance(got, dict) and got["sequence"] == SEED_TEXT
    assert sorted(got["labels"]) == sorted(SEED_LABELS) and len(got["scores"]) == 5
    assert abs(sum(got["scores"]) - 1.0) <= 1e-5  # single-label: the labels compete
    assert_same(got, ref(SEED_TEXT, candidate_labels=SEED_LABELS))


CALLS = [
    # (texts, parameters) - each run by both libraries
    (SEED_TEXT, dict(candidate_labels=SEED_LABELS)),
    (TEXTS, dict(candidate_labels="urgent, phone,tablet , computer", batch_size=4)),
    (TEXTS, dict(candidate_labels=SEED_LABELS, multi_label=True, batch_size=1)),
    (TEXTS[:3], dict(candidate_labels=["sports", "politics", "cooking"], hypothesis_template="The topic is {}!",
                     multi_label=False, batch_size=4)),
    (TEXTS, dict(candidate_labels=["phone"], batch_size=4)),  # one label: scored alone, as with multi_label
    (TEXTS[1], dict(candidate_labels="phone", hypothesis_template="{}")),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_equal_transformers(nli, arch):
    ours, ref = both(nli(arch))
    for texts, params in CALLS:
        assert_same(ours(texts, **params), ref(texts, **params))


def test_positional_labels_and_pipeline_defaults(bart_mnli):
    ours, ref = both(bart_mnli)
    assert_same(ours(TEXTS[1], SEED_LABELS), ref(TEXTS[1], SEED_LABELS))
    preset = lightpipe.pipeline("zero-shot-classification", model=str(bart_mnli), candidate_labels=SEED_LABELS,
                                multi_label=True)
    assert_same(preset(TEXTS[1]), ref(TEXTS[1], candidate_labels=SEED_LABELS, multi_label=True))
    # A call's own labels win over the pipeline's for that call only.
    assert_same(preset(TEXTS[1], candidate_labels=["a", "b"]),
                ref(TEXTS[1], candidate_labels=["a", "b"], multi_label=True))
    assert preset(TEXTS[1])["labels"] != ["a", "b"]


def test_a_text_longer_than_the_model_is_truncated_as_transformers_does(bart_mnli):
    """transformers cuts the premise (only_first) to the tokenizer's model_max_length; the hypothesis stays whole."""
    long_text = "Paris is the capital of France, and John Smith works at Google in London. " * 8
    ours, ref = both(bart_mnli)
    for params in (dict(candidate_labels=SEED_LABELS), dict(candidate_labels=SEED_LABELS, multi_label=True)):
        assert_same(ours([long_text, SEED_TEXT], batch_size=4, **params), ref([long_text, SEED_TEXT], **params))
    with pytest.raises(InvalidInput, match="truncation=True"):
        ours(long_text, candidate_labels=SEED_LABELS, truncation=False)
    assert_same(ours(SEED_TEXT, candidate_labels=SEED_LABELS), ref(SEED_TEXT, candidate_labels=SEED_LABELS))


def test_batch_sizes_give_the_same_results(nli):
    ours = lightpipe.pipeline("zero-shot-classification", model=str(nli("roberta")))
    alone = [ours(text, candidate_labels=SEED_LABELS) for text in TEXTS]
    for batch_size in (1, 3, 8):
        assert_same(ours(TEXTS, candidate_labels=SEED_LABELS, batch_size=batch_size), alone)


def test_batch_size_counts_texts(bart_mnli):
    """At batch_size=1 the model sees batches of five pairs (one text's worth; transformers runs five passes of one
    pair), at batch_size=2 of ten."""
    ours = lightpipe.pipeline("zero-shot-classification", model=str(bart_mnli))
    rows = []
    forward = ours.model.forward

    def counting(input_ids, attention_mask=None):
        rows.append(input_ids.shape[0])
        return forward(input_ids, attention_mask)

    ours.model.forward = counting
    ours(TEXTS, candidate_labels=SEED_LABELS, batch_size=1)
    assert rows == [5, 5, 5, 5]
    rows.clear()
    ours(TEXTS, candidate_labels=SEED_LABELS, batch_size=2)
    assert rows == [10, 10]


def test_a_stream_of_texts(bart_mnli):
    ours, ref = both(bart_mnli)
    got = list(ours((t for t in TEXTS), candidate_labels=SEED_LABELS, batch_size=2))
    assert_same(got, ref(TEXTS, candidate_labels=SEED_LABELS))


def test_entailment_label_found_in_any_case_and_position(tmp_path):
    """An entailment label first makes the last label the contradiction one (transformers' rule)."""
    folder = tiny_bart(tmp_path, labels=["ENTAILMENT", "Neutral", "Contradiction"], seed=3)
    ours, ref = both(folder)
    assert ours.entailment_id == 0
    for params in (dict(multi_label=True), dict(multi_label=False)):
        assert_same(ours(TEXTS, candidate_labels=SEED_LABELS, **params),
                    ref(TEXTS, candidate_labels=SEED_LABELS, **params))


def test_a_checkpoint_without_an_entailment_label_is_refused(checkpoint):
    folder = checkpoint("bert", "sequence-classification")  # LABEL_0, LABEL_1, LABEL_2
    with pytest.raises(UnsupportedModel, match="entailment"):
        lightpipe.pipeline("zero-shot-classification", model=str(folder))


@pytest.mark.parametrize("call, match", [
    (lambda pipe: pipe(SEED_TEXT), "candidate_labels are needed"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=[]), "candidate_labels is empty"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=" , "), "candidate_labels is empty"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a", 3]), "must be a string"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a"], hypothesis_template="No place."), "no place for the label"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a"], hypothesis_template="Bad {label}."), "cannot be filled"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a"], hypothesis_template=None), "must be a string"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a"], multi_label="yes"), "multi_label"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a"], truncation="sometimes"), "truncation"),
    (lambda pipe: pipe("", candidate_labels=["a"]), "empty"),
    (lambda pipe: pipe(["ok", None], candidate_labels=["a"]), "must be a string"),
    (lambda pipe: pipe([], candidate_labels=["a"]), "no text"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["a"], top_k=2), "unknown parameter"),
    (lambda pipe: pipe(SEED_TEXT, candidate_labels=["word " * 80]), "leaves no room"),
])
def test_bad_input_is_a_typed_error_and_the_pipeline_keeps_working(bart_mnli, call, match):
    ours, ref = both(bart_mnli)
    with pytest.raises(InvalidInput, match=match):
        call(ours)
    assert_same(ours(SEED_TEXT, candidate_labels=SEED_LABELS), ref(SEED_TEXT, candidate_labels=SEED_LABELS))


def test_task_default_model_is_transformers_default():
    from transformers.pipelines import SUPPORTED_TASKS

    spec = get_task("zero-shot-classification")
    model, revision = SUPPORTED_TASKS["zero-shot-classification"]["default"]["model"]
    assert (spec.default_model, spec.default_revision, spec.fallback_model) == (model, revision, None)
    assert spec.heads == ("sequence-classification",)


def test_text_classification_serves_bart_mnli_pairs(bart_mnli):
    """The same checkpoint classifies text pairs in text-classification, as in transformers."""
    ours = lightpipe.pipeline("text-classification", model=str(bart_mnli))
    ref = transformers.pipeline("text-classification", model=str(bart_mnli))
    pair = {"text": TEXTS[1], "text_pair": "This example is urgent."}
    got, want = ours(pair, top_k=None), ref(pair, top_k=None)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want)) <= 1e-4
