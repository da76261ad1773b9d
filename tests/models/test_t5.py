"""T5 parity with transformers on tiny random checkpoints (weights at std 0.2): logits of the ReLU (t5) and gated-GELU
(flan-t5) variants, tied (decoder output scaled) and untied (own lm_head), on padded and unpadded batches; cached
decoding equal to the full pass; generate() greedy and with beams against transformers' generate(), for a padded
batch and for each input alone."""

import json

import pytest
import torch

from lightpipe.errors import CheckpointError, InvalidInput, UnsupportedModel
from lightpipe.generation import GenerationConfig, generate
from lightpipe.loading import load_model
from lightpipe.models.t5 import relative_position_bucket
from t5_helpers import encode, reference, tiny_t5

TEXTS = ["Hello world.", "Paris is the capital of France, and John Smith works at Google in London.", "a",
         "The river flows through the old city at night."]
DECODER = torch.tensor([[0, 5, 9, 12, 7, 30], [0, 3, 4, 8, 20, 1], [0, 40, 41, 6, 6, 6], [0, 1, 2, 3, 4, 5]])
# Variants: (feed_forward_proj, tied, seed); the seeds generate varied tokens (most tiny random T5s repeat one).
VARIANTS = {"relu-tied": ("relu", True, 5), "gated-gelu-untied": ("gated-gelu", False, 0),
            "gated-gelu-tied": ("gated-gelu", True, 1), "relu-untied": ("relu", False, 2)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    ffp, tied, seed = VARIANTS[request.param]
    return tiny_t5(tmp_path_factory.mktemp(request.param), feed_forward_proj=ffp, tied=tied, seed=seed)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_logits_equal_transformers_padded_and_alone(checkpoint):
    ours, ref = load_model(checkpoint, "seq2seq-lm"), reference(checkpoint)
    batch = encode(checkpoint, TEXTS)
    assert not bool(batch["attention_mask"].all())  # the batch is padded
    with torch.inference_mode():
        want = ref(**batch, decoder_input_ids=DECODER)
        got = ours(**batch, decoder_input_ids=DECODER)
        assert got["logits"].shape == (len(TEXTS), DECODER.shape[1], ours.config.vocab_size)
        assert max_diff(got["logits"], want.logits) <= 1e-4
        assert float(want.logits.std()) > 0.1  # the logits are not flat
        real = batch["attention_mask"].bool()
        assert max_diff(got["encoder_last_hidden_state"][real], want.encoder_last_hidden_state[real]) <= 1e-4
        for i, text in enumerate(TEXTS):
            alone = encode(checkpoint, [text])
            assert max_diff(ours(**alone, decoder_input_ids=DECODER[i:i + 1])["logits"][0], want.logits[i]) <= 1e-4
        # The encoder mask matters: without it the padded rows change.
        unmasked = ours(batch["input_ids"], decoder_input_ids=DECODER)["logits"]
        assert max_diff(unmasked, got["logits"]) > 1e-3


def test_base_model_equals_transformers(tmp_path):
    folder = tiny_t5(tmp_path, "base", feed_forward_proj="gated-gelu")
    ours, ref = load_model(folder, "base"), reference(folder, "base")
    batch = encode(folder, TEXTS)
    with torch.inference_mode():
        want = ref(**batch, decoder_input_ids=DECODER).last_hidden_state
        assert max_diff(ours(**batch, decoder_input_ids=DECODER)["last_hidden_state"], want) <= 1e-4


def test_the_base_model_reads_a_generation_checkpoint(checkpoint):
    base = load_model(checkpoint, "base")
    full = load_model(checkpoint, "seq2seq-lm")
    batch = encode(checkpoint, TEXTS[:2])
    with torch.inference_mode():
        hidden = base(**batch, decoder_input_ids=DECODER[:2])["last_hidden_state"]
        assert max_diff(full.logits(hidden), full(**batch, decoder_input_ids=DECODER[:2])["logits"]) <= 1e-5


@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_equals_the_full_pass(checkpoint, static):
    model = load_model(checkpoint, "seq2seq-lm")
    batch = encode(checkpoint, TEXTS)
    with torch.inference_mode():
        full = model(**batch, decoder_input_ids=DECODER)["logits"]
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        cache = model.new_cache(len(TEXTS), 8, encoder_hidden=hidden, encoder_mask=batch["attention_mask"],
                                static=static)
        steps = [model.decode_step(DECODER[:, :2], cache)]  # a two-token prefill, then one token at a time
        steps += [model.decode_step(DECODER[:, i:i + 1], cache) for i in range(2, DECODER.shape[1])]
        assert max_diff(torch.cat(steps, dim=1), full) <= 1e-4
        last = model.decode_step(torch.full((len(TEXTS), 1), 7), cache, last_only=True)
        assert last.shape == (len(TEXTS), 1, model.config.vocab_size)
        with pytest.raises(InvalidInput, match="cache holds 8 positions"):
            model.decode_step(torch.full((len(TEXTS), 2), 7), cache)


def lp_generate(model, batch, **options) -> list[list[int]]:
    config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, **options)
    encoder_hidden = model.encode(batch["input_ids"], batch["attention_mask"])
    start = torch.zeros((batch["input_ids"].shape[0], 1), dtype=torch.long)
    return generate(model, start, config, encoder_hidden=encoder_hidden,
                    encoder_attention_mask=batch["attention_mask"]).sequences.tolist()


@pytest.mark.parametrize("options", [dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3),
                                     dict(max_new_tokens=10, num_beams=2, num_return_sequences=2,
                                          no_repeat_ngram_size=2, length_penalty=2.0)],
                         ids=["greedy", "beams", "beams-returned"])
def test_generate_equals_transformers_batched_and_alone(checkpoint, options):
    ours, ref = load_model(checkpoint, "seq2seq-lm"), reference(checkpoint)
    outputs = []
    for texts in [TEXTS] + [[t] for t in TEXTS]:
        batch = encode(checkpoint, texts)
        with torch.inference_mode():
            want = ref.generate(**batch, do_sample=False, **options).tolist()
            got = lp_generate(ours, batch, **options)
        assert got == want, texts
        outputs.append(got)
    assert len({tuple(row) for row in outputs[0]}) > 1  # the texts generate different tokens


def test_relative_position_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            want = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(relative, bidirectional, buckets, distance), want)


def test_a_forward_pass_without_decoder_ids_is_a_typed_error(checkpoint):
    model = load_model(checkpoint, "seq2seq-lm")
    with pytest.raises(InvalidInput, match="decoder_input_ids"):
        model(**encode(checkpoint, TEXTS[:1]))
    with pytest.raises(InvalidInput, match="encoder_hidden"):
        model.new_cache(1, 4)
    with pytest.raises(InvalidInput, match="multiple"):
        model.new_cache(3, 4, encoder_hidden=torch.zeros(2, 5, model.config.d_model))


def test_bad_configs_and_checkpoints_are_typed_errors(tmp_path):
    folder = tiny_t5(tmp_path, feed_forward_proj="relu")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "feed_forward_proj": "gated-gelu-x"}))
    with pytest.raises(UnsupportedModel, match="feed_forward_proj"):
        load_model(folder, "seq2seq-lm")
    (folder / "config.json").write_text(json.dumps({**raw, "feed_forward_proj": "gated-gelu"}))
    with pytest.raises(CheckpointError, match="wi_0"):  # the weights are ReLU's: wi, not wi_0 / wi_1
        load_model(folder, "seq2seq-lm")
