"""text2text-generation, summarization and translation: a text -> a new text, with an encoder-decoder model
(BART, T5).

The three pipelines are transformers 4.x's (transformers 5 dropped them) and differ only in their output key
("generated_text", "summary_text", "translation_text"; "..._token_ids" with return_tensors) and in which entry of
config.json's `task_specific_params` they read. That entry holds the task's generation settings (BART-CNN's
summarization: 4 beams, no_repeat_ngram_size 3, min_length 56, max_length 142, length_penalty 2, early_stopping) and
for T5 the text prefix that names the task ("summarize: ", "translate English to German: "). Generation options
come, in order of precedence, from the call, the pipeline's construction, that entry, and the checkpoint's
generation config.

preprocess tokenizes prefix + text (cut to the encoder's length with truncation=True, an InvalidInput without);
forward encodes a right-padded batch, whose encoder mask keeps every row equal to its text alone, and runs
lightpipe.generation from the decoder start token; postprocess decodes without special tokens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import checks
from ..config import read_json_object
from ..errors import InvalidInput, UnsupportedModel
from ..generation import GenerationConfig, generate
from ..runtime import ModelItem, Padding, is_error_record
from .base import TextPipeline
from .text_generation import GENERATION_OPTIONS, IGNORED_OPTIONS, _until_end

TRANSLATION_TASK = re.compile(r"^translation_([^_]+)_to_([^_]+)$")  # translation_en_to_de
NO_LIMIT = 10**9  # TextPipeline.max_positions when neither the model nor the tokenizer bounds the input
logger = logging.getLogger(__name__)


class Text2TextGenerationPipeline(TextPipeline):
    task = "text2text-generation"
    return_name: ClassVar[str] = "generated"
    components: ClassVar[tuple[str, ...]] = ("tokenizer", "generation_config")
    preprocess_params = ("truncation",)
    forward_params = GENERATION_OPTIONS + ("generate_kwargs",) + IGNORED_OPTIONS
    postprocess_params = ("return_tensors", "return_text", "clean_up_tokenization_spaces")

    def __init__(self, model, tokenizer=None, *, generation_config: GenerationConfig | None = None, folder=None,
                 **params):
        if not callable(getattr(model, "encode", None)) or not callable(getattr(model, "decode_step", None)):
            raise UnsupportedModel(f"{self.task} needs an encoder-decoder model with a language-model head (BART, "
                                   f"T5), not {type(model).__name__}.")
        self.generation_config = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
        raw = _raw_config(folder or getattr(model, "name_or_path", None))
        task_params = raw.get("task_specific_params")
        self.task_specific_params: dict[str, dict] = task_params if isinstance(task_params, dict) else {}
        self.config_prefix = raw.get("prefix") if isinstance(raw.get("prefix"), str) else ""
        super().__init__(model, tokenizer, folder=folder, **params)

    # ------------------------------------------------------------------ task settings
    def task_key(self, params: Mapping[str, Any]) -> str:
        """The task_specific_params entry this call reads (translation picks it by language pair)."""
        return self.task

    def task_settings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        settings = self.task_specific_params.get(self.task_key(params))
        return dict(settings) if isinstance(settings, dict) else {}

    def prefix(self, params: Mapping[str, Any]) -> str:
        """The text put before every input: the task's (T5: "summarize: "), else config.json's own prefix."""
        prefix = self.task_settings(params).get("prefix")
        return prefix if isinstance(prefix, str) else self.config_prefix

    # ------------------------------------------------------------------ parameters
    def collate_padding(self) -> Padding:
        # Encoder inputs are padded on the right; the encoder mask hides the padding from both stacks.
        pad = self.tokenizer.pad_token_id
        return Padding(values={"input_ids": pad if pad is not None else 0, "attention_mask": 0}, side="right")

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        for name in ("return_tensors", "return_text", "clean_up_tokenization_spaces", "truncation"):
            checks.flag(name, params.get(name))
        forward = {k: v for k, v in params.items() if k in self.forward_params}
        if forward:
            self.generation_options(forward)  # raises InvalidInput before any work

    def prepare_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"config": self.generation_options(params)}

    def generation_options(self, forward: Mapping[str, Any]) -> GenerationConfig:
        """The call's forward parameters -> the GenerationConfig to decode with."""
        forward = {k: v for k, v in forward.items() if k not in IGNORED_OPTIONS}
        settings = self.task_settings(forward)
        for name in ("src_lang", "tgt_lang"):
            forward.pop(name, None)
        extra = forward.pop("generate_kwargs", None) or {}
        if not isinstance(extra, Mapping):
            raise InvalidInput(f"generate_kwargs must be a dict, not {type(extra).__name__}.")
        extra = {k: v for k, v in extra.items() if k not in IGNORED_OPTIONS}
        unknown = sorted(set(extra) - set(GENERATION_OPTIONS))
        if unknown:
            raise InvalidInput(f"unknown generation option(s) {', '.join(unknown)} in generate_kwargs; "
                               f"known: {', '.join(GENERATION_OPTIONS)}.")
        chosen = {k: v for k, v in settings.items() if k in GENERATION_OPTIONS}
        if self.generation_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            chosen["pad_token_id"] = self.tokenizer.pad_token_id
        chosen.update({k: v for k, v in {**extra, **forward}.items() if v is not None})
        if isinstance(chosen.get("bad_words_ids"), list):
            chosen["bad_words_ids"] = [tuple(x) if isinstance(x, list) else x for x in chosen["bad_words_ids"]]
        return self.generation_config.replace(**chosen)

    # ------------------------------------------------------------------ calling
    def __call__(self, inputs, **params):
        """One text -> [{"<name>_text": ...}] (one dict per returned sequence); a list of texts -> one dict per text,
        or a list per text when several sequences are returned (transformers 4.x's shapes)."""
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise InvalidInput("no input given: pass a text or a list of texts.")
        results = super().__call__(inputs, **params)
        if isinstance(inputs, (list, tuple)) and all(is_error_record(r) or len(r) == 1 for r in results):
            return [r if is_error_record(r) else r[0] for r in results]  # on_error='record' keeps its records
        return results

    # ------------------------------------------------------------------ the three stages
    def preprocess(self, inputs, truncation=None, **params):
        text = self.prefix(params) + self.check_text(inputs)
        limit = self.max_positions
        cut = bool(truncation) and limit < NO_LIMIT
        ids = self.tokenizer.encode(text, truncation=True if cut else None, max_length=limit if cut else None).ids
        if len(ids) > limit:
            raise InvalidInput(f"the input is {len(ids)} tokens long, {len(ids) - limit} more than this model's "
                               f"encoder takes ({limit}): shorten it, or pass truncation=True to cut its end.")
        features = {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.ones(len(ids), dtype=torch.long)}
        return [ModelItem(features)]

    def forward(self, batch, config: GenerationConfig):
        mask = batch["attention_mask"]
        encoder_hidden = self.model.encode(batch["input_ids"], mask)
        rows = batch["input_ids"].shape[0]
        start = torch.full((rows, 1), self._start_token(config), dtype=torch.long, device=mask.device)
        out = generate(self.model, start, config, encoder_hidden=encoder_hidden, encoder_attention_mask=mask)
        n, ends = config.num_return_sequences, config.eos_token_ids
        # The start token, then the generated tokens up to the first end (the rest of a row is padding), so that a
        # text's tokens never depend on the batch it ran in.
        sequences = [[start[0, 0].item()] + _until_end(row, ends) for row in out.generated.tolist()]
        return {"sequences": [sequences[i * n:(i + 1) * n] for i in range(rows)]}

    def _start_token(self, config: GenerationConfig) -> int:
        for candidate in (config.decoder_start_token_id, getattr(self.model.config, "decoder_start_token_id", None),
                          config.bos_token_id):
            if candidate is not None:
                return candidate
        raise UnsupportedModel("neither generation_config.json nor config.json names decoder_start_token_id: "
                               "pass decoder_start_token_id=... to the pipeline.")

    def postprocess(self, outputs, metas, return_tensors=None, return_text=None, clean_up_tokenization_spaces=None):
        records = []
        for ids in outputs[0]["sequences"]:
            if return_tensors:
                records.append({f"{self.return_name}_token_ids": ids})
            else:
                # transformers 4.x's seq2seq pipelines decoded without the clean-up unless asked for it.
                text = self.tokenizer.decode(ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=bool(clean_up_tokenization_spaces))
                records.append({f"{self.return_name}_text": text})
        return records


