"""checks.py (the parameter checker every task uses) and config.read_json_object (the one reader of a
checkpoint's JSON files)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightpipe import CheckpointError, InvalidInput, pipeline
from lightpipe.checks import flag, number, positive_int, probability
from lightpipe.config import known_keys, read_json_object


@pytest.mark.parametrize("value", [1, 7, np.int64(3)])
def test_positive_int_accepts_integers(value):
    assert positive_int("top_k", value) == value and type(positive_int("top_k", value)) is int


@pytest.mark.parametrize("value, kwargs, message", [
    (0, {}, "top_k must be a positive integer, not 0."),
    (True, {}, "top_k must be a positive integer, not True."),
    (2.0, {}, "top_k must be a positive integer, not 2.0."),
    ("3", {}, "top_k must be a positive integer, not '3'."),
    (None, {}, "top_k must be a positive integer, not None."),
    (-1, {"allow_zero": True}, "top_k must be a non-negative integer, not -1."),
    (1, {"minimum": 2}, "top_k must be an integer of at least 2, not 1."),
    (0, {"allow_none": True}, "top_k must be a positive integer or None, not 0."),
])
def test_positive_int_names_the_parameter(value, kwargs, message):
    with pytest.raises(InvalidInput) as error:
        positive_int("top_k", value, **kwargs)
    assert str(error.value) == message


def test_none_zero_and_other_errors():
    assert positive_int("n", None, allow_none=True) is None
    assert positive_int("n", 0, allow_zero=True) == 0
    with pytest.raises(CheckpointError, match="config.json: n must be a positive integer"):
        positive_int("config.json: n", 0, error=CheckpointError)


def test_number_and_probability():
    assert number("timeout", 0.5, positive=True, unit="seconds") == 0.5
    assert number("x", -3) == -3
    for bad in (0, -1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(InvalidInput, match="^timeout must be a positive number of seconds, not "):
            number("timeout", bad, positive=True, unit="seconds")
    assert probability("top_p", 0) == 0 and probability("top_p", 1.0) == 1.0
    assert probability("top_p", None, allow_none=True) is None
    for bad in (-0.1, 1.5, float("nan"), False, None):
        with pytest.raises(InvalidInput, match="^top_p must be a number between 0 and 1"):
            probability("top_p", bad)


def test_flag():
    assert flag("align_to_words", True) is True and flag("align_to_words", None) is None
    for bad in (0, 1, "yes"):
        with pytest.raises(InvalidInput, match="^align_to_words must be True or False"):
            flag("align_to_words", bad)
    with pytest.raises(InvalidInput):
        flag("align_to_words", None, allow_none=False)


def test_read_json_object(tmp_path):
    path = tmp_path / "settings.json"
    assert read_json_object(path) is None  # absent
    path.write_text(json.dumps({"a": 1, "b": None}))
    assert read_json_object(path) == {"a": 1, "b": None}
    assert known_keys({"a": 1, "b": None, "c": 3}, ("a", "b")) == {"a": 1, "b": None}
    assert known_keys({"a": 1, "b": None}, ("a", "b"), skip_none=True) == {"a": 1}
    for text, message in (("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object, not list"),
                          ('"text"', "must hold a JSON object, not str")):
        path.write_text(text)
        with pytest.raises(CheckpointError, match=message) as error:
            read_json_object(path)
        assert str(path) in str(error.value)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        read_json_object(path)


def test_a_tokenizer_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    """It used to be read as empty, silently dropping the checkpoint's special tokens and limits."""
    from helpers import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path, "bert", "sequence-classification")
    assert (folder / "tokenizer_config.json").is_file()
    pipeline("text-classification", model=str(folder))  # loads as saved
    (folder / "tokenizer_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="tokenizer_config.json must hold a JSON object"):
        pipeline("text-classification", model=str(folder))
