"""One 30-second window of Whisper decoding over lightpipe.generation: the prompt rules (start of transcript,
language, task, timestamps, previous text), language detection, and `whisper_generate`, which adds Whisper's
length rule and timestamp processor to a plain `generate()` call.

Every special id comes from one `WhisperTokens` (tokens.py). Functions take the checkpoint's GenerationConfig and,
optionally, the `WhisperTokens` the caller built from all its sources (the ASR pipeline builds one from the
tokenizer and generation_config.json); without one, the ids the GenerationConfig names are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidInput
from ..generation.generate import GenerationConfig, GenerationOutput, generate
from .alignment import AlignmentRecorder, recorded_weights
from .guards import RepetitionStop, check_max_ngram_repeats
from .timestamps import WhisperTimestamps
from .tokens import WhisperTokens


def tokens_of(generation_config: GenerationConfig, tokens: WhisperTokens | None = None) -> WhisperTokens:
    """The caller's tokens, else those the generation config names."""
    return tokens if tokens is not None else WhisperTokens.from_sources(generation_config)


# ----------------------------------------------------------------------------------------------
# Prompt rules


def check_prompt_options(generation_config: GenerationConfig, language=None, task=None,
                         return_timestamps: bool = False, *, tokens: WhisperTokens | None = None) -> None:
    """Raise InvalidInput for options the checkpoint cannot honour (before any audio is processed)."""
    tokens = tokens_of(generation_config, tokens)
    if not tokens.multilingual and (language is not None or task is not None):
        raise InvalidInput("this is an English-only Whisper model: it takes no language or task. Leave them unset, "
                           "or use a multilingual checkpoint.")
    if language is not None:
        tokens.language_token(language)
    if task is not None:
        tokens.task_token(task)


def needs_language_detection(generation_config: GenerationConfig, language=None, task=None, *,
                             tokens: WhisperTokens | None = None) -> bool:
    """Whether the language token must come from `detect_language`: a multilingual checkpoint, no language
    given, and none fixed by forced_decoder_ids (which apply only when neither language nor task is given)."""
    tokens = tokens_of(generation_config, tokens)
    if language is not None or not (tokens.multilingual and tokens.language_ids):
        return False
    forced = _forced_prompt(generation_config) if task is None else []
    return not forced or forced[0] is None


def _forced_prompt(generation_config: GenerationConfig) -> list[int | None]:
    """Tokens after <|startoftranscript|> that the legacy forced_decoder_ids fix (positions 1, 2, ...)."""
    forced = sorted(generation_config.extra.get("forced_decoder_ids") or (), key=lambda pair: pair[0])
    prompt = []
    for expected, (position, token) in enumerate(forced, start=1):
        if position != expected:
            raise InvalidInput(f"forced_decoder_ids {forced} must cover positions 1, 2, ... without gaps.")
        prompt.append(token)
    return prompt


