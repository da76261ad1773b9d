"""automatic-speech-recognition with CTC models (Wav2Vec2, HuBERT): parity with transformers' pipeline on tiny
random checkpoints, chunking, timestamps, batching, and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import lightpipe
from helpers import randomize
from lightpipe.errors import CheckpointError, InvalidInput
from lightpipe.tasks.automatic_speech_recognition import (
    CTCVocabulary,
    chunk_windows,
    rescale_stride,
    window_sizes,
)

RATE = 16000
CHARS = "ETAONIHSRDLUMWCFGYPBVKXJQZ'"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)  # 20 samples per frame
KINDS = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC", "wav2vec2", {}),
    "wav2vec2-stable": ("Wav2Vec2Config", "Wav2Vec2ForCTC", "wav2vec2",
                        dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "hubert": ("HubertConfig", "HubertForCTC", "hubert", {}),
}


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-rate modulated signal with a wandering pitch and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 4 * t + seed)) ** 2
    return (voice * syllables + 0.05 * rng.standard_normal(n)).astype(np.float32)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _calibrate_head(model, base, clips, seed):
    """Random encoders give nearly the same hidden state in every frame, so a random head emits one id.
    Center and scale the head on these clips' hidden states, and favour the blank and the word delimiter:
    the model then emits blanks, delimiters, repeats, letters and special tokens."""
    with torch.no_grad():
        hidden = torch.cat([base(torch.from_numpy((c - c.mean()) / c.std())[None]).last_hidden_state[0] for c in clips])
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(model.lm_head.weight.shape, generator=gen) / hidden.std(0) * 3 / hidden.shape[1] ** 0.5
        bias = -weight @ hidden.mean(0)
        bias[0] += 2.0  # <pad>, the CTC blank
        bias[4] += 1.0  # |, the word delimiter
        bias[12:] -= 3.0  # a small alphabet makes repeats likely
        model.lm_head.weight.copy_(weight)
        model.lm_head.bias.copy_(bias)


def ctc_checkpoint(folder, kind: str, *, seed: int = 0, do_lower_case: bool = False):
    """A tiny random CTC model saved with a transformers Wav2Vec2Processor (character vocab + feature extractor)."""
    config_name, model_name, prefix, overrides = KINDS[kind]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({c: 5 + i for i, c in enumerate(CHARS)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), do_lower_case=do_lower_case)
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=kind != "wav2vec2")
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(folder))
    config = getattr(transformers, config_name)(vocab_size=len(vocab), **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = randomize(getattr(transformers, model_name)(config), seed).eval()
    _calibrate_head(model, getattr(model, prefix), [noise(32000, seed), speech_like(32000, seed)], seed)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """pipes(kind) -> (lightpipe pipeline, transformers pipeline), built once per kind."""
    made = {}

    def make(kind, **options):
        key = (kind, tuple(sorted(options.items())))
        if key not in made:
            folder = ctc_checkpoint(tmp_path_factory.mktemp(kind), kind, **options)
            made[key] = (lightpipe.pipeline("automatic-speech-recognition", model=str(folder)),
                         transformers.pipeline("automatic-speech-recognition", model=str(folder)))
        return made[key]

    return make


def clips():
    return [noise(6000, 1), speech_like(9000, 2), speech_like(15457, 3), noise(401, 4)]


def same(ours, ref):
    """Equal results, and ours plain Python data (transformers' timestamps are numpy floats)."""
    assert ours == ref
    assert type(ours["text"]) is str
    for chunk in ours.get("chunks", []):
        assert type(chunk["text"]) is str and all(type(t) is float for t in chunk["timestamp"])


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("timestamps", [None, "char", "word"])
def test_matches_transformers(pipes, kind, timestamps):
    ours, ref = pipes(kind)
    params = {"return_timestamps": timestamps} if timestamps else {}
    for audio in clips():
        got, want = ours(audio, **params), ref(audio.copy(), **params)
        same(got, want)
    text = ours(speech_like(16000, 5))["text"]
    assert " " in text and len(set(text)) > 4  # the tiny model emits words of several characters


def test_task_is_inferred_from_the_ctc_architecture(pipes):
    ours, _ = pipes("hubert")
    inferred = lightpipe.pipeline(model=ours.model.name_or_path)
    assert inferred.task == "automatic-speech-recognition" and inferred.decoding.name == "ctc"
    audio = speech_like(6000, 15)
    assert inferred(audio) == ours(audio)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
@pytest.mark.parametrize("chunk, stride, timestamps", [
    (0.5, None, "word"),
    (0.4, 0.1, "char"),
    (0.6, (0.15, 0.05), None),
    (0.25, (0.0, 0.1), "char"),
])
def test_chunked_matches_transformers(pipes, kind, chunk, stride, timestamps):
    ours, ref = pipes(kind)
    params = {"chunk_length_s": chunk}
    if stride is not None:
        params["stride_length_s"] = stride
    if timestamps:
        params["return_timestamps"] = timestamps
    for audio in (speech_like(30000, 6), noise(17_777, 7)):  # several windows each
        same(ours(audio, **params), ref(audio.copy(), **params))


def test_dict_inputs_with_stride_and_extra_keys(pipes):
    ours, ref = pipes("wav2vec2")
    audio = speech_like(12000, 9)
    inputs = (lambda: {"raw": audio.copy(), "sampling_rate": RATE, "stride": (1000, 2000), "id": 7},
              lambda: {"array": audio.copy(), "sampling_rate": RATE, "path": "a.wav", "speaker": "x"})
    for make in inputs:  # transformers pops keys from the dict it is given: each call gets its own
        value = make()
        same(ours(value, return_timestamps="char"), ref(make(), return_timestamps="char"))
        assert value.keys() == make().keys()  # lightpipe leaves the caller's dict alone
    chunked = {"raw": audio, "sampling_rate": RATE, "id": 3}
    got = ours(chunked, chunk_length_s=0.3)
    assert got == ref(dict(chunked, raw=audio.copy()), chunk_length_s=0.3)
    assert got["id"] == [3] * 4  # one entry per window, as transformers


def test_hub_layout_of_older_checkpoints(pipes, tmp_path):
    """Hub checkpoints made before transformers 5: preprocessor_config.json, special_tokens_map.json, and a
    tokenizer_config.json that does not name its class."""
    ours, _ = pipes("wav2vec2")
    folder = tmp_path / "old"
    shutil.copytree(ours.model.name_or_path, folder)
    extractor = json.loads((folder / "processor_config.json").read_text())["feature_extractor"]
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps(extractor))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "do_lower_case": False,
                                                              "word_delimiter_token": "|"}))
    old = lightpipe.pipeline("automatic-speech-recognition", model=str(folder))
    ref = transformers.pipeline("automatic-speech-recognition", model=str(folder))
    audio = speech_like(9000, 16)
    same(old(audio, return_timestamps="word"), ref(audio.copy(), return_timestamps="word"))
    assert old(audio) == ours(audio)


