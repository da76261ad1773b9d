"""Whisper: parity with transformers on tiny random checkpoints (weights at std 0.2) - encoder, decoder logits,
cached decoding, greedy and beam search, timestamps, prompts and language detection - and greedy decoding of
real speech with the real tiny.en weights when ../shared has them."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lightpipe import loading
from lightpipe.errors import InvalidInput
from lightpipe.generation import GenerationConfig
from lightpipe.models import whisper
from lightpipe.whisper import tokens as whisper_tokens
from lightpipe.whisper.decoding import detect_language, whisper_generate, whisper_prompt
from whisper_helpers import tiny_whisper, whisper_special_ids

import transformers

SHARED_WHISPER = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "whisper-tiny.en"
IDS = whisper_special_ids()
SOT, EN, DE, FR = IDS["sot"], *IDS["lang_to_id"].values()
TRANSCRIBE, TRANSLATE = IDS["transcribe"], IDS["translate"]
NO_TIMESTAMPS, PREV = IDS["notimestamps"], IDS["startofprev"]


class Tiny:
    def __init__(self, folder: Path):
        self.folder = folder
        self.reference = transformers.WhisperForConditionalGeneration.from_pretrained(folder).eval()
        self.model = loading.load_model(folder, "speech-seq2seq")
        self.config = GenerationConfig.from_folder(folder)


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    return Tiny(tiny_whisper(tmp_path_factory.mktemp("whisper-multi")))


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    return Tiny(tiny_whisper(tmp_path_factory.mktemp("whisper-en"), multilingual=False, seed=1))


def features(batch=3, seed=0):
    return torch.randn(batch, 16, 100, generator=torch.Generator().manual_seed(seed))


def reference_generate(tiny: Tiny, feats, **options):
    """transformers' Whisper generate() for audio up to 30 s, full sequences (prompt included)."""
    with torch.no_grad():
        out = tiny.reference.generate(feats, force_unique_generate_call=True, return_dict_in_generate=True, **options)
    return out.sequences.tolist()


# ----------------------------------------------------------------------------------------------
# The network


def test_loads_strictly_with_the_output_projection_tied(multilingual):
    model = multilingual.model
    assert isinstance(model, whisper.WhisperForConditionalGeneration)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())


def test_encoder_and_decoder_logits_equal_transformers(multilingual):
    feats = features()
    decoder_ids = torch.tensor([[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, 5, 17, 140, 3, 99]] * 3)
    with torch.no_grad():
        expected = multilingual.reference(input_features=feats, decoder_input_ids=decoder_ids)
    got = multilingual.model(feats, decoder_ids)
    torch.testing.assert_close(got["encoder_last_hidden_state"], expected.encoder_last_hidden_state, rtol=0, atol=1e-4)
    torch.testing.assert_close(got["logits"], expected.logits, rtol=0, atol=1e-4)


def test_base_model_loads_from_the_generation_checkpoint(multilingual):
    base = loading.load_model(multilingual.folder, "base")
    reference = transformers.WhisperModel.from_pretrained(multilingual.folder).eval()
    feats, decoder_ids = features(2), torch.tensor([[SOT, DE, 7, 8, 9]] * 2)
    with torch.no_grad():
        expected = reference(input_features=feats, decoder_input_ids=decoder_ids).last_hidden_state
    torch.testing.assert_close(base(feats, decoder_ids)["last_hidden_state"], expected, rtol=0, atol=1e-4)


