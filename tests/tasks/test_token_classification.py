"""token-classification: parity with transformers' pipeline on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers

import lightpipe
from lightpipe.errors import InvalidInput
from lightpipe.tasks.token_classification import AggregationStrategy

pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
# Seeds whose random models predict a mix of B-, I- and O labels on these sentences, so grouping is exercised.
SEEDS = {"bert": 1, "roberta": 2, "distilbert": 2, "xlm-roberta": 2}
ARCHS = tuple(SEEDS)
STRATEGIES = ("none", "simple", "first", "average", "max")
SENTENCES = [
    "John Smith lives in Paris, France.",
    "Mary works at Google's HQ in London; she loves the old city at night!",
    "Zürich, naïve café — résumé of the Ångström day?",
    "apple founded microsoft in 1999 (or so), said the president.",
    "Berlin",
    "東京 and  New York",
]
LONG = ("John Smith lives in Paris, France. Mary works at Google in London and loves the old city at night, "
        "the naïve café of Zürich.")

_PIPES: dict = {}


def pipes(folder):
    """(lightpipe pipeline, transformers pipeline) for a checkpoint folder, built once."""
    key = str(folder)
    if key not in _PIPES:
        _PIPES[key] = (lightpipe.pipeline("token-classification", model=key),
                       transformers.pipeline("token-classification", model=key))
    return _PIPES[key]


def ner_folder(checkpoint, arch, **overrides):
    return checkpoint(arch, "token-classification", labels=LABELS, seed=SEEDS[arch], **overrides)


@pytest.fixture(scope="module")
def short_folder(checkpoint, tmp_path_factory):
    """A copy of a checkpoint whose tokenizer allows only 16 tokens, so texts overflow into windows."""
    made = {}

    def make(arch):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-short") / "model"
            shutil.copytree(ner_folder(checkpoint, arch), folder)
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config["model_max_length"] = 16
            config_path.write_text(json.dumps(config))
            made[arch] = folder
        return made[arch]

    return make


def assert_same(ours, ref, where="result"):
    """Same structure, labels, words and offsets; scores within 1e-4."""
    if isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref), f"{where}: {ours!r} != {ref!r}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
        return
    assert list(ours) == list(ref), f"{where}: keys {list(ours)} != {list(ref)}"
    for key, value in ref.items():
        if key == "score":
            assert type(ours[key]) is float
            assert abs(ours[key] - float(value)) < 1e-4, f"{where}: {ours} != {ref}"
        else:
            assert ours[key] == value, f"{where}.{key}: {ours} != {ref}"


# ---------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parity_with_transformers(checkpoint, arch, strategy):
    ours, ref = pipes(ner_folder(checkpoint, arch))
    for params in ({}, {"ignore_labels": []}):
        expected = ref(SENTENCES, aggregation_strategy=strategy, **params)
        assert_same(ours(SENTENCES, aggregation_strategy=strategy, **params), expected)
        assert_same(ours(SENTENCES[1], aggregation_strategy=strategy, **params), expected[1])
    if strategy != "none":  # the chosen seeds must exercise grouping: some groups join several tokens
        everything = ours(SENTENCES, aggregation_strategy=strategy, ignore_labels=[])
        tokens = ours(SENTENCES, ignore_labels=[])
        assert sum(map(len, everything)) < sum(map(len, tokens))


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_unbatched(checkpoint, arch):
    ours, ref = pipes(ner_folder(checkpoint, arch))
    for strategy in ("none", "simple", "average"):
        one_by_one = [ours(s, aggregation_strategy=strategy, ignore_labels=[]) for s in SENTENCES]
        batched = ours(SENTENCES, batch_size=4, aggregation_strategy=strategy, ignore_labels=[])
        assert_same(batched, one_by_one)
        assert_same(batched, ref(SENTENCES, aggregation_strategy=strategy, ignore_labels=[]))


def test_labels_without_bio_prefix(checkpoint):
    folder = checkpoint("bert", "token-classification", labels=["O", "PER", "LOC", "MISC"], seed=1)
    ours, ref = pipes(folder)
    for strategy in ("simple", "first", "max"):
        assert_same(ours(SENTENCES, aggregation_strategy=strategy, ignore_labels=[]),
                    ref(SENTENCES, aggregation_strategy=strategy, ignore_labels=[]))


@pytest.mark.parametrize("arch", ("bert", "roberta"))
def test_long_text_truncation_and_stride_windows(short_folder, arch):
    ours, ref = pipes(short_folder(arch))
    cases = ({}, {"stride": 4}, {"stride": 4, "aggregation_strategy": "simple"},
             {"stride": 0, "aggregation_strategy": "max"},
             {"stride": 6, "aggregation_strategy": "average", "ignore_labels": []},
             {"stride": 3, "aggregation_strategy": "first"})
    for params in cases:
        expected = ref(LONG, **params)
        assert_same(ours(LONG, **params), expected)
        assert_same(ours([LONG, "Berlin", LONG], batch_size=4, **params), [expected, ref("Berlin", **params), expected])
    # windows cover the whole text, the truncated run only its first 16 tokens
    windowed = ours(LONG, stride=4, aggregation_strategy="simple", ignore_labels=[])
    assert windowed[-1]["end"] == len(LONG)
    assert ours(LONG, ignore_labels=[])[-1]["end"] < len(LONG) - 40


@pytest.mark.parametrize("arch", ("bert", "roberta"))
def test_is_split_into_words(checkpoint, arch):
    ours, ref = pipes(ner_folder(checkpoint, arch))
    words = ["John", "Smith", "lives", "in", "Zürich,", "café"]
    for params in ({}, {"aggregation_strategy": "first"}, {"aggregation_strategy": "simple", "delimiter": "_"}):
        params = {"is_split_into_words": True, **params}
        assert_same(ours(words, **params), ref(words, **params))  # one list of words -> a list of one result
        assert_same(ours([words, words[:2]], **params), ref([words, words[:2]], **params))


def test_offset_mapping(checkpoint):
    ours, ref = pipes(ner_folder(checkpoint, "bert"))
    text = "John Smith lives in Paris"
    offsets = [(s, e + 1 if e else 0) for s, e in ref.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]
    for strategy in ("none", "simple"):
        expected = ref(text, offset_mapping=offsets, aggregation_strategy=strategy, ignore_labels=[])
        assert_same(ours(text, offset_mapping=offsets, aggregation_strategy=strategy, ignore_labels=[]), expected)
    assert_same(ours([text, "Berlin"], offset_mapping=[offsets, [(0, 0), (0, 6), (0, 0)]], ignore_labels=[])[0],
                ref(text, offset_mapping=offsets, ignore_labels=[]))


# ---------------------------------------------------------------------------------------- API

def test_strategy_spellings_defaults_alias_and_plain_results(checkpoint):
    folder = ner_folder(checkpoint, "bert")
    ours, ref = pipes(folder)
    expected = ref(SENTENCES[0], aggregation_strategy="simple", ignore_labels=[])
    from transformers.pipelines.token_classification import AggregationStrategy as TheirStrategy
    for spelling in ("SIMPLE", "Simple", AggregationStrategy.SIMPLE, TheirStrategy.SIMPLE):
        assert_same(ours(SENTENCES[0], aggregation_strategy=spelling, ignore_labels=[]), expected)
    preset = lightpipe.pipeline("ner", model=str(folder), aggregation_strategy="simple", ignore_labels=[])
    assert_same(preset(SENTENCES[0]), expected)
    assert_same(preset(SENTENCES[0], aggregation_strategy="none"), ref(SENTENCES[0], ignore_labels=[]))
    result = ours(SENTENCES, aggregation_strategy="average")
    assert json.loads(json.dumps(result)) == result
    token = ours(SENTENCES[0], ignore_labels=[])[0]
    types = [type(token[k]) for k in ("entity", "score", "index", "word", "start", "end")]
    assert types == [str, float, int, str, int, int]


def test_stream_gives_the_list_results(checkpoint):
    ours, _ = pipes(ner_folder(checkpoint, "roberta"))
    expected = ours(SENTENCES, aggregation_strategy="simple")
    assert_same(list(ours(iter(SENTENCES), batch_size=4, aggregation_strategy="simple")), expected)


@pytest.mark.parametrize("inputs, params", [
    (None, {}),
    (42, {}),
    (["fine", None], {}),
    ("text", {"aggregation_strategy": "bogus"}),
    ("text", {"aggregation_strategy": 3}),
    ("text", {"ignore_labels": 5}),
    ("text", {"stride": -1}),
    ("text", {"stride": "4"}),
    ("text", {"stride": 10_000, "aggregation_strategy": "simple"}),
    ("text", {"stride": 4, "aggregation_strategy": "none"}),
    ("text", {"is_split_into_words": True}),
    ([[]], {"is_split_into_words": True}),
    ("text", {"is_split_into_words": "yes"}),
    ("text", {"offset_mapping": [(0, 4)]}),
    ("text", {"offset_mapping": "nope"}),
    ("text", {"offset_mapping": [(0, 0), (0, 4), (0, 0)], "stride": 2, "aggregation_strategy": "simple"}),
    ("text", {"no_such_parameter": 1}),
])
def test_bad_input_is_a_typed_error_and_the_pipeline_still_works(checkpoint, inputs, params):
    ours, ref = pipes(ner_folder(checkpoint, "bert"))
    with pytest.raises(InvalidInput):
        ours(inputs, **params)
    assert_same(ours(SENTENCES[0], ignore_labels=[]), ref(SENTENCES[0], ignore_labels=[]))


def test_bad_construction_parameters(checkpoint):
    folder = str(ner_folder(checkpoint, "bert"))
    with pytest.raises(InvalidInput):
        lightpipe.pipeline("ner", model=folder, aggregation_strategy="biggest")
    with pytest.raises(InvalidInput):
        lightpipe.pipeline("ner", model=folder, stride=2, aggregation_strategy="none")