def test_float64_and_tensor_inputs(pipes):
    ours, ref = pipes("wav2vec2-stable")
    audio = speech_like(8000, 10)
    want = ref(audio.copy())
    assert ours(audio.astype(np.float64)) == want
    assert ours(torch.from_numpy(audio)) == want


def test_lowercase_vocabulary(pipes):
    ours, ref = pipes("hubert", do_lower_case=True)
    for audio in clips()[:2]:
        got = ours(audio, return_timestamps="word")
        assert got == ref(audio.copy(), return_timestamps="word")
        assert got["text"] == got["text"].lower() and any(c.isupper() for c in "".join(w["text"] for w in got["chunks"]))


# ---------------------------------------------------------------------------------------------- batching
def test_batch_size_changes_nothing(pipes):
    ours, _ = pipes("wav2vec2")
    inputs = clips() + [speech_like(20000, 11)]
    for params in ({"return_timestamps": "char"}, {"chunk_length_s": 0.5, "return_timestamps": "word"}):
        singles = [ours(audio, **params) for audio in inputs]
        assert ours(inputs, batch_size=1, **params) == singles
        assert ours(inputs, batch_size=4, **params) == singles
        assert list(ours(iter(inputs), batch_size=3, **params)) == singles


def test_batched_matches_transformers_unbatched(pipes):
    ours, ref = pipes("hubert")
    inputs = clips()
    want = [ref(audio.copy(), chunk_length_s=0.4) for audio in inputs]
    assert ours(inputs, batch_size=4, chunk_length_s=0.4) == want


# ---------------------------------------------------------------------------------------------- chunk math
def test_window_arithmetic_matches_transformers_chunk_iter():
    from transformers.pipelines.automatic_speech_recognition import chunk_iter
    from transformers.pipelines.automatic_speech_recognition import rescale_stride as ref_rescale

    class Echo:  # stands in for the feature extractor: returns the window it is given
        sampling_rate = RATE

        def __call__(self, chunk, **kwargs):
            return {"samples": np.asarray(chunk)}

    rng = np.random.default_rng(0)
    for _ in range(200):
        align = int(rng.choice([1, 20, 320]))
        chunk_s = float(rng.uniform(0.05, 2.0))
        stride_s = (float(rng.uniform(0, chunk_s / 2.2)), float(rng.uniform(0, chunk_s / 2.2)))
        try:
            sizes = window_sizes(chunk_s, stride_s, RATE, align)
        except InvalidInput:
            continue
        n = int(rng.integers(1, 80000))
        audio = np.arange(n)
        want = list(chunk_iter(audio, Echo(), *sizes))
        got = chunk_windows(n, *sizes)
        assert [(s, e) for s, e, _ in got] == [(int(w["samples"][0]), int(w["samples"][-1]) + 1) for w in want]
        assert [stride for _, _, stride in got] == [w["stride"] for w in want]
        assert [w["is_last"] for w in want] == [i == len(got) - 1 for i in range(len(got))]
        for stride in got:
            assert rescale_stride(stride[2], 1 / align) == tuple(ref_rescale([stride[2]], 1 / align)[0])


