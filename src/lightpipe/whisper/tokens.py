"""Whisper's special tokens and languages: one table of languages, one object holding the ids of the control tokens.

Whisper's vocabulary is text tokens (ids below `<|endoftext|>`), then the control tokens in a fixed order
(`<|endoftext|>`, `<|startoftranscript|>`, one token per language, `<|translate|>`, `<|transcribe|>`,
`<|startoflm|>`, `<|startofprev|>`, `<|nospeech|>`, `<|notimestamps|>`), then 1501 timestamp tokens
`<|0.00|>` ... `<|30.00|>`. Where these ids come from differs by checkpoint:

- generation_config.json names most of them (`decoder_start_token_id`, `no_timestamps_token_id`, `lang_to_id`, ...);
- tokenizer.json knows the control tokens by their text (timestamp tokens are often missing there);
- a CTranslate2 folder has only its vocabulary list.

`WhisperTokens` is built from whichever of these a checkpoint has, in one place (`from_sources`), and every part
of Whisper decoding reads the ids from it: prompts, timestamp rules, the window loop, text and word timings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import CheckpointError, InvalidInput

# Whisper's languages, code -> English name, in the order of its language tokens.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
# English name, and the other names users type for a language -> code.
LANGUAGE_CODES = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb", "pushto": "ps",
    "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}
TASKS = ("translate", "transcribe")

END_OF_TEXT = "<|endoftext|>"
START_OF_TRANSCRIPT = "<|startoftranscript|>"
START_OF_PREVIOUS = "<|startofprev|>"
NO_TIMESTAMPS = "<|notimestamps|>"


def language_code(language: str) -> str:
    """'English', 'en', 'mandarin', '<|en|>' -> 'en', 'en', 'zh', 'en'; InvalidInput for a language Whisper does
    not know."""
    key = str(language).strip().lower()
    if key.startswith("<|") and key.endswith("|>"):
        key = key[2:-2]
    if key in LANGUAGES:
        return key
    if key in LANGUAGE_CODES:
        return LANGUAGE_CODES[key]
    raise InvalidInput(f"Whisper does not know the language {language!r}; use a code or a name such as "
                       f"'en' / 'english'. Known codes: {', '.join(LANGUAGES)}.")


def _token_id(value: Any) -> int | None:
    """A generation_config.json id (an int, or a list whose first entry is one) -> int, else None."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclasses.dataclass(frozen=True)