def whisper_prompt(generation_config: GenerationConfig, language: str | int | None = None, task: str | None = None,
                   return_timestamps: bool = False, prompt_ids: Sequence[int] | None = None, *,
                   detected_language: int | None = None, tokens: WhisperTokens | None = None) -> list[int]:
    """The decoder prompt of one audio window, by the rules of transformers' Whisper generation:

    [<|startofprev|> prompt_ids...] <|startoftranscript|> [<|lang|>] [<|task|>] [<|notimestamps|>]

    English-only models take no language or task. Without language and task, the checkpoint's
    forced_decoder_ids apply. When `needs_language_detection`, pass the token id `detect_language` found as
    `detected_language` (a detected language, unlike a given one, does not add a default <|transcribe|>).
    A language without a task means transcribe. prompt_ids (previous text) get <|startofprev|> in front if
    they lack it.
    """
    tokens = tokens_of(generation_config, tokens)
    check_prompt_options(generation_config, language, task, return_timestamps, tokens=tokens)
    prompt: list[int | None] = [tokens.sot]
    if task is None and language is None:
        prompt += _forced_prompt(generation_config)
    if language is not None:
        lang = tokens.language_token(language)
    elif needs_language_detection(generation_config, None, task, tokens=tokens):
        if detected_language is None:
            raise InvalidInput("this multilingual model needs a language: pass language=..., or detect it first "
                               "with detect_language(model, encoder_hidden, generation_config) and pass the id it "
                               "returns as detected_language.")
        lang = tokens.language_token(detected_language)
    else:
        lang = None
    if lang is not None:
        if len(prompt) > 1:
            prompt[1] = lang
        else:
            prompt.append(lang)
    task_ids = dict(tokens.task_ids)
    if task is not None:
        prompt.append(tokens.task_token(task))
    elif language is not None and task_ids and not any(t in task_ids.values() for t in prompt):
        prompt.append(task_ids["transcribe"])
    if not return_timestamps and prompt[-1] != tokens.no_timestamps:
        prompt.append(tokens.no_timestamps)
    elif return_timestamps and prompt[-1] == tokens.no_timestamps:
        prompt.pop()
    prompt = [t for t in prompt if t is not None]
    if prompt_ids is not None:
        previous = [int(t) for t in prompt_ids]
        if tokens.sot_prev is not None and (not previous or previous[0] != tokens.sot_prev):
            previous = [tokens.sot_prev] + previous
        prompt = previous + prompt
    return prompt


# ----------------------------------------------------------------------------------------------
# Decoding


def detect_language(model, encoder_hidden: torch.Tensor, generation_config: GenerationConfig, *,
                    tokens: WhisperTokens | None = None) -> list[int]:
    """The most likely language token id of each audio: one decoder step from <|startoftranscript|>, restricted
    to the language tokens."""
    tokens = tokens_of(generation_config, tokens)
    if not (tokens.multilingual and tokens.language_ids):
        raise InvalidInput("this Whisper checkpoint has no language tokens (English-only): nothing to detect.")
    batch = encoder_hidden.shape[0]
    start = torch.full((batch, 1), tokens.sot, dtype=torch.long, device=encoder_hidden.device)
    with torch.inference_mode():
        cache = model.new_cache(batch, 1, encoder_hidden=encoder_hidden)
        logits = model.decode_step(start, cache)[:, -1]  # (B, V)
    languages = torch.tensor(sorted(i for _, i in tokens.language_ids), device=logits.device)
    return languages[logits.index_select(1, languages).argmax(dim=-1)].tolist()


