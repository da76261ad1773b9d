"""Tokenizer parity with transformers' AutoTokenizer, on folders in the older layouts (no tokenizer.json):
vocab.txt (WordPiece) or vocab.json + merges.txt (byte-level BPE), with their JSON configs."""

import itertools
import json
import shutil

import pytest
from transformers import AutoTokenizer

from helpers import bert_vocab_folder, bpe_vocab_folder
from lightpipe import CheckpointError, InvalidInput
from lightpipe.processing.text import Tokenizer, clean_up_tokenization

TEXTS = [
    "Paris is the capital of France, and John Smith works at Google in London.",
    "Ünïcödé àccents, CAPITALS and naïve café-au-lait!",
    "Don't stop: it's 12.5% (or so) - isn't it? 'quoted' \"double\"",
    "  leading   and trailing spaces\tand\ttabs\nand new lines  ",
    "中文字符 and emoji 🙂 mixed with words",
    "what where who when why how does did do can will would should could not no yes very much many",
]
TEXT_A = TEXTS[0]
TEXT_B = "What is the capital of England, and where does Mary live?"

SPECIAL_MAP_BERT = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "mask_token": "[MASK]"}
SPECIAL_MAP_BPE = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                   "pad_token": "<pad>", "cls_token": "<s>",
                   "mask_token": {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False,
                                  "single_word": False}}

# name -> (vocabulary kind, tokenizer_config.json changes, special_tokens_map.json or None)
LAYOUTS = {
    "wordpiece-uncased": ("wordpiece", {"clean_up_tokenization_spaces": True, "padding_side": "left"},
                          SPECIAL_MAP_BERT),
    "wordpiece-cased": ("wordpiece", {"do_lower_case": False, "model_max_length": 64}, None),
    "wordpiece-keep-accents": ("wordpiece", {"do_lower_case": True, "strip_accents": False}, SPECIAL_MAP_BERT),
    "wordpiece-strip-accents-cased": ("wordpiece", {"do_lower_case": False, "strip_accents": True,
                                                    "tokenize_chinese_chars": False}, None),
    "wordpiece-no-max-length": ("wordpiece", {"model_max_length": None}, SPECIAL_MAP_BERT),
    "bpe": ("bpe", {}, None),
    "bpe-prefix-space": ("bpe", {"add_prefix_space": True, "padding_side": "left", "model_max_length": 40},
                         SPECIAL_MAP_BPE),
    "bpe-no-trim": ("bpe", {"trim_offsets": False, "clean_up_tokenization_spaces": True}, None),
}


def make_layout(folder, kind, changes, special_map):
    (bert_vocab_folder if kind == "wordpiece" else bpe_vocab_folder)(folder)
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    kept = {"vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in folder.iterdir()} <= kept
    return folder


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair_of_tokenizers(request, tmp_path_factory):
    kind, changes, special_map = LAYOUTS[request.param]
    folder = make_layout(tmp_path_factory.mktemp(request.param), kind, changes, special_map)
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))


def reference_windows(ref, text, pair=None, **kwargs):
    """transformers' encodings of text (+ pair) as a list of windows of dicts."""
    out = ref(text, pair, return_offsets_mapping=True, return_special_tokens_mask=True,
              return_token_type_ids=True, return_attention_mask=True, **kwargs)
    if not kwargs.get("return_overflowing_tokens"):
        return [{k: out[k] for k in out if k != "overflow_to_sample_mapping"}]
    n = len(out["input_ids"])
    return [{k: out[k][i] for k in out if k != "overflow_to_sample_mapping"} for i in range(n)]


def assert_same_encoding(ours, ref_window):
    assert ours.ids == ref_window["input_ids"]
    assert ours.attention_mask == ref_window["attention_mask"]
    assert ours.type_ids == ref_window["token_type_ids"]
    assert [tuple(o) for o in ours.offsets] == [tuple(o) for o in ref_window["offset_mapping"]]
    assert ours.special_tokens_mask == ref_window["special_tokens_mask"]


def assert_same_windows(ours, ref, text, pair=None, **kwargs):
    encoding = ours.encode(text, pair, **kwargs)
    ref_kwargs = dict(kwargs)
    if kwargs.get("truncation"):
        ref_kwargs["return_overflowing_tokens"] = True
    windows = reference_windows(ref, text, pair, **ref_kwargs)
    ours_windows = [encoding, *encoding.overflowing] if kwargs.get("truncation") else [encoding]
    assert len(ours_windows) == len(windows)
    for a, b in zip(ours_windows, windows):
        assert_same_encoding(a, b)


# ------------------------------------------------------------------ encoding


