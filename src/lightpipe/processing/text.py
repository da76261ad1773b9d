"""Tokenizer over the `tokenizers` library.

Loads tokenizer.json when the checkpoint has one, or builds the same tokenizer from the older
files (vocab.txt for WordPiece, vocab.json + merges.txt for byte-level BPE) with the settings
in tokenizer_config.json and special_tokens_map.json. Returns `tokenizers.Encoding` objects:
ids, type ids, offsets, word ids and overflowing windows come straight from the Rust library.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Encoding, Regex, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, processors

from ..checks import positive_int
from ..config import read_json_object
from ..errors import CheckpointError, InvalidInput

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TRUNCATION_STRATEGIES = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
                         "only_second": "only_second"}
# Tokenizer classes whose models take no token_type_ids (transformers' model_input_names).
NO_TOKEN_TYPES = ("Roberta", "XLMRoberta", "Camembert", "DistilBert", "GPT2", "Bart", "Longformer")
# transformers' padding= values -> None (no padding), "longest" or "max_length".
PADDING_STRATEGIES = {None: None, False: None, "do_not_pad": None, True: "longest", "longest": "longest",
                      "max_length": "max_length"}
VERY_LARGE = int(1e20)  # transformers' "no limit" for model_max_length

# Spaces that decoding WordPiece tokens leaves before punctuation and English contractions, removed
# in this order when a checkpoint sets clean_up_tokenization_spaces (as transformers does).
CLEAN_UP_SPACES = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """'do n't stop , please .' -> "don't stop, please." (the rules of CLEAN_UP_SPACES, in order)."""
    for before, after in CLEAN_UP_SPACES:
        text = text.replace(before, after)
    return text


def _is_backend_failure(error: BaseException) -> bool:
    """Whether `error` came from the Rust library: a plain Exception, or a Rust panic, which pyo3
    raises as pyo3_runtime.PanicException, a BaseException subclass that `except Exception` misses."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer settings file ({} when absent), by the one reader's rules (config.read_json_object)."""
    return read_json_object(path) or {}


