"""Whisper: a log-mel audio encoder, a text decoder that reads it through cross-attention, and the prompt
rules of Whisper decoding (start of transcript, language, task, timestamps).

Attribute names equal the keys of Hugging Face Whisper checkpoints. The decoder runs one step at a time
against an explicit `KVCache` (lightpipe.generation): self-attention keys/values are appended step by step,
cross-attention keys/values are computed once per audio in `new_cache` and shared by all beams.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from ..generation.generate import GenerationConfig, GenerationOutput, generate
from ..generation.processors import WhisperTimestamps
from .layers import (EncoderDecoderCache, Embedding, activation, cached_attention, cross_attention, linear, merge_heads,
                     split_heads, vocab_logits)


@dataclasses.dataclass
class WhisperConfig(BaseConfig):
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames after the stride-2 convolution: 30 s of audio
    max_target_positions: int = 448
    activation_function: str = "gelu"
    scale_embedding: bool = False  # read for completeness: Whisper never scales its embeddings
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    decoder_start_token_id: int = 50257
    # Generation settings that checkpoints written before generation_config.json kept in config.json.
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_decoder_ids: list | None = None
    median_filter_width: int = 7  # smoothing of alignment weights for word timestamps

    def __post_init__(self) -> None:
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise UnsupportedModel(f"d_model ({self.d_model}) must be a multiple of the attention heads ({heads}).")
        activation(self.activation_function)  # unknown names fail at load time

    @property
    def frames(self) -> int:
        """Log-mel frames the encoder takes: two per encoder position (3000 for 30 s)."""
        return 2 * self.max_source_positions


# ----------------------------------------------------------------------------------------------
# Layers

class WhisperAttention(nn.Module):
    """Multi-head attention. Keys have no bias. Queries are scaled before the dot product (in Whisper's
    order, which matters at float32 precision), so SDPA runs with scale 1."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scaling = (d_model // num_heads) ** -0.5
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D), pre-scaled."""
        return split_heads(linear(x, self.q_proj) * self.scaling, self.num_heads)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) -> keys and values, each (B, H, S, D)."""
        return split_heads(linear(x, self.k_proj), self.num_heads), split_heads(linear(x, self.v_proj), self.num_heads)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, C)."""
        return linear(merge_heads(heads), self.out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bidirectional self-attention (the encoder's): (B, T, C) -> (B, T, C)."""
        k, v = self.keys_values(x)
        return self.output(F.scaled_dot_product_attention(self.queries(x), k, v, scale=1.0))