@pytest.mark.parametrize("text", TEXTS)
def test_single_text(pair_of_tokenizers, text):
    ours, ref = pair_of_tokenizers
    assert_same_windows(ours, ref, text)
    assert_same_windows(ours, ref, text, add_special_tokens=False)


@pytest.mark.parametrize("text, pair", [(TEXT_A, TEXT_B), (TEXTS[1], TEXTS[2]), ("yes", "no")])
def test_pairs(pair_of_tokenizers, text, pair):
    ours, ref = pair_of_tokenizers
    assert_same_windows(ours, ref, text, pair)


@pytest.mark.parametrize("strategy, max_length, stride, with_pair", [
    (strategy, max_length, stride, with_pair)
    for strategy, max_length, stride, with_pair in itertools.product(
        ["longest_first", "only_first", "only_second", True], [8, 12, 30], [0, 3], [False, True])
    if with_pair or strategy != "only_second"
])
def test_truncation_and_overflow(pair_of_tokenizers, strategy, max_length, stride, with_pair):
    ours, ref = pair_of_tokenizers
    pair = TEXT_B if with_pair else None
    try:
        windows = reference_windows(ref, TEXT_A, pair, truncation=strategy, max_length=max_length, stride=stride,
                                    return_overflowing_tokens=True)
    except BaseException:  # noqa: BLE001 - the reference refuses (e.g. the first text cannot shrink enough)
        with pytest.raises(InvalidInput):
            ours.encode(TEXT_A, pair, truncation=strategy, max_length=max_length, stride=stride)
        return
    encoding = ours.encode(TEXT_A, pair, truncation=strategy, max_length=max_length, stride=stride)
    ours_windows = [encoding, *encoding.overflowing]
    assert len(ours_windows) == len(windows)
    if max_length < 30:
        assert len(windows) > 1  # overflow happened
    for a, b in zip(ours_windows, windows):
        assert_same_encoding(a, b)


def test_truncation_to_model_max_length(pair_of_tokenizers):
    ours, ref = pair_of_tokenizers
    long = " ".join(TEXTS * 20)
    if ref.model_max_length > 10**20:
        assert ours.model_max_length >= 10**20
        with pytest.raises(InvalidInput, match="max_length"):
            ours.encode(long, truncation=True)
        return
    assert ours.model_max_length == ref.model_max_length
    encoding = ours.encode(long, truncation=True)
    assert len(encoding.ids) == ours.model_max_length
    assert encoding.ids == ref(long, truncation=True)["input_ids"]


def test_split_into_words(pair_of_tokenizers):
    ours, ref = pair_of_tokenizers
    words = ["John", "Smith", "lives", "in", "Zürich,", "Switzerland"]
    encoding = ours.encode(words, is_split_into_words=True)
    ref_out = ref(words, is_split_into_words=True, return_offsets_mapping=True)
    assert encoding.ids == ref_out["input_ids"]
    assert encoding.word_ids == ref_out.word_ids()
    assert [tuple(o) for o in encoding.offsets] == [tuple(o) for o in ref_out["offset_mapping"]]


# ------------------------------------------------------------------ special tokens and settings


def test_special_tokens(pair_of_tokenizers):
    ours, ref = pair_of_tokenizers
    assert ours.mask_token == str(ref.mask_token)
    assert ours.mask_token_id == ref.mask_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.unk_token_id == ref.unk_token_id
    assert set(ours.all_special_ids) == set(ref.all_special_ids)
    assert ours.num_special_tokens_to_add(False) == ref.num_special_tokens_to_add(False)
    assert ours.num_special_tokens_to_add(True) == ref.num_special_tokens_to_add(True)
    assert ours.vocab_size == len(ref)
    assert ours.returns_token_type_ids == ("token_type_ids" in ref.model_input_names)


@pytest.mark.parametrize("template", ["The capital of France is {mask}.", "{mask} lives in{mask}London",
                                      "a {mask} {mask} b", "{mask}"])
def test_mask_token(pair_of_tokenizers, template):
    ours, ref = pair_of_tokenizers
    text = template.format(mask=ours.mask_token)
    assert_same_windows(ours, ref, text)
    assert ours.encode(text).ids.count(ours.mask_token_id) == template.count("{mask}")


def test_padding_side_and_max_length(pair_of_tokenizers):
    ours, ref = pair_of_tokenizers
    assert ours.padding_side == ref.padding_side
    assert ours.truncation_side == ref.truncation_side
    if ref.model_max_length < 10**20:
        assert ours.model_max_length == ref.model_max_length