def _token_content(value: Any) -> tuple[str | None, dict]:
    """A special token as written in tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], value
    return None, {}


class Tokenizer:
    """Text -> `tokenizers.Encoding`, with the special tokens and limits of the checkpoint."""

    def __init__(self, backend: Backend, special_tokens: dict[str, str], *, model_max_length: int = VERY_LARGE,
                 padding_side: str = "right", truncation_side: str = "right", returns_token_type_ids: bool = True,
                 clean_up_tokenization_spaces: bool = False, clean_up_bpe: bool = False, name_or_path: str = "",
                 chat_template: str | dict[str, str] | None = None):
        self.backend = backend
        self.special_tokens = special_tokens
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.returns_token_type_ids = returns_token_type_ids
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models (it would eat real spaces before punctuation)
        # unless the config insists with clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output.
        self.clean_up_bpe = clean_up_bpe
        self.name_or_path = name_or_path
        # The Jinja2 prompt format for chats (processing/chat.py renders it); a dict when the checkpoint names several.
        self.chat_template = chat_template
        # Truncation is a setting of the backend object; one lock keeps concurrent callers apart.
        self._lock = threading.Lock()
        backend.no_truncation()
        backend.no_padding()
        self.all_special_ids = sorted({i for i in (self.token_to_id(t) for t in special_tokens.values()) if i is not None}
                                      | {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        from ..formats import ct2  # imports torch: only here

        if not config and ct2.is_ct2_folder(folder, need_weights=False):
            # A CTranslate2 (faster-whisper) folder has tokenizer.json alone: the special tokens are Whisper's.
            config = ct2.tokenizer_config(folder)
        special_map = _read_json(folder / "special_tokens_map.json")
        special: dict[str, str] = {}
        special_settings: dict[str, dict] = {}
        for source in (special_map, config):  # tokenizer_config.json wins, as in transformers
            for name in SPECIAL_NAMES:
                content, settings = _token_content(source.get(name))
                if content is not None:
                    special[name] = content
                    special_settings[content] = settings or special_settings.get(content, {})
        if (folder / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust library raises plain Exception
                raise CheckpointError(f"{folder / 'tokenizer.json'} could not be loaded: {e}") from e
        elif (folder / "vocab.txt").is_file():
            backend = _wordpiece_from_vocab(folder / "vocab.txt", config, special)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = _bpe_from_vocab(folder / "vocab.json", folder / "merges.txt", config, special, special_settings)
        elif (folder / "vocab.json").is_file() and str(config.get("tokenizer_class") or "Wav2Vec2").startswith("Wav2Vec2"):
            # A vocab.json alone is Wav2Vec2CTCTokenizer's layout (older Hub checkpoints do not name the class).
            backend = _characters_from_vocab(folder / "vocab.json", config, special)
        elif any(folder.glob("*.model")):
            # A SentencePiece model alone (spm.model of some DeBERTa-v3 or T5 repositories) is not read here.
            raise CheckpointError(
                f"{folder} has a SentencePiece model ({next(folder.glob('*.model')).name}) but no tokenizer.json, "
                "which lightpipe needs; write one once with transformers: "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)."
            )
        else:
            raise CheckpointError(
                f"{folder} has no tokenizer: expected tokenizer.json, vocab.txt, or vocab.json + merges.txt."
            )
        max_length = config.get("model_max_length")
        tokenizer_class = str(config.get("tokenizer_class") or "")
        input_names = config.get("model_input_names")
        if isinstance(input_names, list):
            returns_types = "token_type_ids" in input_names
        else:
            returns_types = not tokenizer_class.startswith(NO_TOKEN_TYPES)
        return cls(
            backend,
            special,
            model_max_length=int(max_length) if isinstance(max_length, (int, float)) and max_length < VERY_LARGE else VERY_LARGE,
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            returns_token_type_ids=returns_types,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            clean_up_bpe=bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)),
            name_or_path=str(folder),
            chat_template=_read_chat_template(folder, config),
        )

    # ------------------------------------------------------------------ vocabulary
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(int(index))

    def special_id(self, name: str) -> int | None:
        return self.token_to_id(self.special_tokens.get(name))

    @property
    def pad_token_id(self) -> int | None:
        return self.special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self.special_id("unk_token")

    @property
    def mask_token(self) -> str | None:
        return self.special_tokens.get("mask_token")

    @property
    def mask_token_id(self) -> int | None:
        return self.special_id("mask_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.backend.num_special_tokens_to_add(pair)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, pair: str | list[str] | None = None, *, add_special_tokens: bool = True,
               truncation: bool | str | None = None, max_length: int | None = None, stride: int = 0,
               is_split_into_words: bool = False) -> Encoding:
        """One text (and optional pair) -> Encoding; with truncation its `overflowing` holds the other windows."""
        if truncation not in (None, False, "do_not_truncate") and truncation not in TRUNCATION_STRATEGIES:
            raise InvalidInput(
                f"truncation={truncation!r} is not valid; use True, False, 'longest_first', 'only_first' or 'only_second'."
            )
        truncate = truncation not in (None, False, "do_not_truncate")
        if not truncate:
            return self._encode(text, pair, is_split_into_words, add_special_tokens)
        limit = max_length if max_length is not None else self.model_max_length
        if limit >= VERY_LARGE:
            raise InvalidInput("truncation was asked for but neither max_length nor the tokenizer's model_max_length is set.")
        positive_int("stride", stride, allow_zero=True)
        with self._lock:
            try:
                self.backend.enable_truncation(limit, stride=stride, strategy=TRUNCATION_STRATEGIES[truncation],
                                               direction=self.truncation_side)
            except BaseException as e:
                if not _is_backend_failure(e):
                    raise
                raise InvalidInput(f"cannot truncate to max_length={limit} with stride={stride}: {e}") from e
            try:  # a stride too large for the room left in a window panics in Rust only when windows are cut
                return self._encode(text, pair, is_split_into_words, add_special_tokens,
                                    f"cannot truncate this input to {limit} tokens with stride={stride}")
            finally:
                self.backend.no_truncation()

    def _encode(self, text, pair, is_split_into_words: bool, add_special_tokens: bool,
                what: str = "cannot tokenize this input") -> Encoding:
        try:
            return self.backend.encode(text, pair, is_pretokenized=is_split_into_words,
                                       add_special_tokens=add_special_tokens)
        except BaseException as e:  # a Rust panic is a BaseException: it must not escape as one
            if not _is_backend_failure(e):
                raise
            raise InvalidInput(f"{what}: {e}") from e

    def __call__(self, text, text_pair=None, *, add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None, stride: int = 0,
                 is_split_into_words: bool = False, pad_to_multiple_of: int | None = None,
                 padding_side: str | None = None, return_tensors: str | None = None,
                 return_token_type_ids: bool | None = None, return_attention_mask: bool | None = None,
                 return_special_tokens_mask: bool = False, return_offsets_mapping: bool = False,
                 return_length: bool = False) -> "BatchEncoding":
        """transformers' `tokenizer(text)`: a text (or a list of texts, with optional pairs) -> a BatchEncoding (a dict
        with attribute access) of input_ids, token_type_ids (when the model takes them) and attention_mask.

        One text gives flat lists; a list gives a list per text. padding: False / "do_not_pad", True / "longest",
        or "max_length" (to max_length, else model_max_length), rounded up to pad_to_multiple_of. truncation: True /
        "longest_first" / "only_first" / "only_second" to max_length (else model_max_length); a max_length given
        without truncation or padding truncates, as in transformers. return_tensors: "pt" (torch) or "np" (numpy),
        with a batch dimension even for one text; ragged rows need padding."""
        batched = isinstance(text, (list, tuple)) and (not is_split_into_words or (
            len(text) > 0 and isinstance(text[0], (list, tuple))))
        texts = list(text) if batched else [text]
        if text_pair is None or (not batched and not text_pair):  # transformers drops an empty pair of one text
            pairs = [None] * len(texts)
        else:
            pairs = list(text_pair) if batched else [text_pair]
            if len(pairs) != len(texts):
                raise InvalidInput(f"{len(texts)} texts but {len(pairs)} text pairs; give one pair per text.")
        for value in texts + [p for p in pairs if p is not None]:
            if is_split_into_words:
                if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
                    raise InvalidInput("with is_split_into_words=True each text must be a list of words (strings).")
            elif not isinstance(value, str):
                raise InvalidInput(f"the text to tokenize must be a string or a list of strings, not {type(value).__name__}.")
        strategy = "invalid"
        if padding is None or isinstance(padding, (bool, str)):
            strategy = PADDING_STRATEGIES.get(padding, "invalid")
        if strategy == "invalid":
            raise InvalidInput(f"padding={padding!r} is not valid; use True, False, 'longest', 'max_length' or 'do_not_pad'.")
        if truncation is None and max_length is not None and strategy is None:
            truncation = True  # transformers truncates to a max_length given alone (with a warning)
        if return_tensors not in (None, "pt", "np"):
            raise InvalidInput(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None.")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise InvalidInput(f"padding_side must be 'left' or 'right', not {side!r}.")
        encodings = [self.encode(t, p, add_special_tokens=add_special_tokens, truncation=truncation,
                                 max_length=max_length, stride=stride, is_split_into_words=is_split_into_words)
                     for t, p in zip(texts, pairs)]
        with_types = self.returns_token_type_ids if return_token_type_ids is None else bool(return_token_type_ids)
        with_mask = True if return_attention_mask is None else bool(return_attention_mask)
        fields: dict[str, list[list]] = {"input_ids": [list(e.ids) for e in encodings]}
        if with_types:
            fields["token_type_ids"] = [list(e.type_ids) for e in encodings]
        if with_mask:
            fields["attention_mask"] = [list(e.attention_mask) for e in encodings]
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = [list(e.special_tokens_mask) for e in encodings]
        if return_offsets_mapping:
            fields["offset_mapping"] = [[tuple(o) for o in e.offsets] for e in encodings]
        if strategy is not None:
            target = max(len(e.ids) for e in encodings)
            if strategy == "max_length":
                target = max_length if max_length is not None else self.model_max_length
                if target >= VERY_LARGE:
                    raise InvalidInput('padding="max_length" needs max_length (this tokenizer sets no model_max_length).')
            if pad_to_multiple_of:
                multiple = positive_int("pad_to_multiple_of", pad_to_multiple_of)
                target = -(-target // multiple) * multiple
            pad_id = self.pad_token_id
            if pad_id is None and any(len(e.ids) < target for e in encodings):
                raise InvalidInput("this tokenizer has no pad token, so texts of different lengths cannot be padded.")
            values = {"input_ids": pad_id, "token_type_ids": 0, "attention_mask": 0, "special_tokens_mask": 1,
                      "offset_mapping": (0, 0)}
            for name, rows in fields.items():
                for i, row in enumerate(rows):
                    fill = [values[name]] * max(0, target - len(row))
                    rows[i] = fill + row if side == "left" else row + fill
        if return_length:
            fields["length"] = [len(row) for row in fields["input_ids"]]
        if return_tensors is not None:
            lengths = {len(row) for name, rows in fields.items() if name != "length" for row in rows}
            if len(lengths) > 1:
                raise InvalidInput("the texts tokenize to different lengths, so they cannot be one tensor; "
                                   "pass padding=True (and truncation=True for texts over the model's limit).")
            import numpy as np

            arrays = {name: np.asarray(rows, dtype=np.int64) for name, rows in fields.items()}
            if return_tensors == "pt":
                import torch

                return BatchEncoding({name: torch.from_numpy(a) for name, a in arrays.items()}, encodings)
            return BatchEncoding(arrays, encodings)
        if not batched:
            return BatchEncoding({name: rows[0] for name, rows in fields.items()}, encodings)
        return BatchEncoding(fields, encodings)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """decode() of each row (a list of id lists, or a 2-D tensor/array)."""
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Ids -> text. With clean_up_tokenization_spaces (default: the checkpoint's setting) the spaces
        before punctuation and contractions are removed, except for BPE models, as in transformers."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.cleans_up_spaces(clean_up_tokenization_spaces):
            text = clean_up_tokenization(text)
        return text

    def cleans_up_spaces(self, clean_up_tokenization_spaces: bool | None = None) -> bool:
        """Whether decode applies clean_up_tokenization (asked for, or the checkpoint's setting; never for BPE
        models unless the checkpoint insists)."""
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return bool(clean_up_tokenization_spaces) and (self.clean_up_bpe or type(self.backend.model).__name__ != "BPE")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Tokens -> text through the backend's decoder ("##" joins for WordPiece, bytes for BPE);
        joined with spaces when the tokenizer has no decoder."""
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]