class SummarizationPipeline(Text2TextGenerationPipeline):
    task = "summarization"
    return_name = "summary"


class TranslationPipeline(Text2TextGenerationPipeline):
    """translation, or translation_xx_to_yy: the language pair picks the task_specific_params entry (T5's prefix
    "translate English to German: "). A pair the checkpoint has no entry for runs without a prefix, as in
    transformers 4.x."""

    task = "translation"
    return_name = "translation"
    preprocess_params = Text2TextGenerationPipeline.preprocess_params + ("src_lang", "tgt_lang")
    forward_params = Text2TextGenerationPipeline.forward_params + ("src_lang", "tgt_lang")

    @classmethod
    def for_task(cls, name: str) -> type:
        """The pipeline class of a task name: translation_en_to_de gives a TranslationPipeline for that pair."""
        if name == cls.task:
            return cls
        return type(cls.__name__, (cls,), {"task": name, "__module__": cls.__module__})

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        for name in ("src_lang", "tgt_lang"):
            value = params.get(name)
            if value is not None and not (isinstance(value, str) and value and "_" not in value):
                raise InvalidInput(f"{name} must be a language code such as 'en', not {value!r}.")

    def task_key(self, params: Mapping[str, Any]) -> str:
        src, tgt = params.get("src_lang"), params.get("tgt_lang")
        if (src is None) != (tgt is None):
            raise InvalidInput("give both src_lang and tgt_lang (e.g. src_lang='en', tgt_lang='de'), or neither.")
        if src is not None:
            return f"translation_{src}_to_{tgt}"
        if self.task != "translation":
            return self.task
        # Plain "translation": transformers 4.x took the checkpoint's first language pair.
        pairs = [key for key in self.task_specific_params if TRANSLATION_TASK.match(key)]
        if pairs:
            if pairs[0] not in _warned_pairs:
                _warned_pairs.add(pairs[0])
                logger.warning("task 'translation' without a language pair: using %s, the checkpoint's first.",
                               pairs[0])
            return pairs[0]
        return self.task


_warned_pairs: set[str] = set()


def translation_pair(name: str) -> tuple[str, str] | None:
    """"translation_en_to_de" -> ("en", "de"); None for another task name. A name that starts like a translation
    task but is not in this form is an InvalidInput."""
    if not name.startswith("translation_"):
        return None
    match = TRANSLATION_TASK.match(name)
    if match is None:
        raise InvalidInput(f"invalid translation task {name!r}: use the form 'translation_XX_to_YY', e.g. "
                           "'translation_en_to_de'.")
    return match.group(1), match.group(2)


def _raw_config(folder) -> dict[str, Any]:
    """config.json of the checkpoint folder as a dict ({} for a model not loaded from a folder)."""
    if not folder:
        return {}
    return read_json_object(Path(folder) / "config.json") or {}
