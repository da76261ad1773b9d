"""BART parity with transformers on tiny random checkpoints (weights at std 0.2): every head's outputs on padded
and unpadded batches (a left-padded row equals its text alone), cached decoding, and generate() greedy and with
beams against transformers' generate(), for a padded batch and for each input alone."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bart_helpers import encode, reference, tiny_bart
from lightpipe.errors import CheckpointError, InvalidInput, UnsupportedModel
from lightpipe.generation import GenerationConfig, generate
from lightpipe.loading import load_model

TEXTS = ["Hello world.", "Paris is the capital of France, and John Smith works at Google in London.", "a",
         "The river flows through the old city at night."]
PAIRS = ["This example is good.", "What does John do?", "b", "Who lives in Berlin, Germany?"]
# Seed and shape whose random weights generate varied tokens (most tiny random BARTs repeat one token).
GENERATOR = dict(seed=2, scale_embedding=True)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return tiny_bart(tmp_path_factory.mktemp("bart-cls"), "sequence-classification")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return tiny_bart(tmp_path_factory.mktemp("bart-gen"), "seq2seq-lm", **GENERATOR)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("overrides", [{}, {"scale_embedding": True, "activation_function": "relu"}])
def test_sequence_classification_equals_transformers_batched_and_alone(tmp_path, overrides):
    folder = tiny_bart(tmp_path, "sequence-classification", **overrides)
    ours, ref = load_model(folder, "sequence-classification"), reference(folder)
    right, left = encode(folder, TEXTS, PAIRS), encode(folder, TEXTS, PAIRS, padding_side="left")
    assert not bool(right["attention_mask"].all())  # the batch is padded
    with torch.inference_mode():
        got = ours(**right)["logits"]
        assert got.shape == (len(TEXTS), 3)
        assert max_diff(got, ref(**right).logits) <= 1e-4
        got_left = ours(**left)["logits"]
        for i, (text, pair) in enumerate(zip(TEXTS, PAIRS)):
            alone = ref(**encode(folder, [text], [pair])).logits[0]
            assert max_diff(got[i], alone) <= 1e-4, text
            assert max_diff(got_left[i], alone) <= 1e-4, text
            assert max_diff(ours(**encode(folder, [text], [pair]))["logits"][0], alone) <= 1e-4
        # The padding mask matters: without it the padded rows change.
        unmasked = ours(right["input_ids"])["logits"]
        assert max_diff(unmasked, got) > 1e-3


def test_single_texts_without_mask(classifier):
    ours, ref = load_model(classifier, "sequence-classification"), reference(classifier)
    ids = encode(classifier, [TEXTS[1]])["input_ids"]
    with torch.inference_mode():
        assert max_diff(ours(ids)["logits"], ref(input_ids=ids).logits) <= 1e-4


def test_classifier_reads_the_last_end_token(classifier):
    """A pair holds three </s> tokens; the head reads the last one's state, as transformers does."""
    ours = load_model(classifier, "sequence-classification")
    batch = encode(classifier, TEXTS[:1], PAIRS[:1])
    assert int((batch["input_ids"] == 2).sum()) == 3
    with torch.inference_mode():
        hidden, _ = ours.model.run(batch["input_ids"], batch["attention_mask"])
        expected = ours.classification_head(hidden[0, -1])
        assert max_diff(ours(**batch)["logits"][0], expected) == 0.0


def test_input_without_end_token_is_refused(classifier):
    ours = load_model(classifier, "sequence-classification")
    with pytest.raises(InvalidInput, match="end-of-sequence"):
        ours(torch.tensor([[0, 50, 60]]))


def test_input_longer_than_the_positions_is_refused(classifier):
    ours = load_model(classifier, "sequence-classification")
    with pytest.raises(InvalidInput, match="at most 64 tokens"):
        ours(torch.tensor([[0] + [50] * 70 + [2]]))


@pytest.mark.parametrize("head", ["base", "seq2seq-lm"])
def test_base_and_generation_heads_equal_transformers(generator, head):
    """Teacher-forced outputs: the decoder reads the shifted encoder tokens, or given decoder_input_ids."""
    ours, ref = load_model(generator, head), reference(generator, "seq2seq-lm")
    batch = encode(generator, TEXTS)
    real = batch["attention_mask"].bool()
    decoder_ids = torch.tensor([[2, 0, 50, 60, 70], [2, 0, 80, 90, 100], [2, 0, 7, 8, 9], [2, 0, 11, 12, 13]])
    with torch.inference_mode():
        want = ref(**batch, output_hidden_states=True)
        want_given = ref(**batch, decoder_input_ids=decoder_ids)
        if head == "base":
            got = ours(**batch)
            assert max_diff(got["last_hidden_state"][real], want.decoder_hidden_states[-1][real]) <= 1e-4
            assert max_diff(got["encoder_last_hidden_state"][real], want.encoder_last_hidden_state[real]) <= 1e-4
            return
        assert max_diff(ours(**batch)["logits"][real], want.logits[real]) <= 1e-4
        assert max_diff(ours(**batch, decoder_input_ids=decoder_ids)["logits"], want_given.logits) <= 1e-4


def test_base_model_from_a_generation_checkpoint_drops_the_head(generator):
    model = load_model(generator, "base")
    assert type(model).__name__ == "BartModel"
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.decoder.embed_tokens.weight is model.shared.weight


def test_embeddings_and_head_are_tied(generator):
    model = load_model(generator, "seq2seq-lm")
    assert model.lm_head.weight is model.model.shared.weight
    assert model.model.encoder.embed_tokens.weight is model.model.shared.weight
    assert float(model.final_logits_bias.abs().sum()) > 0  # the checkpoint's own bias, not zeros