def test_tokenizer_json_and_vocab_files_agree(tmp_path):
    """A folder with tokenizer.json and the same vocabulary without it tokenize alike."""
    for kind, make in (("wordpiece", bert_vocab_folder), ("bpe", bpe_vocab_folder)):
        full = make(tmp_path / f"{kind}-full")
        bare = tmp_path / f"{kind}-bare"
        shutil.copytree(full, bare)
        (bare / "tokenizer.json").unlink()
        a, b = Tokenizer.from_folder(full), Tokenizer.from_folder(bare)
        for text in TEXTS:
            ea, eb = a.encode(text, TEXT_B), b.encode(text, TEXT_B)
            assert (ea.ids, ea.type_ids, ea.offsets) == (eb.ids, eb.type_ids, eb.offsets)


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("skip", [False, True])
def test_decode(pair_of_tokenizers, skip):
    """decode() applies clean_up_tokenization_spaces from tokenizer_config.json exactly when transformers
    does (never for BPE models)."""
    ours, ref = pair_of_tokenizers
    for text in TEXTS + [f"I'm sure {ours.mask_token} , isn't it ? Yes ! We 've said they 're fine ."]:
        ids = ref(text, TEXT_B)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        for flag in (True, False):
            assert ours.decode(ids, skip, clean_up_tokenization_spaces=flag) == ref.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=flag)


def test_clean_up_is_applied_for_wordpiece(tmp_path):
    kind, changes, special_map = LAYOUTS["wordpiece-uncased"]
    folder = make_layout(tmp_path / "wp", kind, changes, special_map)
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.clean_up_tokenization_spaces and ref.clean_up_tokenization_spaces
    ids = ref("do n't stop , please . is it ? yes !", add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids) == "don't stop, please. is it? yes!"
    # The flag is what joins the contraction (the WordPiece decoder already joins the punctuation).
    raw = ours.decode(ids, clean_up_tokenization_spaces=False)
    assert raw == ref.decode(ids, clean_up_tokenization_spaces=False) == "do n ' t stop, please. is it? yes!"


def test_clean_up_tokenization_rules():
    assert clean_up_tokenization("do n't stop , I 'm here . ok ? go ! it 's we 've they 're a ' b") == \
        "don't stop, I'm here. ok? go! it's we've they're a'b"


def test_convert_tokens_to_string(pair_of_tokenizers):
    ours, ref = pair_of_tokenizers
    for text in TEXTS:
        tokens = ref.convert_ids_to_tokens(ref(text)["input_ids"])
        assert ours.convert_ids_to_tokens(ref(text)["input_ids"]) == tokens
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)
        assert ours.convert_tokens_to_string(tokens[1:3]) == ref.convert_tokens_to_string(tokens[1:3])


def test_convert_tokens_to_string_without_decoder(pair_of_tokenizers):
    ours, _ = pair_of_tokenizers
    bare = Tokenizer(ours.backend.__class__.from_str(ours.backend.to_str()), dict(ours.special_tokens))
    bare.backend.decoder = None
    assert bare.convert_tokens_to_string(["ab", "##c", "d"]) == "ab ##c d"


# ------------------------------------------------------------------ errors


def test_rust_panic_becomes_invalid_input(pair_of_tokenizers):
    """A stride larger than a window's room panics inside tokenizers (pyo3 PanicException, a BaseException)."""
    ours, _ = pair_of_tokenizers
    long = " ".join(TEXTS)
    with pytest.raises(InvalidInput, match="stride"):
        ours.encode(long, truncation=True, max_length=3, stride=1)
    with pytest.raises(InvalidInput):
        ours.encode(long, TEXT_B, truncation="longest_first", max_length=10, stride=6)
    # The tokenizer is still usable, without truncation left behind.
    assert len(ours.encode(long).ids) > 20
    assert len(ours.encode(long, truncation=True, max_length=12, stride=2).ids) == 12


@pytest.mark.parametrize("kwargs", [{"truncation": "sideways", "max_length": 5},
                                    {"truncation": True, "max_length": 8, "stride": -1},
                                    {"truncation": True, "max_length": 8, "stride": 1.5}])
def test_bad_arguments(pair_of_tokenizers, kwargs):
    ours, _ = pair_of_tokenizers
    with pytest.raises(InvalidInput):
        ours.encode(TEXT_A, **kwargs)


def test_bad_input_type(pair_of_tokenizers):
    ours, _ = pair_of_tokenizers
    with pytest.raises(InvalidInput):
        ours.encode(123)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_broken_tokenizer_config(tmp_path):
    folder = bert_vocab_folder(tmp_path / "wp")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_folder(folder)