class BatchEncoding(dict):
    """What calling a Tokenizer returns: a dict of model inputs (input_ids, attention_mask ...) that also reads as
    attributes (`enc.input_ids`), as transformers' BatchEncoding. `encodings` holds the `tokenizers.Encoding`s."""

    def __init__(self, data: dict, encodings: list[Encoding] | None = None):
        super().__init__(data)
        self.encodings = encodings

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        """The tensors moved to `device` (return_tensors="pt" only)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()}, self.encodings)

    def word_ids(self, index: int = 0) -> list[int | None]:
        return list(self.encodings[index].word_ids) if self.encodings else []


def _read_chat_template(folder: Path, config: dict) -> str | dict[str, str] | None:
    """The checkpoint's chat template(s), where transformers looks: chat_template.jinja (and named ones in
    additional_chat_templates/*.jinja) win over tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"}); a processor's legacy chat_template.json comes last. Several -> {name: template}."""
    templates: dict[str, str] = {}
    try:
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra = folder / "additional_chat_templates"
        if extra.is_dir():
            for path in sorted(extra.glob("*.jinja")):
                templates[path.name[:-len(".jinja")]] = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the chat template in {folder}: {e}") from e
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    value = config.get("chat_template")
    if value is None:
        value = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(value, list):  # older saves list named templates
        value = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return value or None
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"the chat_template in {folder} is neither a string nor a list of named templates.")
    return value


def _add_special(backend: Backend, special: dict[str, str], settings: dict[str, dict] | None = None) -> None:
    tokens = []
    for content in dict.fromkeys(special.values()):
        opts = (settings or {}).get(content, {})
        tokens.append(AddedToken(content, lstrip=bool(opts.get("lstrip", False)), rstrip=bool(opts.get("rstrip", False)),
                                 single_word=bool(opts.get("single_word", False)),
                                 normalized=bool(opts.get("normalized", False)), special=True))
    backend.add_special_tokens(tokens)


def _wordpiece_from_vocab(vocab_path: Path, config: dict, special: dict[str, str]) -> Backend:
    """BERT's WordPiece tokenizer from vocab.txt, configured as transformers' BertTokenizerFast."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab.setdefault(line.rstrip("\n"), index)
    special.setdefault("unk_token", "[UNK]")
    special.setdefault("sep_token", "[SEP]")
    special.setdefault("cls_token", "[CLS]")
    special.setdefault("pad_token", "[PAD]")
    special.setdefault("mask_token", "[MASK]")
    backend = Backend(models.WordPiece(vocab, unk_token=special["unk_token"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=bool(config.get("do_lower_case", True)),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = special["cls_token"], special["sep_token"]
    if cls not in vocab or sep not in vocab:
        raise CheckpointError(f"{vocab_path} lacks the special tokens {cls!r} / {sep!r}.")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    _add_special(backend, special)
    return backend


def _characters_from_vocab(vocab_path: Path, config: dict, special: dict[str, str]) -> Backend:
    """A character vocabulary (Wav2Vec2CTCTokenizer, CTC speech models): one token per character, the
    word delimiter ("|") in place of spaces. Speech pipelines decode with their own CTC rules
    (tasks/automatic_speech_recognition.py); this makes the folder load as a tokenizer."""
    vocab = read_json_object(vocab_path)
    if isinstance(vocab, dict) and isinstance(vocab.get(config.get("target_lang") or ""), dict):
        vocab = vocab[config["target_lang"]]  # multilingual (MMS) vocabularies nest one per language
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise CheckpointError(f"{vocab_path} must map tokens to ids (set target_lang for a multilingual vocabulary).")
    special.setdefault("unk_token", "<unk>")
    backend = Backend(models.WordLevel(vocab, unk_token=special["unk_token"]))
    backend.normalizer = normalizers.Replace(" ", str(config.get("word_delimiter_token") or "|"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    _add_special(backend, {k: v for k, v in special.items() if v in vocab})
    return backend


def _bpe_from_vocab(vocab_path: Path, merges_path: Path, config: dict, special: dict[str, str],
                    settings: dict[str, dict]) -> Backend:
    """Byte-level BPE (RoBERTa, GPT-2) from vocab.json + merges.txt, as transformers' fast tokenizers build it."""
    vocab = read_json_object(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {merges_path}: {e}") from e
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    add_prefix_space = bool(config.get("add_prefix_space", False))
    backend = Backend(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    cls, sep = special.get("cls_token"), special.get("sep_token")
    if cls is not None and sep is not None and cls in vocab and sep in vocab:
        backend.post_processor = processors.RobertaProcessing(
            (sep, vocab[sep]), (cls, vocab[cls]), trim_offsets=bool(config.get("trim_offsets", True)),
            add_prefix_space=add_prefix_space,
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # A mask token given as a plain string keeps the space before it (transformers 5 builds it so; 4.x
    # forced lstrip=True). An AddedToken-like dict in the configs, e.g. {"lstrip": true}, is honoured.
    _add_special(backend, special, settings)
    return backend
