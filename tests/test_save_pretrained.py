"""pipe.save_pretrained(folder): transformers' from_pretrained loads the folder with no missing or unexpected key and
computes what the original checkpoint computes; lightpipe loads it again and answers as before. Tiny random
checkpoints built with transformers; GGUF and CTranslate2 sources are written in the Hugging Face layout."""

import json

import numpy as np
import pytest
import torch
import transformers

from lightpipe import InvalidInput, UnsupportedModel, hub, pipeline
from lightpipe.processing.text import Tokenizer


def loaded(cls, folder):
    """transformers' model from `folder`, checking that every weight came from the file."""
    model, report = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(report.values()), report
    return model.eval()


TEXT_CASES = [  # (arch, head, task, transformers class)
    ("bert", "sequence-classification", "text-classification", transformers.AutoModelForSequenceClassification),
    ("roberta", "token-classification", "token-classification", transformers.AutoModelForTokenClassification),
    ("bert", "masked-lm", "fill-mask", transformers.AutoModelForMaskedLM),
    ("distilbert", "masked-lm", "fill-mask", transformers.AutoModelForMaskedLM),
    ("xlm-roberta", "question-answering", "question-answering", transformers.AutoModelForQuestionAnswering),
    ("bert", "base", "feature-extraction", transformers.AutoModel),
]
TEXTS = ["Paris is the capital of France.", "the [MASK] city"]


@pytest.mark.parametrize("arch, head, task, cls", TEXT_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_text_models_round_trip(checkpoint, tmp_path, arch, head, task, cls):
    folder = checkpoint(arch, head)
    pipe = pipeline(task, model=str(folder))
    pipe.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    ours, original = loaded(cls, saved), loaded(cls, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(saved))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == transformers.AutoTokenizer.from_pretrained(str(folder))(
        TEXTS, padding=True)["input_ids"]
    with torch.inference_mode():
        got, want = ours(**batch), original(**batch)
    for key in want.keys():
        if isinstance(want[key], torch.Tensor):
            assert torch.equal(got[key], want[key]), key
    again = pipeline(task, model=str(saved))
    if task == "fill-mask":
        text = "the [MASK] city" if arch != "roberta" else "the <mask> city"
        assert again(text) == pipe(text)
    elif task == "question-answering":
        assert again(question="Where?", context=TEXTS[0]) == pipe(question="Where?", context=TEXTS[0])
    else:
        assert again(TEXTS[0]) == pipe(TEXTS[0])
    assert again.tokenizer(TEXTS) == pipe.tokenizer(TEXTS)
    config = json.loads((saved / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == json.loads((folder / "config.json").read_text())[
        "model_type"]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "opt"])  # Conv1D transposes; tied embeddings; untied ones
def test_causal_lms_round_trip(tmp_path, arch):
    from text_generation_helpers import tiny_generation_checkpoint

    folder = tiny_generation_checkpoint(tmp_path / "model", arch)
    pipe = pipeline("text-generation", model=str(folder))
    pipe.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert {"generation_config.json", "chat_template.jinja"} <= {p.name for p in saved.iterdir()}
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    with torch.inference_mode():
        got = loaded(transformers.AutoModelForCausalLM, saved)(ids).logits
        want = loaded(transformers.AutoModelForCausalLM, folder)(ids).logits
    assert torch.equal(got, want)
    again = pipeline("text-generation", model=str(saved))
    assert again("hello there", max_new_tokens=6, do_sample=False) == pipe("hello there", max_new_tokens=6,
                                                                          do_sample=False)
    assert again.tokenizer.chat_template == pipe.tokenizer.chat_template


def test_dtype_is_kept(checkpoint, tmp_path):
    pipe = pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")), dtype="bfloat16")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), dtype="auto")
    assert model.dtype == torch.bfloat16
    again = pipeline("text-classification", model=str(tmp_path))
    assert again.dtype == torch.bfloat16 and again("good") == pipe("good")


def test_vision_model_round_trip(tmp_path):
    from vision_helpers import image_bytes, smooth_image, tiny_vision_checkpoint

    folder = tiny_vision_checkpoint(tmp_path / "vit", "vit", "image-classification")
    pipe = pipeline("image-classification", model=str(folder))
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()
    pixels = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "saved"))(
        smooth_image(40, 30), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        got = loaded(transformers.AutoModelForImageClassification, tmp_path / "saved")(pixel_values=pixels).logits
        want = loaded(transformers.AutoModelForImageClassification, folder)(pixel_values=pixels).logits
    assert torch.equal(got, want)
    image = image_bytes(smooth_image(40, 30), "PNG")
    assert pipeline("image-classification", model=str(tmp_path / "saved"))(image) == pipe(image)


def test_ctc_model_round_trip(tmp_path):
    """Wav2Vec2's positional convolution is stored weight-normalised: written back as weight_g / weight_v."""
    folder = tmp_path / "w2v"
    folder.mkdir()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate("ETAONIHS")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    transformers.Wav2Vec2Processor(
        feature_extractor=transformers.Wav2Vec2FeatureExtractor(do_normalize=True),
        tokenizer=transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))).save_pretrained(str(folder))
    config = transformers.Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(str(folder))
    pipe = pipeline("automatic-speech-recognition", model=str(folder))
    pipe.save_pretrained(tmp_path / "saved")
    audio = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = loaded(transformers.Wav2Vec2ForCTC, tmp_path / "saved")(audio).logits
        want = loaded(transformers.Wav2Vec2ForCTC, folder)(audio).logits
    assert (got - want).abs().max() < 1e-5  # weight norm is folded and unfolded in float32
    again = pipeline("automatic-speech-recognition", model=str(tmp_path / "saved"))
    assert again(audio[0].numpy()) == pipe(audio[0].numpy())


