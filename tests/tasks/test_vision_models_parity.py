"""Acceptance audit of the vision and document pipelines against transformers: the corners an independent
audit found beyond the other parity tests. Each test says what transformers does; where it fails (or is
clearly wrong), what lightpipe gives instead."""

import pytest
import transformers

from layoutlm_helpers import layoutlm_checkpoint, word_boxes
from lightpipe import InvalidInput, pipeline
from vision_helpers import assert_close, assert_same_labels, smooth_image, tiny_vision_checkpoint

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def images():
    return [smooth_image(40, 50, seed=1), smooth_image(64, 30, seed=2), smooth_image(33, 33, seed=3)]


# ---------------------------------------------------------------------------------------------- BEiT

@pytest.mark.parametrize("image_size, size", [
    ([32, 48], {"height": 32, "width": 48}),  # the trained, non-square grid
    ([32, 48], {"height": 40, "width": 24}),  # another grid: the table is resized
    ([48, 32], {"height": 32, "width": 32}),
])
def test_beit_trained_on_a_non_square_grid(tmp_path, images, image_size, size):
    """transformers reads a non-square relative position bias table with its row and column offsets
    swapped, and resizes it even for the trained grid; checkpoints trained with it learned that layout,
    and lightpipe reads it the same way (it used the table as laid out: scores off by 1e-3)."""
    for head, task in (("image-classification", "image-classification"), ("base", "image-feature-extraction")):
        folder = tiny_vision_checkpoint(tmp_path / head, "beit", head, labels=LABELS, image_size=image_size,
                                        processor={"size": size})
        ours, ref = pipeline(task, model=str(folder)), transformers.pipeline(task, model=str(folder))
        for image in images:
            if task == "image-classification":
                assert_same_labels(ours(image, top_k=4), ref(image, top_k=4))
            else:
                for pool in (False, True):
                    assert_close(ours(image, pool=pool), ref(image, pool=pool))


# ---------------------------------------------------------------------------------------------- tiny images

@pytest.mark.parametrize("arch", ["vit", "deit", "beit", "convnext"])
def test_image_smaller_than_the_model_reads_is_invalid_input(tmp_path, arch):
    """With do_resize off, an image smaller than one patch (or, for ConvNeXt, than its stem and
    downsamplings need) fails inside transformers' convolution with a RuntimeError; lightpipe raised the
    same bare RuntimeError, and now says InvalidInput, then keeps answering."""
    folder = tiny_vision_checkpoint(tmp_path, arch, "image-classification", labels=LABELS,
                                    processor={"do_resize": False, "do_center_crop": False})
    ours = pipeline("image-classification", model=str(folder))
    ref = transformers.pipeline("image-classification", model=str(folder))
    for height, width in ((1, 1), (7, 9), (3, 500)):
        image = smooth_image(height, width, seed=height)
        with pytest.raises(RuntimeError):
            ref(image)
        with pytest.raises(InvalidInput, match="after preprocessing"):
            ours(image)
    fits = smooth_image(32, 32, seed=4)  # the size every one of these models reads
    assert_same_labels(ours(fits, top_k=4), ref(fits, top_k=4))


def test_swin_whose_windows_outgrow_its_own_feature_maps_says_so(tmp_path, images):
    """window_size=5 on 32-pixel images: the second stage's 4x4 map is smaller than a window, and
    transformers fails on its bias table even at the checkpoint's own size. lightpipe raises InvalidInput
    that says the image is too small (it told the user to use the size they had used)."""
    folder = tiny_vision_checkpoint(tmp_path, "swin", "image-classification", labels=LABELS, window_size=5)
    ref = transformers.pipeline("image-classification", model=str(folder))
    with pytest.raises(RuntimeError):
        ref(images[0])
    ours = pipeline("image-classification", model=str(folder))
    with pytest.raises(InvalidInput, match="too small"):
        ours(images[0])
    larger = tiny_vision_checkpoint(tmp_path / "larger", "swin", "image-classification", labels=LABELS,
                                    window_size=5, image_size=40, processor={"size": {"height": 40, "width": 40}})
    assert_same_labels(pipeline("image-classification", model=str(larger))(images[0], top_k=4),
                       transformers.pipeline("image-classification", model=str(larger))(images[0], top_k=4))


# ---------------------------------------------------------------------------------------------- document QA

@pytest.fixture(scope="module")
def docqa(tmp_path_factory):
    pipes = {}
    for vocab in ("bert", "bpe"):
        folder = layoutlm_checkpoint(tmp_path_factory.mktemp(f"acceptance-{vocab}"), vocab)
        pipes[vocab] = (pipeline("document-question-answering", model=str(folder)),
                        transformers.pipeline("document-question-answering", model=str(folder)))
    return pipes


def assert_same_answers(ours, ref, tol=1e-4):
    assert len(ours) == len(ref), (ours, ref)
    for o, r in zip(ours, ref):
        assert (o["answer"], o["start"], o["end"]) == (r["answer"], r["start"], r["end"]), (ours, ref)
        assert abs(o["score"] - r["score"]) <= tol, (ours, ref)


@pytest.mark.parametrize("vocab", ["bert", "bpe"])
def test_document_without_words_encodes_the_question_alone(docqa, vocab):
    """transformers' tokenizer reads an empty word list as no second sequence ([CLS] q [SEP], not
    [CLS] q [SEP] [SEP]). Only a question's own literal [CLS] / <s> can then answer, and its score
    depends on that layout: lightpipe encoded the pair (scores off by up to 1e-2)."""
    ours, ref = docqa[vocab]
    for question, params in [("[CLS] <s> what is it", dict(max_seq_len=40)),
                             ("[CLS] <s> what is it", dict(max_seq_len=40, padding="max_length", top_k=3)),
                             ("<s> x </s>", dict(max_seq_len=24, handle_impossible_answer=True, top_k=5)),
                             ("what is it?", dict(handle_impossible_answer=True, max_seq_len=40))]:
        assert_same_answers(ours(image=None, question=question, word_boxes=[], **params),
                            ref(image=None, question=question, word_boxes=[], **params))
    # In a batch next to documents with words (transformers cannot batch: compared with its single calls).
    inputs = [{"image": None, "question": "[CLS] <s> what", "word_boxes": boxes}
              for boxes in ([], word_boxes()[:5], [])]
    for o, r in zip(ours(inputs, batch_size=3, top_k=2, max_seq_len=40), ref(inputs, top_k=2, max_seq_len=40)):
        assert_same_answers(o, r)


def test_question_too_long_for_a_document_without_words(docqa):
    """A question that fills max_seq_len exactly is answered (transformers too); one token more and
    transformers fails in its tokenizer ("Second sequence not provided"); lightpipe says InvalidInput."""
    ours, ref = docqa["bert"]
    fits = "q " * 22  # 22 tokens + [CLS] + [SEP] = 24
    assert_same_answers(ours(image=None, question=fits, word_boxes=[], max_seq_len=24, handle_impossible_answer=True),
                        ref(image=None, question=fits, word_boxes=[], max_seq_len=24, handle_impossible_answer=True))
    with pytest.raises(Exception, match="Second sequence"):
        ref(image=None, question=fits + "q", word_boxes=[], max_seq_len=24)
    with pytest.raises(InvalidInput, match="max_seq_len=24"):
        ours(image=None, question=fits + "q", word_boxes=[], max_seq_len=24)
    assert_same_answers(ours(image=None, question="what?", word_boxes=[], max_seq_len=24, top_k=2),  # still answers
                        ref(image=None, question="what?", word_boxes=[], max_seq_len=24, top_k=2))