def whisper_generate(model, encoder_hidden: torch.Tensor, generation_config: GenerationConfig, *,
                     language: str | int | Sequence | None = None, task: str | None = None,
                     return_timestamps: bool = False, prompt_ids: Sequence[int] | None = None,
                     temperature: float | None = None, on_token=None, generator: torch.Generator | None = None,
                     detected_language: Sequence[int] | None = None, tokens: WhisperTokens | None = None,
                     alignment_heads: Sequence[Sequence[int]] | None = None,
                     max_ngram_repeats: int | None = None,
                     compression_stop: float | None = None) -> GenerationOutput:
    """Decode one window per audio, as transformers' WhisperForConditionalGeneration.generate does for audio
    up to 30 s: prompt (language detected per audio when needed), Whisper's suppressed tokens, timestamp rules
    with return_timestamps, and its length rule (max_length counted after the prompt, capped at the model's
    limit). `language` is one for all audio or a list with one per audio. `temperature` > 0 samples (one beam);
    None or 0 decodes greedily or with generation_config.num_beams. num_return_sequences decodes each audio that
    many times (as the reference does). prompt_ids is one list of previous-text tokens for all audio, or one list
    per audio (prompts of one length). Returns full sequences (prompt included); prompt_length says where the
    text starts. `detected_language` (one token id per audio) stands in for language detection when the caller
    has already detected it (sequential decoding detects once per audio, on its first window).

    With `alignment_heads` ((layer, head) pairs), returns (output, weights): the cross-attention probabilities
    of those heads, (N, len(alignment_heads), T - 1, S), along each returned sequence (see alignment.py).

    `max_ngram_repeats` ends a sequence whose text repeats one run of tokens more often than that, or (with
    `compression_stop`) whose text compresses better than that ratio (guards.py).
    """
    tokens = tokens_of(generation_config, tokens)
    batch = encoder_hidden.shape[0]
    languages = list(language) if isinstance(language, (list, tuple)) else [language] * batch
    if len(languages) != batch or any(lang is None for lang in languages) and language is not None:
        raise InvalidInput(f"language must be one language or a list of {batch} (one per audio), not {language!r}.")
    for lang in set(languages):
        check_prompt_options(generation_config, lang, task, return_timestamps, tokens=tokens)
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise InvalidInput(f"temperature must be a non-negative number, not {temperature!r}.")
    recorder = None if alignment_heads is None else AlignmentRecorder(model, alignment_heads)
    detected = [None] * batch
    if language is None and needs_language_detection(generation_config, None, task, tokens=tokens):
        if detected_language is not None and len(detected_language) != batch:
            raise InvalidInput(f"detected_language must hold one token id per audio ({batch}).")
        detected = (list(detected_language) if detected_language is not None
                    else detect_language(model, encoder_hidden, generation_config, tokens=tokens))
    per_audio = prompt_ids is not None and len(prompt_ids) > 0 and isinstance(prompt_ids[0], (list, tuple))
    if per_audio and len(prompt_ids) != batch:
        raise InvalidInput(f"prompt_ids given per audio must hold {batch} lists (one per audio).")
    previous = list(prompt_ids) if per_audio else [prompt_ids] * batch
    prompts = [whisper_prompt(generation_config, lang, task, return_timestamps, ids, detected_language=found,
                              tokens=tokens)
               for lang, found, ids in zip(languages, detected, previous)]
    prompt_length = len(prompts[0])
    if any(len(p) != prompt_length for p in prompts):
        raise InvalidInput("prompt_ids given per audio must give prompts of one length.")
    copies = generation_config.num_return_sequences
    if copies > 1:
        # As the reference: each audio is decoded `copies` times, one sequence each (distinct only when sampling).
        encoder_hidden = encoder_hidden.repeat_interleave(copies, dim=0)
        prompts = [prompt for prompt in prompts for _ in range(copies)]

    config = generation_config.replace(**_window_options(generation_config, model, temperature, prompt_length))
    processors = []
    if return_timestamps:
        eos = config.eos_token_ids[0] if config.eos_token_ids else config.bos_token_id
        processors.append(WhisperTimestamps(tokens.no_timestamps, eos, prompt_length,
                                            generation_config.extra.get("max_initial_timestamp_index")))
    if max_ngram_repeats is not None:
        eos = config.eos_token_ids[0] if config.eos_token_ids else tokens.eot
        processors.append(RepetitionStop(check_max_ngram_repeats(max_ngram_repeats), eos, prompt_length, tokens.eot,
                                         compression_stop, model.config.vocab_size))
    out = generate(recorder or model, prompts, config, encoder_hidden=encoder_hidden, processors=processors,
                   on_token=on_token, generator=generator)
    if recorder is None:
        return out
    return out, recorded_weights(recorder.steps, out.beam_indices)


def _window_options(generation_config: GenerationConfig, model, temperature, prompt_length: int) -> dict:
    """Sampling at a temperature > 0 (one beam), else the config's search; and Whisper's length rule."""
    sampling = temperature is not None and temperature > 0
    options = {"do_sample": sampling, "temperature": float(temperature) if sampling else 1.0,
               "num_return_sequences": 1}
    if sampling:
        options["num_beams"] = 1
    limit = model.config.max_target_positions
    if generation_config.max_new_tokens is None and generation_config.max_length is not None:
        # Whisper counts max_length after the prompt (up to half the context), within the model's limit.
        options["max_length"] = min(generation_config.max_length + min(limit // 2 - 1, prompt_length), limit)
    return options