def test_cached_decoding_equals_uncached(multilingual):
    model = multilingual.model
    feats = features(2)
    tokens = torch.tensor([[SOT, EN, TRANSCRIBE, 40, 41, 60, 7, 8], [SOT, FR, TRANSLATE, 9, 1, 2, 3, 150]])
    with torch.inference_mode():
        full = model(feats, tokens)["logits"]
        cache = model.new_cache(2, tokens.shape[1], encoder_hidden=model.encode(feats))
        steps = [model.decode_step(tokens[:, :3], cache)]  # a prefill of 3, then one token at a time
        steps += [model.decode_step(tokens[:, i:i + 1], cache) for i in range(3, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


def test_beams_share_the_encoder_keys_without_copies(multilingual):
    model = multilingual.model
    feats = features(2)
    tokens = torch.tensor([[SOT, EN, 5], [SOT, EN, 6], [SOT, EN, 7], [SOT, DE, 5], [SOT, DE, 8], [SOT, DE, 9]])
    with torch.inference_mode():
        encoder_hidden = model.encode(feats)
        shared = model.new_cache(6, 3, encoder_hidden=encoder_hidden)  # 3 rows per audio
        assert shared.cross[0][0].shape[0] == 2
        logits, weights = model.decode_step(tokens, shared, alignment_heads=[(1, 3), (0, 1)])
        copied = model.new_cache(6, 3, encoder_hidden=encoder_hidden.repeat_interleave(3, dim=0))
        expected, expected_weights = model.decode_step(tokens, copied, alignment_heads=[(1, 3), (0, 1)])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)
    assert weights.shape == (6, 2, 3, 50) and torch.allclose(weights.sum(-1), torch.ones(6, 2, 3))


def test_bad_features_are_refused_and_the_model_keeps_working(multilingual):
    model = multilingual.model
    for bad in (torch.randn(1, 16, 99), torch.randn(1, 80, 100), torch.randn(16, 100), "audio"):
        with pytest.raises(InvalidInput, match="log-mel"):
            model.encode(bad)
    assert model.encode(features(1)).shape == (1, 50, 32)


# ----------------------------------------------------------------------------------------------
# Decoding equals transformers' Whisper generate()


@pytest.mark.parametrize("options", [
    dict(language="en"),
    dict(language="german", task="translate"),
    dict(),  # the language is detected per audio
    dict(language="<|fr|>", return_timestamps=True),
    dict(return_timestamps=True),
    dict(language="en", num_beams=3),
    dict(language="de", num_beams=5, return_timestamps=True),
    dict(language="en", prompt_ids=[PREV, 5, 9, 22]),
    dict(language="en", repetition_penalty=1.4, num_beams=2),
    dict(language=["en", "de", "<|fr|>"], return_timestamps=True),
    dict(task="translate"),  # a task without a language: forced_decoder_ids no longer apply, detection does
], ids=["en", "translate", "detect", "timestamps", "detect-timestamps", "beam3", "beam5-timestamps", "prompt",
        "beam2-penalty", "language-per-audio", "detect-translate"])
def test_generate_equals_transformers(multilingual, options):
    feats = features()
    beams = options.pop("num_beams", 1)
    penalty = options.pop("repetition_penalty", 1.0)
    reference_options = dict(options)
    if "prompt_ids" in options:
        reference_options["prompt_ids"] = torch.tensor(options["prompt_ids"])
    expected = reference_generate(multilingual, feats, max_new_tokens=12, num_beams=beams,
                                  repetition_penalty=penalty, **reference_options)
    config = multilingual.config.replace(max_new_tokens=12, num_beams=beams, repetition_penalty=penalty)
    got = whisper_generate(multilingual.model, multilingual.model.encode(feats), config, **options)
    assert got.sequences.tolist() == expected


def test_detection_without_forced_decoder_ids_equals_transformers(multilingual):
    """Newer checkpoints have no forced_decoder_ids: the detected language is followed by no task token."""
    feats = features(seed=2)
    saved = multilingual.reference.generation_config
    multilingual.reference.generation_config = copy.deepcopy(saved)
    del multilingual.reference.generation_config.forced_decoder_ids
    try:
        expected = reference_generate(multilingual, feats, max_new_tokens=8)
    finally:
        multilingual.reference.generation_config = saved
    extra = {k: v for k, v in multilingual.config.extra.items() if k != "forced_decoder_ids"}
    config = multilingual.config.replace(max_new_tokens=8, extra=extra)
    got = whisper_generate(multilingual.model, multilingual.model.encode(feats), config)
    assert got.sequences.tolist() == expected and got.prompt_length == 3


def test_english_only_model_equals_transformers(english):
    feats = features(seed=3)
    for beams, timestamps in ((1, False), (4, False), (1, True)):
        expected = reference_generate(english, feats, max_new_tokens=10, num_beams=beams, return_timestamps=timestamps)
        got = whisper_generate(english.model, english.model.encode(feats),
                               english.config.replace(max_new_tokens=10, num_beams=beams),
                               return_timestamps=timestamps)
        assert got.sequences.tolist() == expected
        assert got.prompt_length == (1 if timestamps else 2)  # no language or task token


def test_default_length_rule_equals_transformers(multilingual):
    """Without max_new_tokens, max_length counts after the prompt, capped at max_target_positions."""
    feats = features(2, seed=5)
    expected = reference_generate(multilingual, feats, language="en")
    got = whisper_generate(multilingual.model, multilingual.model.encode(feats), multilingual.config, language="en")
    assert got.sequences.tolist() == expected and got.sequences.shape[1] <= 40


def test_batch_of_two_equals_each_alone(multilingual):
    model, feats = multilingual.model, features(2, seed=7)
    for beams in (1, 3):
        config = multilingual.config.replace(max_new_tokens=10, num_beams=beams)
        batch = whisper_generate(model, model.encode(feats), config, language="en").sequences
        for i in range(2):
            alone = whisper_generate(model, model.encode(feats[i:i + 1]), config, language="en").sequences
            row = batch[i, :alone.shape[1]]
            assert row.tolist() == alone[0].tolist()
            assert set(batch[i, alone.shape[1]:].tolist()) <= {IDS["eos"]}  # padding after a shorter result


@pytest.mark.parametrize("languages", [None, {"<|de|>": DE, "<|fr|>": FR}], ids=["all", "de-fr"])
def test_detect_language_equals_transformers(multilingual, languages):
    feats = features(4, seed=11)
    model, config = multilingual.model, multilingual.config
    reference_config = copy.deepcopy(multilingual.reference.generation_config)
    if languages:
        reference_config.lang_to_id = languages
        config = config.replace(extra={**config.extra, "lang_to_id": languages})
    with torch.no_grad():
        expected = multilingual.reference.detect_language(feats, generation_config=reference_config)
    got = detect_language(model, model.encode(feats), config)
    assert got == expected.tolist() and set(got) <= set((languages or IDS["lang_to_id"]).values())


def test_suppressed_tokens_never_get_a_score(multilingual):
    model, config = multilingual.model, multilingual.config
    out = whisper_generate(model, model.encode(features(2)), config.replace(max_new_tokens=6, output_scores=True),
                           language="en")
    first, later = out.scores[0], out.scores[1]
    assert bool(torch.isinf(first[:, list(config.suppress_tokens)]).all())
    assert bool(torch.isinf(first[:, list(config.begin_suppress_tokens)]).all())  # at the first position only
    assert not bool(torch.isinf(later[:, [3]]).any())
    assert bool(torch.isinf(later[:, list(config.suppress_tokens)]).all())


def test_forced_tokens_and_sampling(multilingual):
    model, config = multilingual.model, multilingual.config
    encoder_hidden = model.encode(features(2))
    forced = whisper_generate(model, encoder_hidden, config.replace(max_new_tokens=6, forced_tokens=[(5, 42)]),
                              language="en")
    assert forced.sequences[:, 5].tolist() == [42, 42]
    sampled = [whisper_generate(model, encoder_hidden, config.replace(max_new_tokens=8), language="en",
                                temperature=0.9, generator=torch.Generator().manual_seed(3)).sequences
               for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape[0] == 2
    assert sampled[0][:, :4].tolist() == [[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]] * 2


@pytest.mark.parametrize("beams", [1, 3])
def test_recorded_alignment_weights_equal_transformers(multilingual, beams):
    """whisper_generate's alignment heads are recorded around the model (generation/ knows nothing of them) and
    lined up along each returned sequence as transformers lines them up for word timestamps."""
    model, heads = multilingual.model, [(0, 1), (1, 0), (1, 3)]
    feats = features(2)
    # SDPA gives no attention probabilities: the reference runs eager attention, through the plain generate().
    reference = transformers.WhisperForConditionalGeneration.from_pretrained(multilingual.folder,
                                                                             attn_implementation="eager").eval()
    prompt = torch.tensor([[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]] * 2)
    with torch.no_grad():
        expected = transformers.GenerationMixin.generate(
            reference, feats, decoder_input_ids=prompt, num_beams=beams, max_new_tokens=8, output_attentions=True,
            return_dict_in_generate=True)
    config = multilingual.config.replace(max_new_tokens=8, num_beams=beams)
    out, got = whisper_generate(model, model.encode(feats), config, language="en", alignment_heads=heads)
    assert out.sequences.tolist() == expected.sequences.tolist()
    # transformers' own assembly (WhisperGenerationMixin._extract_token_timestamps): per layer along the steps,
    # the alignment heads, then for beams the row that produced each token.
    layers = [torch.cat([step[i] for step in expected.cross_attentions], dim=2) for i in range(2)]
    weights = torch.stack([layers[layer][:, head] for layer, head in heads], dim=1)
    if beams > 1:
        indices = expected.beam_indices[:, :(expected.beam_indices != -1).sum(-1).max()]
        indices = torch.cat([indices[:, :1].repeat(1, out.prompt_length - 1), indices], dim=1).clamp(min=0)
        weights = torch.stack([weights[:, :, i].index_select(0, indices[:, i]) for i in range(indices.shape[1])], 2)
    assert got.shape == weights.shape == (2, 3, out.sequences.shape[1] - 1, 50)
    torch.testing.assert_close(got, weights, rtol=0, atol=1e-4)


def test_alignment_heads_outside_the_decoder_are_refused(multilingual):
    model = multilingual.model
    with pytest.raises(InvalidInput, match="alignment head"):
        whisper_generate(model, model.encode(features(1)), multilingual.config.replace(max_new_tokens=3),
                         language="en", alignment_heads=[(2, 0)])


# ----------------------------------------------------------------------------------------------
# Prompts


def test_prompts_follow_transformers_rules(multilingual, english):
    config = multilingual.config
    assert whisper_prompt(config, language="en") == [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    assert whisper_prompt(config, language="French", task="translate") == [SOT, FR, TRANSLATE, NO_TIMESTAMPS]
    assert whisper_prompt(config, language=DE, return_timestamps=True) == [SOT, DE, TRANSCRIBE]
    assert whisper_prompt(config, language="de", prompt_ids=[5, 6]) == [PREV, 5, 6, SOT, DE, TRANSCRIBE, NO_TIMESTAMPS]
    assert whisper_prompt(config, detected_language=FR) == [SOT, FR, TRANSCRIBE, NO_TIMESTAMPS]  # forced task
    assert whisper_prompt(config, task="translate", detected_language=DE) == [SOT, DE, TRANSLATE, NO_TIMESTAMPS]
    assert whisper_prompt(english.config) == [SOT, NO_TIMESTAMPS]
    assert whisper_prompt(english.config, return_timestamps=True) == [SOT]


@pytest.mark.parametrize("call", [
    lambda m, e: whisper_prompt(e.config, language="en"),  # English-only: no language
    lambda m, e: whisper_prompt(e.config, task="translate"),
    lambda m, e: whisper_prompt(m.config, language="klingon"),
    lambda m, e: whisper_prompt(m.config, language="ja"),  # a real language this checkpoint lacks
    lambda m, e: whisper_prompt(m.config, language="en", task="summarize"),
    lambda m, e: whisper_prompt(m.config),  # multilingual: the language must be given or detected
    lambda m, e: whisper_prompt(m.config, detected_language=5),  # not a language token
    lambda m, e: whisper_generate(m.model, m.model.encode(features(2)), m.config, language=["en"]),  # 1 for 2
    lambda m, e: detect_language(e.model, e.model.encode(features(1)), e.config),
    lambda m, e: whisper_generate(m.model, m.model.encode(features(1)), m.config.replace(max_new_tokens=40),
                                  language="en"),  # past the 40 positions
    lambda m, e: whisper_generate(m.model, m.model.encode(features(1)), m.config, temperature=-1),
])
def test_bad_options_fail_cleanly(multilingual, english, call):
    with pytest.raises(InvalidInput):
        call(multilingual, english)
    out = whisper_generate(multilingual.model, multilingual.model.encode(features(1)),
                           multilingual.config.replace(max_new_tokens=3), language="en")
    assert out.sequences.shape == (1, 7)


def test_language_table_equals_transformers():
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    assert whisper_tokens.LANGUAGES == LANGUAGES and whisper_tokens.LANGUAGE_CODES == TO_LANGUAGE_CODE


# ----------------------------------------------------------------------------------------------
# Real weights and real speech


@pytest.fixture(scope="module")
def speech():
    if not (SHARED_WHISPER / "model.safetensors").is_file():
        pytest.skip("../shared/models/whisper-tiny.en is not present")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed to synthesise speech")
    import soundfile
    import soxr
    return soundfile, soxr


def test_real_tiny_en_transcribes_speech_like_transformers(speech, tmp_path):
    soundfile, soxr = speech
    from tokenizers import Tokenizer

    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog."], check=True,
                   capture_output=True)
    audio, rate = soundfile.read(str(wav), dtype="float32")
    audio = soxr.resample(audio, rate, 16000)
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(SHARED_WHISPER)
    feats = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features

    model = loading.load_model(SHARED_WHISPER, "speech-seq2seq")
    assert model.proj_out.weight.dtype == torch.float32  # float16 file, float32 config: computed in float32
    reference = transformers.WhisperForConditionalGeneration.from_pretrained(SHARED_WHISPER).eval()
    config = GenerationConfig.from_folder(SHARED_WHISPER)
    tokenizer = Tokenizer.from_file(str(SHARED_WHISPER / "tokenizer.json"))
    encoder_hidden = model.encode(feats)
    for beams in (1, 5):  # greedy as model.generate(); 5 beams as the speech-recognition pipeline's default
        with torch.no_grad():
            expected = reference.generate(feats, num_beams=beams, force_unique_generate_call=True,
                                          return_dict_in_generate=True).sequences
        out = whisper_generate(model, encoder_hidden, config.replace(num_beams=beams))
        assert out.sequences.tolist() == expected.tolist()
        text = tokenizer.decode(out.generated[0].tolist())
        for word in ("quick", "over", "lazy", "dog"):
            assert word in text.lower()