def _clamp_half(x: torch.Tensor) -> torch.Tensor:
    # float16 activations can overflow in deep encoders; keep them finite (as the reference does).
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(min=-limit, max=limit)
    return x


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.act = config.activation_function
        self.self_attn = WhisperAttention(config.d_model, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + linear(linear(self.final_layer_norm(x), self.fc1, self.act), self.fc2)
        return _clamp_half(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.act = config.activation_function
        self.self_attn = WhisperAttention(config.d_model, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = WhisperAttention(config.d_model, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, cache: EncoderDecoderCache, index: int, mask, heads: list[int] | None):
        """x: (B, t, C) the new positions -> (B, t, C), and the chosen heads' cross-attention weights or None."""
        h = self.self_attn_layer_norm(x)
        k, v = cache.update(index, *self.self_attn.keys_values(h))  # (B, H, length + t, D)
        x = x + self.self_attn.output(cached_attention(self.self_attn.queries(h), k, v, mask, scale=1.0))
        enc_k, enc_v = cache.cross[index]
        h = self.encoder_attn_layer_norm(x)
        attended, weights = cross_attention(self.encoder_attn.queries(h), enc_k, enc_v, scale=1.0, heads=heads)
        x = x + self.encoder_attn.output(attended)
        x = x + linear(linear(self.final_layer_norm(x), self.fc1, self.act), self.fc2)
        return x, weights


# ----------------------------------------------------------------------------------------------
# Encoder and decoder


class WhisperEncoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = Embedding(config.max_source_positions, config.d_model)  # sinusoids, stored
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, num_mel_bins, 2 * max_source_positions) log-mel features -> (B, max_source_positions, C)."""
        check_features(input_features, self.config)
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # (B, C, S)
        x = x.transpose(1, 2) + self.embed_positions.weight  # (B, S, C)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def check_features(features: torch.Tensor, config: WhisperConfig) -> None:
    expected = (config.num_mel_bins, config.frames)
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or tuple(features.shape[1:]) != expected:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InvalidInput(
            f"Whisper takes log-mel features of shape (batch, {expected[0]}, {expected[1]}), not {shape}: pad or cut "
            f"the audio to {config.frames // 100} s before computing features."
        )


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.d_model)
        self.embed_positions = Embedding(config.max_target_positions, config.d_model)  # learned
        self.layers = nn.ModuleList(WhisperDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, tokens: torch.Tensor, cache: EncoderDecoderCache, positions: torch.Tensor | None = None,
                alignment_heads: Sequence[tuple[int, int]] | None = None):
        """tokens (B, t) -> hidden states (B, t, C), and (B, len(alignment_heads), t, S) cross-attention
        probabilities of the (layer, head) pairs asked for (None without)."""
        t = tokens.shape[1]
        cache.check_room(t)
        if positions is None:
            positions = cache.positions(t)
        x = self.embed_tokens(tokens) + self.embed_positions.weight[positions]  # (B, t, C)
        mask = cache.attention_mask(t)
        by_layer: dict[int, list[int]] = {}
        for layer, head in alignment_heads or ():
            by_layer.setdefault(layer, []).append(head)
        collected = {}
        for index, layer in enumerate(self.layers):
            x, weights = layer(x, cache, index, mask, by_layer.get(index))
            if weights is not None:
                collected[index] = weights
        cache.advance(t)
        if alignment_heads is None:
            return self.layer_norm(x), None
        picked = [collected[layer][:, by_layer[layer].index(head)] for layer, head in alignment_heads]
        return self.layer_norm(x), torch.stack(picked, dim=1)


# ----------------------------------------------------------------------------------------------
# Models


class WhisperModel(nn.Module):
    """Encoder and decoder without the language-model head: returns the decoder's last hidden state."""

    config_class = WhisperConfig
    base_model_prefix = "model"

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder_hidden = self.encoder(input_features)
        cache = _new_cache(self.config, self.decoder, decoder_input_ids.shape[0], decoder_input_ids.shape[1],
                           encoder_hidden)
        hidden, _ = self.decoder(decoder_input_ids, cache)
        return {"last_hidden_state": hidden, "encoder_last_hidden_state": encoder_hidden}


def _new_cache(config: WhisperConfig, decoder: WhisperDecoder, rows: int, max_length: int,
               encoder_hidden: torch.Tensor) -> EncoderDecoderCache:
    if encoder_hidden is None or encoder_hidden.dim() != 3:
        raise InvalidInput("Whisper's decoder needs encoder_hidden (batch, frames, d_model) from model.encode().")
    batch = encoder_hidden.shape[0]
    if rows % batch:
        raise InvalidInput(f"{rows} decoder rows cannot share {batch} encoder outputs: rows must be a multiple.")
    if max_length > config.max_target_positions:
        raise InvalidInput(f"Whisper decodes at most {config.max_target_positions} tokens, not {max_length}.")
    weight = decoder.embed_tokens.weight
    heads = config.decoder_attention_heads
    cache = EncoderDecoderCache(config.decoder_layers, rows, heads, config.d_model // heads, max_length,
                    dtype=weight.dtype, device=weight.device)
    encoder_hidden = encoder_hidden.to(weight.dtype)
    for index, layer in enumerate(decoder.layers):
        # Once per audio, shared by its rows; contiguous, so that attention does not copy them at every step.
        k, v = layer.encoder_attn.keys_values(encoder_hidden)
        cache.cross[index] = (k.contiguous(), v.contiguous())
    return cache


class WhisperForConditionalGeneration(nn.Module):
    """Whisper with its language-model head (`proj_out`, tied to the token embeddings): speech to text.

    Decoding protocol (see lightpipe.generation.generate): `encode`, `new_cache`, `decode_step`.
    """

    config_class = WhisperConfig
    base_model_prefix = "model"
    tied_weights = {"proj_out.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.model = WhisperModel(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @property
    def max_positions(self) -> int:
        return self.config.max_target_positions

    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, num_mel_bins, frames) log-mel features -> (B, max_source_positions, C) encoder states."""
        return self.model.encoder(input_features)

    def new_cache(self, rows: int, max_length: int, encoder_hidden: torch.Tensor | None = None) -> EncoderDecoderCache:
        """An empty decoder cache for `rows` sequences (a multiple of the encoder batch: beams or samples of one
        audio are adjacent rows) of up to `max_length` tokens; cross-attention keys/values computed here, once."""
        return _new_cache(self.config, self.model.decoder, rows, max_length, encoder_hidden)

    def decode_step(self, tokens: torch.Tensor, cache: EncoderDecoderCache, positions: torch.Tensor | None = None, *,
                    alignment_heads: Sequence[tuple[int, int]] | None = None, last_only: bool = False):
        """tokens (B, t) appended to the cache -> logits (B, t, V) (only the last position's, (B, 1, V), with
        last_only). With alignment_heads, returns (logits, (B, len(alignment_heads), t, S) cross-attention
        probabilities of those (layer, head) pairs)."""
        hidden, weights = self.model.decoder(tokens, cache, positions, alignment_heads)
        if last_only:
            hidden = hidden[:, -1:]
        logits = vocab_logits(hidden, self.proj_out)
        return logits if alignment_heads is None else (logits, weights)

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced logits (B, T, V) of every decoder position (no generation)."""
        encoder_hidden = self.encode(input_features)
        cache = self.new_cache(decoder_input_ids.shape[0], decoder_input_ids.shape[1], encoder_hidden)
        return {"logits": self.decode_step(decoder_input_ids, cache), "encoder_last_hidden_state": encoder_hidden}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Whisper checkpoints already use these names; `proj_out.weight`, when a checkpoint omits it,
    comes from the tied token embeddings (see `tied_weights`)."""
    return state_dict


ARCHITECTURES = {
    "WhisperForConditionalGeneration": WhisperForConditionalGeneration,
    "WhisperModel": WhisperModel,
}
HEADS = {
    "speech-seq2seq": WhisperForConditionalGeneration,
    "base": WhisperModel,
}
Config = WhisperConfig


# ----------------------------------------------------------------------------------------------
# Decoding rules: prompts, language, and one 30-second window

TASKS = ("translate", "transcribe")

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
# English name (and common other names) -> code.
LANGUAGE_CODES = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb", "pushto": "ps",
    "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}


def is_multilingual(generation_config: GenerationConfig) -> bool:
    """English-only checkpoints say is_multilingual=false (or have no language tokens)."""
    extra = generation_config.extra
    if "is_multilingual" in extra:
        return bool(extra["is_multilingual"])
    return bool(extra.get("lang_to_id"))


def language_token(generation_config: GenerationConfig, language: str | int) -> int:
    """'en', 'english', '<|en|>' (or a language token id) -> the language token id of this checkpoint."""
    lang_to_id = generation_config.extra.get("lang_to_id") or {}
    if not lang_to_id:
        raise InvalidInput("this checkpoint's generation_config.json has no lang_to_id: it cannot take a language.")
    if isinstance(language, int) and not isinstance(language, bool):
        if language not in lang_to_id.values():
            raise InvalidInput(f"token id {language} is not a language token of this checkpoint.")
        return language
    if not isinstance(language, str):
        raise InvalidInput(f"language must be a string such as 'en', 'english' or '<|en|>', not {language!r}.")
    name = language.lower().strip()
    if name in lang_to_id:
        token = name
    elif name in LANGUAGE_CODES:
        token = f"<|{LANGUAGE_CODES[name]}|>"
    elif name in LANGUAGES:
        token = f"<|{name}|>"
    else:
        raise InvalidInput(f"unknown language {language!r}; use a code ({', '.join(list(LANGUAGES)[:8])}, ...) or an "
                           f"English name ({', '.join(list(LANGUAGE_CODES)[:5])}, ...).")
    if token not in lang_to_id:
        raise InvalidInput(f"{token} is not a language of this checkpoint (see lang_to_id in generation_config.json).")
    return int(lang_to_id[token])


def _check_task(generation_config: GenerationConfig, task: str | None) -> int | None:
    if task is None:
        return None
    if task not in TASKS:
        raise InvalidInput(f"task must be 'transcribe' or 'translate', not {task!r}.")
    task_to_id = generation_config.extra.get("task_to_id") or {}
    if task not in task_to_id:
        raise InvalidInput("this checkpoint's generation_config.json has no task_to_id: it cannot take a task.")
    return int(task_to_id[task])


def check_prompt_options(generation_config: GenerationConfig, language=None, task=None,
                         return_timestamps: bool = False) -> None:
    """Raise InvalidInput for options the checkpoint cannot honour (before any audio is processed)."""
    if not is_multilingual(generation_config) and (language is not None or task is not None):
        raise InvalidInput("this is an English-only Whisper model: it takes no language or task. Leave them unset, "
                           "or use a multilingual checkpoint.")
    if language is not None:
        language_token(generation_config, language)
    _check_task(generation_config, task)
    if return_timestamps and "no_timestamps_token_id" not in generation_config.extra:
        raise InvalidInput("this checkpoint's generation_config.json has no no_timestamps_token_id: it cannot "
                           "predict timestamps.")


def needs_language_detection(generation_config: GenerationConfig, language=None, task=None) -> bool:
    """Whether the language token must come from `detect_language`: a multilingual checkpoint, no language
    given, and none fixed by forced_decoder_ids (which apply only when neither language nor task is given)."""
    if language is not None or not generation_config.extra.get("lang_to_id"):
        return False
    forced = _forced_prompt(generation_config) if task is None else []
    return not forced or forced[0] is None


def _forced_prompt(generation_config: GenerationConfig) -> list[int | None]:
    """Tokens after <|startoftranscript|> that the legacy forced_decoder_ids fix (positions 1, 2, ...)."""
    forced = sorted(generation_config.extra.get("forced_decoder_ids") or (), key=lambda pair: pair[0])
    tokens = []
    for expected, (position, token) in enumerate(forced, start=1):
        if position != expected:
            raise InvalidInput(f"forced_decoder_ids {forced} must cover positions 1, 2, ... without gaps.")
        tokens.append(token)
    return tokens


def whisper_prompt(generation_config: GenerationConfig, language: str | int | None = None, task: str | None = None,
                   return_timestamps: bool = False, prompt_ids: Sequence[int] | None = None, *,
                   detected_language: int | None = None) -> list[int]:
    """The decoder prompt of one audio window, by the rules of transformers' Whisper generation:

    [<|startofprev|> prompt_ids...] <|startoftranscript|> [<|lang|>] [<|task|>] [<|notimestamps|>]

    English-only models take no language or task. Without language and task, the checkpoint's
    forced_decoder_ids apply. When `needs_language_detection`, pass the token id `detect_language` found as
    `detected_language` (a detected language, unlike a given one, does not add a default <|transcribe|>).
    A language without a task means transcribe. prompt_ids (previous text) get <|startofprev|> in front if
    they lack it.
    """
    check_prompt_options(generation_config, language, task, return_timestamps)
    if generation_config.decoder_start_token_id is None:
        raise InvalidInput("the generation config has no decoder_start_token_id (<|startoftranscript|>).")
    tokens: list[int | None] = [generation_config.decoder_start_token_id]
    if task is None and language is None:
        tokens += _forced_prompt(generation_config)
    if language is not None:
        lang = language_token(generation_config, language)
    elif needs_language_detection(generation_config, None, task):
        if detected_language is None:
            raise InvalidInput("this multilingual model needs a language: pass language=..., or detect it first "
                               "with detect_language(model, encoder_hidden, generation_config) and pass the id it "
                               "returns as detected_language.")
        lang = language_token(generation_config, detected_language)
    else:
        lang = None
    if lang is not None:
        if len(tokens) > 1:
            tokens[1] = lang
        else:
            tokens.append(lang)
    task_to_id = generation_config.extra.get("task_to_id") or {}
    if task is not None:
        tokens.append(_check_task(generation_config, task))
    elif language is not None and task_to_id and not any(t in task_to_id.values() for t in tokens):
        tokens.append(int(task_to_id["transcribe"]))
    no_timestamps = generation_config.extra.get("no_timestamps_token_id")
    if not return_timestamps and no_timestamps is not None and tokens[-1] != no_timestamps:
        tokens.append(no_timestamps)
    elif return_timestamps and tokens[-1] == no_timestamps:
        tokens.pop()
    tokens = [t for t in tokens if t is not None]
    if prompt_ids is not None:
        previous = [int(t) for t in prompt_ids]
        start_of_previous = generation_config.extra.get("prev_sot_token_id")
        if start_of_previous is not None and (not previous or previous[0] != start_of_previous):
            previous = [start_of_previous] + previous
        tokens = previous + tokens
    return tokens


def detect_language(model: WhisperForConditionalGeneration, encoder_hidden: torch.Tensor,
                    generation_config: GenerationConfig) -> list[int]:
    """The most likely language token id of each audio: one decoder step from <|startoftranscript|>, restricted
    to the language tokens."""
    lang_to_id = generation_config.extra.get("lang_to_id") or {}
    if not lang_to_id:
        raise InvalidInput("this Whisper checkpoint has no language tokens (English-only): nothing to detect.")
    batch = encoder_hidden.shape[0]
    start = torch.full((batch, 1), generation_config.decoder_start_token_id, dtype=torch.long,
                       device=encoder_hidden.device)
    with torch.inference_mode():
        logits = model.decode_step(start, model.new_cache(batch, 1, encoder_hidden))[:, -1]  # (B, V)
    languages = torch.tensor(sorted(lang_to_id.values()), device=logits.device)
    return languages[logits.index_select(1, languages).argmax(dim=-1)].tolist()


def whisper_generate(model: WhisperForConditionalGeneration, encoder_hidden: torch.Tensor,
                     generation_config: GenerationConfig, *, language: str | int | Sequence | None = None,
                     task: str | None = None, return_timestamps: bool = False,
                     prompt_ids: Sequence[int] | None = None, temperature: float | None = None,
                     on_token=None, generator: torch.Generator | None = None,
                     detected_language: Sequence[int] | None = None) -> GenerationOutput:
    """Decode one window per audio, as transformers' WhisperForConditionalGeneration.generate does for audio
    up to 30 s: prompt (language detected per audio when needed), Whisper's suppressed tokens, timestamp rules
    with return_timestamps, and its length rule (max_length counted after the prompt, capped at the model's
    limit). `language` is one for all audio or a list with one per audio. `temperature` > 0 samples (one beam);
    None or 0 decodes greedily or with generation_config.num_beams. num_return_sequences decodes each audio that
    many times (as the reference does). prompt_ids is one list of previous-text tokens for all audio, or one list
    per audio (prompts of one length). Returns full sequences (prompt included); prompt_length says where the
    text starts. `detected_language` (one token id per audio) stands in for language detection when the caller
    has already detected it (sequential decoding detects once per audio, on its first window).
    """
    batch = encoder_hidden.shape[0]
    languages = list(language) if isinstance(language, (list, tuple)) else [language] * batch
    if len(languages) != batch or any(lang is None for lang in languages) and language is not None:
        raise InvalidInput(f"language must be one language or a list of {batch} (one per audio), not {language!r}.")
    for lang in set(languages):
        check_prompt_options(generation_config, lang, task, return_timestamps)
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise InvalidInput(f"temperature must be a non-negative number, not {temperature!r}.")
    detected = [None] * batch
    if language is None and needs_language_detection(generation_config, None, task):
        if detected_language is not None and len(detected_language) != batch:
            raise InvalidInput(f"detected_language must hold one token id per audio ({batch}).")
        detected = (list(detected_language) if detected_language is not None
                    else detect_language(model, encoder_hidden, generation_config))
    per_audio = prompt_ids is not None and len(prompt_ids) > 0 and isinstance(prompt_ids[0], (list, tuple))
    if per_audio and len(prompt_ids) != batch:
        raise InvalidInput(f"prompt_ids given per audio must hold {batch} lists (one per audio).")
    previous = list(prompt_ids) if per_audio else [prompt_ids] * batch
    prompts = [whisper_prompt(generation_config, lang, task, return_timestamps, ids, detected_language=found)
               for lang, found, ids in zip(languages, detected, previous)]
    prompt_length = len(prompts[0])
    if any(len(p) != prompt_length for p in prompts):
        raise InvalidInput("prompt_ids given per audio must give prompts of one length.")
    copies = generation_config.num_return_sequences
    if copies > 1:
        # As the reference: each audio is decoded `copies` times, one sequence each (distinct only when sampling).
        encoder_hidden = encoder_hidden.repeat_interleave(copies, dim=0)
        prompts = [prompt for prompt in prompts for _ in range(copies)]

    sampling = temperature is not None and temperature > 0
    options = {"do_sample": sampling, "temperature": float(temperature) if sampling else 1.0,
               "num_return_sequences": 1}
    if sampling:
        options["num_beams"] = 1
    limit = model.config.max_target_positions
    if generation_config.max_new_tokens is None and generation_config.max_length is not None:
        # Whisper counts max_length after the prompt (up to half the context), within the model's limit.
        options["max_length"] = min(generation_config.max_length + min(limit // 2 - 1, prompt_length), limit)
    config = generation_config.replace(**options)

    processors = []
    if return_timestamps:
        extra = generation_config.extra
        eos = config.eos_token_ids[0] if config.eos_token_ids else config.bos_token_id
        processors.append(WhisperTimestamps(extra["no_timestamps_token_id"], eos, prompt_length,
                                            extra.get("max_initial_timestamp_index")))
    return generate(model, prompts, config, encoder_hidden=encoder_hidden, processors=processors,
                    on_token=on_token, generator=generator)