def test_gguf_is_written_in_the_hugging_face_layout(tmp_path):
    from gguf_helpers import tiny_llama, write_llama_gguf

    reference = tiny_llama(hidden=64, intermediate=96)
    path = write_llama_gguf(tmp_path / "tiny.gguf", reference)
    pipe = pipeline("text-generation", model=str(path))
    pipe.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.inference_mode():
        got = loaded(transformers.AutoModelForCausalLM, tmp_path / "saved")(ids).logits
        want = reference.eval()(ids).logits
    assert torch.equal(got, want)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert tokenizer("hello world")["input_ids"] == pipe.tokenizer("hello world")["input_ids"]
    again = pipeline("text-generation", model=str(tmp_path / "saved"))
    assert again("hello", max_new_tokens=5, do_sample=False) == pipe("hello", max_new_tokens=5, do_sample=False)


def test_ctranslate2_whisper_is_written_in_the_hugging_face_layout(tmp_path):
    folder = hub.package_folder("Systran/faster-whisper-tiny.en")
    assert folder is not None, "the installed faster-whisper tiny.en package is needed"
    pipe = pipeline("automatic-speech-recognition", model=str(folder))
    pipe.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"generation_config.json", "preprocessor_config.json", "tokenizer.json"} <= names
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    decoder_ids = torch.tensor([[50257, 50362, 440, 2068]])
    with torch.inference_mode():
        got = loaded(transformers.WhisperForConditionalGeneration, tmp_path)(
            input_features=features, decoder_input_ids=decoder_ids).logits
        want = pipe.model(input_features=features, decoder_input_ids=decoder_ids)["logits"]
    assert (got - want).abs().max() < 1e-3
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer("hello world")["input_ids"] == pipe.tokenizer("hello world")["input_ids"]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["no_timestamps_token_id"] == 50362 and generation["decoder_start_token_id"] == 50257
    assert type(transformers.AutoFeatureExtractor.from_pretrained(str(tmp_path))).__name__ == "WhisperFeatureExtractor"


def test_clip_whole_or_refused(tmp_path):
    from clip_helpers import tiny_clip_checkpoint

    folder = tiny_clip_checkpoint(tmp_path / "clip")
    pipeline("zero-shot-image-classification", model=str(folder)).save_pretrained(tmp_path / "saved")
    loaded(transformers.CLIPModel, tmp_path / "saved")
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()
    vision_only = pipeline("image-feature-extraction", model=str(folder))  # the vision tower of the checkpoint
    with pytest.raises(UnsupportedModel, match="part of a clip checkpoint"):
        vision_only.save_pretrained(tmp_path / "part")


def test_bad_targets(checkpoint, tmp_path):
    pipe = pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not a folder"):
        pipe.save_pretrained(tmp_path / "file")
    with pytest.raises(InvalidInput):
        pipe.save_pretrained(tmp_path / "out", push_to_hub=True)
    with pytest.raises(InvalidInput):
        pipe.save_pretrained(42)
    pipe.save_pretrained(str(tmp_path / "out"), safe_serialization=True)  # transformers' option, accepted
    assert pipe("good") == pipeline("text-classification", model=str(tmp_path / "out"))("good")
    assert Tokenizer.from_folder(tmp_path / "out")("good") == pipe.tokenizer("good")
