"""summarization, translation and text2text-generation on tiny random BART and T5 checkpoints. transformers 5 has no
such pipelines: the reference is transformers' generate() on each text alone (with the prefix and the generation
settings transformers 4.x's pipelines took from task_specific_params) and tokenizer.decode without special tokens.
Batch sizes 1 and 4 give the same results; bad input is a typed error and the pipeline keeps working."""

import json

import pytest
import torch
import transformers

import lightpipe
from bart_helpers import tiny_bart
from lightpipe.errors import CheckpointError, InvalidInput
from t5_helpers import tiny_t5

TEXTS = ["Paris is the capital of France, and John Smith works at Google in London.", "Hello world.", "a",
         "The river flows through the old city at night. Mary lives in Berlin, Germany."]
MAX_INPUT = 96  # tokens the tiny T5s take (their tokenizers cut words into a few pieces each)
LONG = "The quick brown fox jumps over the lazy dog. " * 12
# BART-CNN's kind of summarization settings, shortened for a tiny model.
BART_SUMMARY = dict(num_beams=3, no_repeat_ngram_size=3, min_length=5, max_length=14, length_penalty=2.0,
                    early_stopping=True)
T5_TASKS = {"summarization": dict(prefix="summarize: ", num_beams=2, max_length=12, min_length=4,
                                  no_repeat_ngram_size=2, length_penalty=2.0, early_stopping=True),
            "translation_en_to_de": dict(prefix="translate English to German: ", max_length=10, num_beams=2),
            "translation_en_to_fr": dict(prefix="translate English to French: ", max_length=9)}


def with_task_params(folder, task_params):
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "task_specific_params": task_params}))
    return folder


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    folder = tiny_bart(tmp_path_factory.mktemp("bart-sum"), "seq2seq-lm", seed=2, scale_embedding=True)
    return with_task_params(folder, {"summarization": BART_SUMMARY})


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5-tasks"), seed=5, task_specific_params=T5_TASKS,
                   model_max_length=MAX_INPUT)


@pytest.fixture(scope="module")
def plain_t5(tmp_path_factory):
    """A gated-GELU T5 (flan-t5 layout) without task_specific_params."""
    return tiny_t5(tmp_path_factory.mktemp("t5-plain"), feed_forward_proj="gated-gelu", tied=False,
                   model_max_length=MAX_INPUT)


_references = {}


def reference(folder):
    if folder not in _references:
        _references[folder] = (transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval(),
                               transformers.AutoTokenizer.from_pretrained(str(folder)))
    return _references[folder]


def expected(folder, texts, key, prefix="", truncation=False, **options):
    """transformers' generate() on each text alone -> the records the pipeline should return (a list per text)."""
    model, tokenizer = reference(folder)
    out = []
    for text in texts:
        batch = tokenizer([prefix + text], truncation=truncation, return_tensors="pt")
        with torch.inference_mode():
            rows = model.generate(**batch, do_sample=False, **options).tolist()
        out.append([{f"{key}_text": tokenizer.decode(row, skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False)} for row in rows])
    return out


def settings(task_params):
    return {k: v for k, v in task_params.items() if k != "prefix"}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_summarization_on_bart_uses_the_task_settings(bart, batch_size):
    summarize = lightpipe.pipeline("summarization", model=str(bart))
    want = expected(bart, TEXTS, "summary", **BART_SUMMARY)
    assert len({r[0]["summary_text"] for r in want}) > 1  # the texts summarize differently
    assert summarize(TEXTS, batch_size=batch_size) == [r[0] for r in want]
    assert summarize(TEXTS[0]) == want[0]  # one text: a list of one record


def test_summarization_options_of_the_call_win(bart):
    summarize = lightpipe.pipeline("summarization", model=str(bart), num_beams=2)
    want = expected(bart, TEXTS[:2], "summary", **{**BART_SUMMARY, "num_beams": 2, "max_length": 10})
    assert summarize(TEXTS[:2], max_length=10, batch_size=2) == [r[0] for r in want]
    # More than one sequence per text: a list per text.
    want = expected(bart, TEXTS[:2], "summary", **{**BART_SUMMARY, "num_return_sequences": 2})
    got = summarize(TEXTS[:2], num_beams=3, generate_kwargs={"num_return_sequences": 2})
    assert got == want and len(got[0]) == 2


@pytest.mark.parametrize("batch_size", [1, 4])
def test_summarization_on_t5_reads_its_prefix(t5, batch_size):
    summarize = lightpipe.pipeline("summarization", model=str(t5))
    task = T5_TASKS["summarization"]
    want = expected(t5, TEXTS, "summary", prefix=task["prefix"], **settings(task))
    assert summarize(TEXTS, batch_size=batch_size) == [r[0] for r in want]
    without_prefix = expected(t5, TEXTS, "summary", **settings(task))
    assert want != without_prefix  # the prefix reached the model