def test_older_checkpoint_layout_loads(tmp_path):
    """Hub checkpoints saved before transformers 5 (bart-large-mnli) hold the encoder's and decoder's token
    embeddings beside model.shared; generation checkpoints may lack final_logits_bias."""
    folder = tiny_bart(tmp_path, "seq2seq-lm", **GENERATOR)
    state = load_file(str(folder / "model.safetensors"))
    for part in ("encoder", "decoder"):
        state[f"model.{part}.embed_tokens.weight"] = state["model.shared.weight"].clone()
    bias = state.pop("final_logits_bias")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(folder, "seq2seq-lm")
    assert bool((model.final_logits_bias == 0).all()) and bias.shape == model.final_logits_bias.shape


def test_classifier_from_a_generation_checkpoint_names_the_missing_head(generator):
    with pytest.raises(CheckpointError, match="classification_head"):
        load_model(generator, "sequence-classification")


def test_mbart_is_not_served(tmp_path):
    folder = tiny_bart(tmp_path, "sequence-classification")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mbart"}))
    with pytest.raises(UnsupportedModel, match="bart"):
        load_model(folder, "sequence-classification")


def test_cached_decoding_equals_full_forward(generator):
    """Prefill of a few tokens, then one token per step: the logits equal the teacher-forced pass."""
    model = load_model(generator, "seq2seq-lm")
    batch = encode(generator, TEXTS)
    decoder_ids = torch.tensor([[2, 0, 50, 60, 70, 80]] * len(TEXTS))
    with torch.inference_mode():
        full = model(**batch, decoder_input_ids=decoder_ids)["logits"]
        for static in (False, True):
            encoder_hidden = model.encode(batch["input_ids"], batch["attention_mask"])
            cache = model.new_cache(len(TEXTS), 8, encoder_hidden=encoder_hidden, static=static,
                                    encoder_mask=batch["attention_mask"])
            steps = [model.decode_step(decoder_ids[:, :3], cache)]
            steps += [model.decode_step(decoder_ids[:, i:i + 1], cache) for i in range(3, 6)]
            assert max_diff(torch.cat(steps, dim=1), full) <= 1e-4
            last = model.decode_step(torch.full((len(TEXTS), 1), 90), cache, last_only=True)
            assert last.shape == (len(TEXTS), 1, model.config.vocab_size)


def lp_generate(model, batch, **options) -> list[list[int]]:
    config = GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                              forced_eos_token_id=2, **options)
    encoder_hidden = model.encode(batch["input_ids"], batch["attention_mask"])
    start = torch.full((batch["input_ids"].shape[0], 1), 2)
    return generate(model, start, config, encoder_hidden=encoder_hidden,
                    encoder_attention_mask=batch["attention_mask"]).sequences.tolist()


@pytest.mark.parametrize("options", [dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3),
                                     dict(max_new_tokens=10, num_beams=2, num_return_sequences=2,
                                          no_repeat_ngram_size=2)],
                         ids=["greedy", "beams", "beams-returned"])
def test_generate_equals_transformers_batched_and_alone(generator, options):
    ours, ref = load_model(generator, "seq2seq-lm"), reference(generator, "seq2seq-lm")
    outputs = []
    for texts in [TEXTS] + [[t] for t in TEXTS]:
        batch = encode(generator, texts)
        with torch.inference_mode():
            want = ref.generate(**batch, do_sample=False, **options).tolist()
            got = lp_generate(ours, batch, **options)
        assert got == want, texts
        outputs.append(got)
    assert len({tuple(row) for row in outputs[0]}) > 1  # the texts generate different tokens


def test_generate_without_the_encoder_mask_differs_on_padded_rows(generator):
    """The padded rows' cross-attention must not read padding: dropping the mask changes their tokens."""
    model = load_model(generator, "seq2seq-lm")
    batch = encode(generator, TEXTS)
    with torch.inference_mode():
        masked = lp_generate(model, batch, max_new_tokens=12)
        unmasked = lp_generate(model, {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])},
                               max_new_tokens=12)
    assert masked != unmasked


def test_new_cache_checks_its_inputs(generator):
    model = load_model(generator, "seq2seq-lm")
    hidden = torch.zeros(2, 5, 32)
    with pytest.raises(InvalidInput, match="encoder_hidden"):
        model.new_cache(2, 8)
    with pytest.raises(InvalidInput, match="multiple"):
        model.new_cache(3, 8, encoder_hidden=hidden)
    with pytest.raises(InvalidInput, match="mask"):
        model.new_cache(2, 8, encoder_hidden=hidden, encoder_mask=torch.ones(2, 4))
    with pytest.raises(InvalidInput, match="at most 64"):
        model.new_cache(2, 65, encoder_hidden=hidden)


def test_generate_checks_the_encoder_mask_shape(generator):
    model = load_model(generator, "seq2seq-lm")
    batch = encode(generator, TEXTS[:2])
    hidden = model.encode(batch["input_ids"], batch["attention_mask"])
    config = GenerationConfig(max_new_tokens=3, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)
    with pytest.raises(InvalidInput, match="encoder_attention_mask"):
        generate(model, torch.full((2, 1), 2), config, encoder_hidden=hidden,
                 encoder_attention_mask=batch["attention_mask"][:, :-1])
    with pytest.raises(InvalidInput, match="encoder_attention_mask"):
        generate(model, torch.full((2, 1), 2), config, encoder_attention_mask=batch["attention_mask"])