def test_default_stride_is_a_sixth_of_the_chunk():
    assert window_sizes(6.0, None, RATE, 320) == (96000, 16000, 16000)
    assert window_sizes(10.0, None, RATE, 320) == (160000, 26560, 26560)  # 1.67 s rounded to whole frames


# ---------------------------------------------------------------------------------------------- CTC decoding
def test_vocabulary_decodes_like_wav2vec2_ctc_tokenizer(tmp_path):
    folder = ctc_checkpoint(tmp_path / "m", "wav2vec2")
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = CTCVocabulary.from_folder(folder)
    rng = np.random.default_rng(0)
    for _ in range(100):
        # blanks and delimiters often, runs of repeats, ids past the vocabulary now and then
        ids = rng.choice([0, 0, 0, 4, 4, 1, 2, 3, 5, 6, 7, 8, 30, 31, 35], size=int(rng.integers(0, 40)))
        ids = np.repeat(ids, rng.integers(1, 3, size=ids.shape[0]))
        text, chars = ours.decode(ids, with_offsets=True)
        want = ref.decode(ids, skip_special_tokens=False, output_char_offsets=True)
        assert text == want["text"] == ours.decode(ids)[0]
        assert chars == [{k: (int(v) if k != "char" else v) for k, v in o.items()} for o in want["char_offsets"]]
        assert ours.word_offsets(chars) == ref._get_word_offsets(want["char_offsets"], ref.replace_word_delimiter_char)


def test_vocabulary_settings_from_tokenizer_config(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"en": {"<pad>": 0, "<unk>": 1, "|": 2, "A": 3, "B": 4},
                                                     "de": {"<pad>": 0, "<unk>": 1, "|": 2, "X": 3}}))
    config = {"target_lang": "en", "do_lower_case": True, "pad_token": "<pad>", "word_delimiter_token": "|",
              "replace_word_delimiter_char": "_"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = CTCVocabulary.from_folder(tmp_path)
    assert vocab.decode([3, 3, 0, 3, 2, 4, 9])[0] == "aa_b<unk>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "target_lang": None}))
    with pytest.raises(CheckpointError, match="target_lang"):
        CTCVocabulary.from_folder(tmp_path)
    with pytest.raises(CheckpointError, match="vocab.json"):
        CTCVocabulary.from_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad, params, message", [
    (None, {}, "audio input"),
    (np.zeros(0, dtype=np.float32), {}, "empty"),
    (np.zeros(39, dtype=np.float32), {}, "at least 40 samples"),  # the tiny model's receptive field
    (np.zeros((3, 4, 5), dtype=np.float32), {}, "dimensions"),
    ({"raw": np.zeros(100)}, {}, "sampling_rate"),
    ({"raw": np.zeros(1000, dtype=np.float32), "sampling_rate": RATE, "stride": (900, 900)}, {}, "stride"),
    (np.full(1000, np.nan, dtype=np.float32), {}, "NaN"),
    ("no/such/file.wav", {}, "no audio file"),
    (np.zeros(4000, dtype=np.float32), {"return_timestamps": True}, "'char' or 'word'"),
    (np.zeros(4000, dtype=np.float32), {"return_language": True}, "Whisper"),
    (np.zeros(4000, dtype=np.float32), {"chunk_length_s": -1}, "chunk_length_s"),
    (np.zeros(4000, dtype=np.float32), {"chunk_length_s": 0.2, "stride_length_s": 0.1}, "longer than"),
    (np.zeros(4000, dtype=np.float32), {"chunk_length_s": 0.001, "stride_length_s": 0}, "shortest input"),
    (np.zeros(4000, dtype=np.float32), {"stride_length_s": (1, 2, 3)}, "stride_length_s"),
    (np.zeros(4000, dtype=np.float32), {"max_new_tokens": 0}, "max_new_tokens"),
    (np.zeros(4000, dtype=np.float32), {"top_k": 3}, "unknown parameter"),
])
def test_bad_inputs_raise_invalid_input_and_the_pipeline_keeps_working(pipes, bad, params, message):
    ours, ref = pipes("wav2vec2")
    with pytest.raises(InvalidInput, match=message):
        ours(bad, **params)
    audio = speech_like(5000, 12)
    assert ours(audio) == ref(audio.copy())


def test_bad_input_in_a_list_fails_the_call_not_the_pipeline(pipes):
    ours, ref = pipes("wav2vec2")
    good = speech_like(5000, 13)
    with pytest.raises(InvalidInput):
        ours([good, "missing.flac"])
    assert ours([good, good], batch_size=2) == [ref(good.copy())] * 2


def test_a_final_window_too_short_for_the_model_is_dropped(pipes):
    """With no stride, the last window can be shorter than the convolutions' receptive field (transformers then
    fails inside the model); it gives no frame, so leaving it out loses nothing."""
    ours, _ = pipes("wav2vec2")
    audio = speech_like(8000 * 3 + 30, 14)  # three 0.5 s windows and 30 samples, fewer than the 40 of one frame
    got = ours(audio, chunk_length_s=0.5, stride_length_s=0, return_timestamps="char")
    assert got == ours(audio[:24000], chunk_length_s=0.5, stride_length_s=0, return_timestamps="char")