class WhisperTokens:
    """The ids of Whisper's control tokens in one checkpoint.

    multilingual: whether the model takes (or detects) a language and a task: generation_config.json's
        is_multilingual, else whether it names languages (lang_to_id), as transformers decides.
    language_ids: (code, id) of each language token, in the order of `LANGUAGES`.
    task_ids: (task, id) for "translate" and "transcribe" where present.
    """

    eot: int  # <|endoftext|>: the first control id; every id below it is text
    sot: int  # <|startoftranscript|>
    no_timestamps: int  # <|notimestamps|>: the last control id; timestamps follow it
    sot_prev: int | None = None  # <|startofprev|>: starts a prompt of previous text
    language_ids: tuple[tuple[str, int], ...] = ()
    task_ids: tuple[tuple[str, int], ...] = ()
    # A property of the model rather than an id: two objects naming the same ids compare equal.
    multilingual: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.eot < self.no_timestamps:
            raise CheckpointError(f"<|endoftext|> ({self.eot}) must come before <|notimestamps|> "
                                  f"({self.no_timestamps}) in a Whisper vocabulary; check generation_config.json.")

    # ------------------------------------------------------------------ kinds of ids
    @property
    def timestamp_begin(self) -> int:
        """Id of <|0.00|>; id t + k means k time steps (0.02 s each) after the window's start."""
        return self.no_timestamps + 1

    @property
    def no_speech(self) -> int:
        """<|nospeech|> (<|nocaptions|> in older vocabularies): the control token just before <|notimestamps|>."""
        return self.no_timestamps - 1

    def is_timestamp(self, token: int) -> bool:
        return token >= self.timestamp_begin

    def is_control(self, token: int) -> bool:
        """<|endoftext|>, <|startoftranscript|>, languages, tasks, <|notimestamps|> ...: never text."""
        return self.eot <= token < self.timestamp_begin

    def is_text(self, token: int) -> bool:
        return token < self.eot

    @property
    def languages(self) -> dict[int, str]:
        """Language token id -> language name ('english')."""
        return {i: LANGUAGES[code] for code, i in self.language_ids}

    # ------------------------------------------------------------------ prompt tokens
    def language_token(self, language: str | int) -> int:
        """'en', 'english', '<|en|>' (or a language token id) -> the language token id of this checkpoint."""
        ids = dict(self.language_ids)
        if not ids:
            raise InvalidInput("this checkpoint names no language tokens (no lang_to_id in its "
                               "generation_config.json): it cannot take a language.")
        if isinstance(language, int) and not isinstance(language, bool):
            if language not in ids.values():
                raise InvalidInput(f"token id {language} is not a language token of this checkpoint.")
            return language
        if not isinstance(language, str):
            raise InvalidInput(f"language must be a string such as 'en', 'english' or '<|en|>', not {language!r}.")
        code = language_code(language)
        if code not in ids:
            raise InvalidInput(f"<|{code}|> is not a language of this checkpoint (see lang_to_id in "
                               "generation_config.json).")
        return ids[code]

    def task_token(self, task: str) -> int:
        if task not in TASKS:
            raise InvalidInput(f"task must be 'transcribe' or 'translate', not {task!r}.")
        ids = dict(self.task_ids)
        if task not in ids:
            raise InvalidInput("this checkpoint names no task tokens (no task_to_id in its generation_config.json): "
                               "it cannot take a task.")
        return ids[task]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_sources(cls, generation_config: Mapping[str, Any] | None = None,
                     token_to_id: Callable[[str], int | None] | None = None) -> "WhisperTokens":
        """The ids generation_config.json names (as a dict, or a GenerationConfig's fields and extra), else those
        `token_to_id` finds by the tokens' text (a tokenizer's lookup, or a vocabulary list's)."""
        config = _as_dict(generation_config)
        lookup = token_to_id or (lambda token: None)

        def pick(key: str, token: str, required: bool = True) -> int | None:
            found = _token_id(config.get(key))
            if found is None:
                found = lookup(token)
            if found is None and required:
                raise CheckpointError(
                    f"the vocabulary has no {token} (nor does generation_config.json give its id as {key}): this "
                    "does not look like a Whisper checkpoint."
                )
            return found

        lang_to_id = config.get("lang_to_id") if isinstance(config.get("lang_to_id"), Mapping) else {}
        task_to_id = config.get("task_to_id") if isinstance(config.get("task_to_id"), Mapping) else {}
        languages = tuple((code, index) for code in LANGUAGES
                          if isinstance(index := lang_to_id.get(f"<|{code}|>", lookup(f"<|{code}|>")), int))
        tasks = tuple((task, index) for task in TASKS
                      if isinstance(index := task_to_id.get(task, lookup(f"<|{task}|>")), int))
        multilingual = config.get("is_multilingual")
        return cls(eot=pick("eos_token_id", END_OF_TEXT), sot=pick("decoder_start_token_id", START_OF_TRANSCRIPT),
                   no_timestamps=pick("no_timestamps_token_id", NO_TIMESTAMPS),
                   sot_prev=pick("prev_sot_token_id", START_OF_PREVIOUS, required=False),
                   language_ids=languages, task_ids=tasks,
                   multilingual=bool(multilingual) if multilingual is not None else bool(lang_to_id))

    @classmethod
    def from_vocabulary(cls, vocabulary: Sequence[str], generation_config: Mapping[str, Any] | None = None,
                        ) -> "WhisperTokens":
        """A vocabulary as a list of token strings (a CTranslate2 folder's), the first of equal strings winning."""
        ids: dict[str, int] = {}
        for index, token in enumerate(vocabulary):
            ids.setdefault(token, index)
        return cls.from_sources(generation_config, ids.get)


def _as_dict(generation_config) -> dict[str, Any]:
    """A generation_config.json dict, or a GenerationConfig (its fields, then the keys it keeps in `extra`)."""
    if generation_config is None:
        return {}
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    return {**generation_config.extra, "eos_token_id": generation_config.eos_token_id,
            "decoder_start_token_id": generation_config.decoder_start_token_id}