@pytest.mark.parametrize("batch_size", [1, 4])
def test_translation_by_task_name_and_by_languages(t5, batch_size):
    de, fr = T5_TASKS["translation_en_to_de"], T5_TASKS["translation_en_to_fr"]
    want_de = [r[0] for r in expected(t5, TEXTS, "translation", prefix=de["prefix"], **settings(de))]
    want_fr = [r[0] for r in expected(t5, TEXTS, "translation", prefix=fr["prefix"], **settings(fr))]
    assert want_de != want_fr
    translate = lightpipe.pipeline("translation_en_to_de", model=str(t5))
    assert translate.task == "translation_en_to_de"
    assert translate(TEXTS, batch_size=batch_size) == want_de
    assert translate(TEXTS, src_lang="en", tgt_lang="fr", batch_size=batch_size) == want_fr
    # Plain "translation" takes the checkpoint's first pair, as transformers 4.x did; languages choose another.
    translate = lightpipe.pipeline("translation", model=str(t5))
    assert translate(TEXTS, batch_size=batch_size) == want_de
    assert lightpipe.pipeline("translation", model=str(t5), src_lang="en", tgt_lang="fr")(TEXTS) == want_fr


def test_translation_without_task_params_runs_without_a_prefix(plain_t5):
    translate = lightpipe.pipeline("translation_en_to_xx", model=str(plain_t5))
    want = expected(plain_t5, TEXTS, "translation", max_new_tokens=8)
    assert translate(TEXTS, max_new_tokens=8, batch_size=4) == [r[0] for r in want]
    assert len({r[0]["translation_text"] for r in want}) > 1


@pytest.mark.parametrize("batch_size", [1, 4])
def test_text2text_generation_and_token_ids(plain_t5, batch_size):
    generate = lightpipe.pipeline("text2text-generation", model=str(plain_t5))
    want = expected(plain_t5, TEXTS, "generated", max_new_tokens=8, num_beams=2)
    assert generate(TEXTS, max_new_tokens=8, num_beams=2, batch_size=batch_size) == [r[0] for r in want]
    model, tokenizer = reference(plain_t5)
    ids = generate(TEXTS, max_new_tokens=8, return_tensors=True, batch_size=batch_size)
    for text, got in zip(TEXTS, ids):
        with torch.inference_mode():
            row = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=8).tolist()[0]
        if 1 in row[1:]:
            row = row[:row.index(1, 1) + 1]  # up to the end token
        assert got == {"generated_token_ids": row}


def test_a_model_without_a_task_is_text2text(plain_t5):
    assert lightpipe.pipeline(model=str(plain_t5)).task == "text2text-generation"


def test_truncation(t5):
    summarize = lightpipe.pipeline("summarization", model=str(t5))
    task = T5_TASKS["summarization"]
    with pytest.raises(InvalidInput, match=r"tokens long, \d+ more than this model's encoder takes \(96\)"):
        summarize(LONG)
    want = expected(t5, [LONG], "summary", prefix=task["prefix"], truncation=True, **settings(task))
    assert summarize(LONG, truncation=True) == want[0]
    assert summarize([LONG, TEXTS[0]], truncation=True, batch_size=2)[0] == want[0][0]
    assert summarize(TEXTS[1]) == expected(t5, [TEXTS[1]], "summary", prefix=task["prefix"], **settings(task))[0]


def test_bad_input_is_a_typed_error_and_the_pipeline_keeps_working(t5, bart):
    translate = lightpipe.pipeline("translation_en_to_de", model=str(t5))
    with pytest.raises(InvalidInput, match="empty"):
        translate("  ")
    with pytest.raises(InvalidInput, match="no input"):
        translate([])
    with pytest.raises(InvalidInput, match="must be a string"):
        translate(42)
    with pytest.raises(InvalidInput, match="src_lang and tgt_lang"):
        translate("Hello world.", src_lang="en")
    with pytest.raises(InvalidInput, match="unknown generation option"):
        translate("Hello world.", generate_kwargs={"num_bananas": 2})
    with pytest.raises(InvalidInput, match="num_beams"):
        translate("Hello world.", num_beams=0)
    with pytest.raises(InvalidInput, match="translation_XX_to_YY"):
        lightpipe.pipeline("translation_en_de", model=str(t5))
    with pytest.raises(CheckpointError, match="classification_head"):  # an NLI checkpoint has no LM head
        lightpipe.pipeline("summarization", model=str(tiny_bart_classifier(bart)))
    de = T5_TASKS["translation_en_to_de"]
    assert translate(TEXTS[1]) == expected(t5, [TEXTS[1]], "translation", prefix=de["prefix"], **settings(de))[0]


def tiny_bart_classifier(bart_folder):
    return tiny_bart(bart_folder.parent / "bart-classifier", "sequence-classification")
