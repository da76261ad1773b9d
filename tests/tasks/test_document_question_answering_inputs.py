"""document-question-answering against transformers on the inputs and checkpoints beyond the basic parity tests.

Call forms transformers accepts (dicts with more keys, word_boxes items with more than a word and a box),
checkpoint layouts (no tokenizer.json; no special tokens in the configs; cased / accent-keeping WordPiece),
LayoutLM configs (activations, coordinate tables, one token type), awkward words, window edges, documents
without words, OCR image modes, flags and languages, and batches of odd documents. Where transformers itself
crashes, lightpipe answers or raises InvalidInput / UnsupportedModel; each such case says which.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from layoutlm_helpers import DOCUMENT, SIZES, assert_same, layoutlm_checkpoint, render_page, word_boxes
from lightpipe import InvalidInput, UnsupportedModel, pipeline

QUESTION = "What is the invoice number?"
SHORT = word_boxes(DOCUMENT[:20])
LONG = word_boxes()
WINDOWS = {"max_seq_len": 48, "doc_stride": 8}
# Words a tokenizer reads as nothing, as many pieces, as its special tokens, or with accents and wide forms.
AWKWARD = [(" ", [1, 1, 2, 2]), ("\u200b", [1, 1, 2, 2]), ("", [0, 0, 0, 0]), ("\x00", [3, 3, 4, 4]),
           ("Zürich", [1, 1, 20, 20]), ("CAFÉ", [30, 1, 50, 20]), ("naïve", [60, 1, 80, 20]), ("東京", [90, 1, 99, 9]),
           ("Ｆｕｌｌ", [5, 5, 9, 9]), ("[SEP]", [1, 1, 2, 2]), ("</s>", [1, 1, 2, 2]), ("[CLS]", [3, 3, 4, 4]),
           ("new york city", [1, 1, 2, 2]), ("x" * 150, [1, 1, 2, 2]),
           ("qzxqzxqzx-123-456-789", [7, 7, 9, 9])] + SHORT


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return {vocab: layoutlm_checkpoint(tmp_path_factory.mktemp(f"docqa-{vocab}"), vocab) for vocab in ("bert", "bpe")}


_REFERENCES: dict = {}


def reference(folder):
    transformers.logging.set_verbosity_error()
    if str(folder) not in _REFERENCES:
        _REFERENCES[str(folder)] = transformers.pipeline("document-question-answering", model=str(folder))
    return _REFERENCES[str(folder)]


def ours(folder):
    return pipeline("document-question-answering", model=str(folder))


def copy_checkpoint(source, target, keep, tokenizer_config=None, special_tokens_map=None):
    """The model of `source` with only the tokenizer files in `keep`, and configs written anew when given."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", *keep):
        shutil.copy(source / name, target / name)
    if tokenizer_config is not None:
        (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if special_tokens_map is not None:
        (target / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return target


BPE_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>",
                "mask_token": {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False,
                               "normalized": False}}
# impira/layoutlm-document-qa's layout: vocab.json + merges.txt, a RobertaTokenizer with add_prefix_space.
IMPIRA_CONFIG = {"add_prefix_space": True, "errors": "replace", "model_max_length": 512,
                 "tokenizer_class": "RobertaTokenizer", "trim_offsets": True, **BPE_SPECIALS}
SPECIAL_NAMES = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token")


def without_specials(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return {k: v for k, v in config.items() if k not in SPECIAL_NAMES}


LAYOUTS = {
    "bpe-vocab-merges-impira": lambda b, t: copy_checkpoint(b["bpe"], t, ["vocab.json", "merges.txt"], IMPIRA_CONFIG,
                                                            BPE_SPECIALS),
    "bpe-vocab-merges-no-prefix-space": lambda b, t: copy_checkpoint(
        b["bpe"], t, ["vocab.json", "merges.txt"], {**IMPIRA_CONFIG, "add_prefix_space": False}, BPE_SPECIALS),
    # tokenizer.json with a tokenizer_config.json naming no special token: transformers uses its class defaults.
    "bpe-no-special-tokens": lambda b, t: copy_checkpoint(b["bpe"], t, ["tokenizer.json"], without_specials(b["bpe"])),
    "bert-no-special-tokens": lambda b, t: copy_checkpoint(b["bert"], t, ["tokenizer.json"],
                                                           without_specials(b["bert"])),
    "bert-tokenizer-json-only": lambda b, t: copy_checkpoint(b["bert"], t, ["tokenizer.json"]),
    "bert-vocab-txt-only": lambda b, t: copy_checkpoint(b["bert"], t, ["vocab.txt"]),
    "bert-vocab-txt-cased": lambda b, t: copy_checkpoint(b["bert"], t, ["vocab.txt"],
                                                         {"do_lower_case": False, "model_max_length": 512}),
    "bert-vocab-txt-keep-accents": lambda b, t: copy_checkpoint(
        b["bert"], t, ["vocab.txt"], {"do_lower_case": True, "strip_accents": False, "tokenize_chinese_chars": False,
                                      "model_max_length": 512}),
}


def assert_parity(folder, calls):
    """Every (args, kwargs) call gives transformers' answers."""
    pipe, ref = ours(folder), reference(folder)
    for args, kwargs in calls:
        assert_same(pipe(*args, **kwargs), ref(*args, **kwargs))


# ---------------------------------------------------------------------------------------- call forms
def test_dict_inputs_with_more_keys_equal_transformers(base):
    # Rows of a data set carry more than the three keys; transformers reads its keys and ignores the rest.
    pipe, ref = ours(base["bert"]), reference(base["bert"])
    row = {"image": None, "question": QUESTION, "word_boxes": LONG, "id": 7, "answers": ["us-001"]}
    expected = ref(row, top_k=2, **WINDOWS)
    assert_same(pipe(row, top_k=2, **WINDOWS), expected)
    assert_same(pipe([row, {**row, "question": "who?"}], top_k=2, **WINDOWS),
                ref([row, {**row, "question": "who?"}], top_k=2, **WINDOWS))
    assert_same(list(pipe((r for r in [row]), top_k=2, **WINDOWS)), [expected])
    with pytest.raises(InvalidInput, match=r"\['wordboxes'\] are not read"):
        pipe({"question": QUESTION, "wordboxes": SHORT})


@pytest.mark.parametrize("vocab", ["bert", "bpe"])
def test_word_box_items_beyond_the_pair_are_ignored_as_in_transformers(base, vocab):
    # transformers reads item[0] and item[1]: (word, box, confidence) triples from an OCR engine work.
    triples = [(word, box, 0.9) for word, box in SHORT]
    assert_parity(base[vocab], [((), dict(image=None, question=QUESTION, word_boxes=triples, top_k=3))])
    # Other containers transformers iterates: a numpy array of (word, box) rows, tuples, an iterator.
    import numpy as np

    rows = np.empty((len(SHORT), 2), dtype=object)
    rows[:, 0], rows[:, 1] = [w for w, _ in SHORT], [tuple(b) for _, b in SHORT]
    expected = reference(base[vocab])(image=None, question=QUESTION, word_boxes=SHORT, top_k=3)
    for container in (rows, tuple(map(tuple, SHORT)), iter(SHORT)):
        assert_same(ours(base[vocab])(image=None, question=QUESTION, word_boxes=container, top_k=3), expected)


def test_question_and_word_boxes_without_image(base):
    # transformers needs the image argument (TypeError without it); the words need no image.
    pipe = ours(base["bert"])
    expected = reference(base["bert"])(image=None, question=QUESTION, word_boxes=SHORT, top_k=2)
    assert_same(pipe(question=QUESTION, word_boxes=SHORT, top_k=2), expected)
    with pytest.raises(InvalidInput, match="give an image"):
        pipe(question=QUESTION)


# ---------------------------------------------------------------------------------------- checkpoint layouts
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tokenizer_layouts_equal_transformers(base, tmp_path, layout):
    folder = LAYOUTS[layout](base, tmp_path / layout)
    assert_parity(folder, [
        ((), dict(image=None, question="Où est Zürich CAFÉ?", word_boxes=AWKWARD[4:9] + SHORT, top_k=4,
                  max_seq_len=128)),
        ((), dict(image=None, question=QUESTION, word_boxes=LONG, top_k=3, handle_impossible_answer=True,
                  padding="max_length", **WINDOWS)),
    ])


def test_pytorch_model_bin_with_position_ids_equals_transformers(base, tmp_path):
    # Older checkpoints (impira/layoutlm-document-qa among them) ship pytorch_model.bin with the position_ids buffer.
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(base["bpe"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["layoutlm.embeddings.position_ids"] = torch.arange(SIZES["max_position_embeddings"])[None]
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert_parity(folder, [((), dict(image=None, question=QUESTION, word_boxes=LONG, top_k=3, **WINDOWS))])


# ---------------------------------------------------------------------------------------- model configs
def config_checkpoint(folder, vocab, **overrides):
    """A tiny LayoutLMForQuestionAnswering with config `overrides`, and the `vocab` tokenizer."""
    return layoutlm_checkpoint(folder, vocab, **overrides)


CONFIGS = {
    "relu-2048-grid": ("bert", dict(hidden_act="relu", max_2d_position_embeddings=2048)),
    "gelu_new-one-token-type": ("bpe", dict(hidden_act="gelu_new", type_vocab_size=1, layer_norm_eps=1e-5)),
    "silu-1001-grid": ("bert", dict(hidden_act="silu", max_2d_position_embeddings=1001, type_vocab_size=3)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layoutlm_configs_equal_transformers(tmp_path, name):
    vocab, overrides = CONFIGS[name]
    folder = config_checkpoint(tmp_path / name, vocab, **overrides)
    grid = overrides.get("max_2d_position_embeddings", 1024)
    off_grid = [("far", [0, 0, grid - 1, 10])]  # boxes beyond 1000 are fine while the tables hold them
    assert_parity(folder, [
        ((), dict(image=None, question=QUESTION, word_boxes=off_grid + SHORT, top_k=3)),
        ((), dict(image=None, question=QUESTION, word_boxes=LONG, top_k=3, handle_impossible_answer=True, **WINDOWS)),
    ])
    with pytest.raises(InvalidInput, match=f"0..{grid - 1}"):
        ours(folder)(image=None, question=QUESTION, word_boxes=[("far", [0, 0, grid, 10])])


def test_bert_vocabulary_with_one_token_type_is_unsupported_model(tmp_path):
    # A WordPiece pair gives the document token type 1: transformers fails on every call with an IndexError.
    folder = config_checkpoint(tmp_path / "one-type", "bert", type_vocab_size=1)
    with pytest.raises(UnsupportedModel, match="type_vocab_size=1"):
        ours(folder)


# ---------------------------------------------------------------------------------------- words and windows
@pytest.mark.parametrize("vocab", ["bert", "bpe"])
def test_awkward_words_and_window_edges_equal_transformers(base, vocab):
    # max_seq_len=128: transformers' default window is the tokenizer's 512, beyond the tiny model's positions.
    tokenizer = reference(base[vocab]).tokenizer
    question = tokenizer(["what"], is_split_into_words=True, add_special_tokens=False)["input_ids"]
    room = 20 - tokenizer.num_special_tokens_to_add(pair=True) - len(question)  # words a 20-token window holds
    nothing = [(" ", [1, 1, 2, 2]), ("\u200b", [1, 1, 2, 2])]
    assert_parity(base[vocab], [
        ((), dict(image=None, question=QUESTION, word_boxes=AWKWARD, top_k=5, max_seq_len=128)),
        ((), dict(image=None, question=QUESTION, word_boxes=AWKWARD, top_k=4, max_seq_len=40, doc_stride=6)),
        ((), dict(image=None, question=QUESTION, word_boxes=nothing, top_k=3, handle_impossible_answer=True)),
        ((), dict(image=None, question="\x00 what\tis \n it", word_boxes=SHORT, top_k=2, max_seq_len=128)),
        ((), dict(image=None, question="what", word_boxes=LONG, top_k=2, max_seq_len=20, doc_stride=room - 1)),
        ((), dict(image=None, question=QUESTION, word_boxes=LONG, top_k=20, max_answer_len=1,
                  handle_impossible_answer=True, max_seq_len=40, doc_stride=12)),
        ((), dict(image=None, question=QUESTION, word_boxes=SHORT[:3], top_k=500, max_seq_len=40, doc_stride=12)),
    ])
    # transformers panics in the tokenizer from here on: a stride as large as a window's room for words.
    with pytest.raises(InvalidInput, match="doc_stride"):
        ours(base[vocab])(image=None, question="what", word_boxes=LONG, max_seq_len=20, doc_stride=room)


def test_where_transformers_fails_lightpipe_answers_or_says_why(base):
    pipe = ours(base["bert"])
    expected = pipe(image=None, question=QUESTION, word_boxes=SHORT[:3], top_k=2, max_seq_len=40, doc_stride=4)
    # A stride not smaller than the window: transformers raises even when the words fit one window.
    assert_same(pipe(image=None, question=QUESTION, word_boxes=SHORT[:3], top_k=2, max_seq_len=40, doc_stride=39),
                expected, atol=0)
    # max_question_len: transformers 5 documents it, then fails with a TypeError in preprocess.
    assert_same(pipe(image=None, question=QUESTION, word_boxes=SHORT[:3], top_k=2, max_seq_len=40, doc_stride=4,
                     max_question_len=2), expected, atol=0)
    # Whole-number float boxes (transformers' own type hint) fail in its embedding lookup; they read as ints.
    floats = [(w, [float(v) for v in b]) for w, b in SHORT[:3]]
    assert_same(pipe(image=None, question=QUESTION, word_boxes=floats, top_k=2, max_seq_len=40, doc_stride=4),
                expected, atol=0)
    for box in ([0, 0, 1024, 10], [-1, 0, 5, 5], [20, 0, 10, 10], [0, 0, 10, 10, 4], [0.5, 0, 10, 10]):
        with pytest.raises(InvalidInput, match="word_boxes"):
            pipe(image=None, question=QUESTION, word_boxes=[("a", box)])


def test_batches_of_odd_documents_equal_single_calls_and_transformers(base):
    # transformers cannot batch this pipeline (its collation fails): compared with its batch size 1.
    pipe, ref = ours(base["bpe"]), reference(base["bpe"])
    nothing = [(" ", [1, 1, 2, 2]), ("\u200b", [1, 1, 2, 2])]
    inputs = [{"image": None, "question": q, "word_boxes": doc}
              for q in (QUESTION, "where does john work?") for doc in ([], nothing, SHORT[:2], LONG)]
    params = dict(top_k=3, handle_impossible_answer=True, **WINDOWS)
    expected = ref(inputs, **params)
    assert_same(pipe(inputs, batch_size=1, **params), expected)
    assert_same(pipe(inputs, batch_size=5, **params), expected)
    assert_same(pipe(inputs, batch_size=3, padding="max_length", **params), ref(inputs, padding="max_length", **params))


# ---------------------------------------------------------------------------------------- documents without words
@pytest.mark.parametrize("vocab", ["bert", "bpe"])
def test_document_without_words_encodes_the_question_alone(base, vocab):
    """transformers' tokenizer reads an empty word list as no second sequence ([CLS] q [SEP], not
    [CLS] q [SEP] [SEP]). Only a question's own literal [CLS] / <s> can then answer, and its score
    depends on that layout: lightpipe encoded the pair (scores off by up to 1e-2)."""
    pipe, ref = ours(base[vocab]), reference(base[vocab])
    for question, params in [("[CLS] <s> what is it", dict(max_seq_len=40)),
                             ("[CLS] <s> what is it", dict(max_seq_len=40, padding="max_length", top_k=3)),
                             ("<s> x </s>", dict(max_seq_len=24, handle_impossible_answer=True, top_k=5)),
                             ("what is it?", dict(handle_impossible_answer=True, max_seq_len=40))]:
        assert_same(pipe(image=None, question=question, word_boxes=[], **params),
                    ref(image=None, question=question, word_boxes=[], **params))
    # In a batch next to documents with words (transformers cannot batch: compared with its single calls).
    inputs = [{"image": None, "question": "[CLS] <s> what", "word_boxes": boxes}
              for boxes in ([], word_boxes()[:5], [])]
    for o, r in zip(pipe(inputs, batch_size=3, top_k=2, max_seq_len=40), ref(inputs, top_k=2, max_seq_len=40)):
        assert_same(o, r)


def test_question_too_long_for_a_document_without_words(base):
    """A question that fills max_seq_len exactly is answered (transformers too); one token more and
    transformers fails in its tokenizer ("Second sequence not provided"); lightpipe says InvalidInput."""
    pipe, ref = ours(base["bert"]), reference(base["bert"])
    fits = "q " * 22  # 22 tokens + [CLS] + [SEP] = 24
    assert_same(pipe(image=None, question=fits, word_boxes=[], max_seq_len=24, handle_impossible_answer=True),
                ref(image=None, question=fits, word_boxes=[], max_seq_len=24, handle_impossible_answer=True))
    with pytest.raises(Exception, match="Second sequence"):
        ref(image=None, question=fits + "q", word_boxes=[], max_seq_len=24)
    with pytest.raises(InvalidInput, match="max_seq_len=24"):
        pipe(image=None, question=fits + "q", word_boxes=[], max_seq_len=24)
    assert_same(pipe(image=None, question="what?", word_boxes=[], max_seq_len=24, top_k=2),  # still answers
                ref(image=None, question="what?", word_boxes=[], max_seq_len=24, top_k=2))


# ---------------------------------------------------------------------------------------- OCR
def test_ocr_of_other_image_modes_and_flags_equals_transformers(base):
    image, _, _ = render_page()
    assert_parity(base["bert"], [
        ((), dict(image=image.convert("L"), question=QUESTION, top_k=3)),
        ((), dict(image=image.convert("RGBA"), question=QUESTION, top_k=3, lang="eng")),
        ((), dict(image=image.convert("P"), question=QUESTION, top_k=3, tesseract_config="--psm 6")),
    ])


def test_empty_ocr_language_is_invalid_input(base):
    # Tesseract crashes on an empty -l: transformers raises TesseractError(-11, ...), lightpipe said "Tesseract
    # failed on this image"; the page is fine, the option is not.
    pipe, ref = ours(base["bert"]), reference(base["bert"])
    page, _, _ = render_page()
    for lang in ("", "  "):
        with pytest.raises(InvalidInput, match="lang"):
            pipe(page, QUESTION, lang=lang)
    assert_same(pipe(page, QUESTION, lang="eng", top_k=2), ref(page, QUESTION, lang="eng", top_k=2))
