"""lightpipe.ray: the predictor on dict / pandas / pyarrow batches (no cluster), then map_pipeline and map_batches on a
local Ray cluster (two CPUs, started and stopped once here): results equal the plain pipeline's, in order of ids."""

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import soundfile

from ctc_helpers import CLIPS, RATE, ctc_checkpoint
from lightpipe import InvalidInput, pipeline
from lightpipe.ray import PipelinePredictor, map_pipeline
from helpers import results_close

TEXTS = ["I love this movie, it is great!", "bad", "The river flows through the old city at night.", "ok then",
         "what where who when why how does did do can will would", "fine", "no", "The end."]


close = results_close  # results equal up to float noise (tests/helpers.py)


def wav_bytes(clip) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, RATE, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def text_model(checkpoint):
    return str(checkpoint("bert", "sequence-classification"))


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory):
    return str(ctc_checkpoint(tmp_path_factory.mktemp("ctc")))


@pytest.fixture(scope="module")
def transcripts(ctc_model):
    return [r["text"] for r in pipeline("automatic-speech-recognition", model=ctc_model)(list(CLIPS))]


# ------------------------------------------------------------------ the predictor alone


def test_dict_batch_of_texts_gets_label_and_score_columns(text_model):
    expected = pipeline("text-classification", model=text_model)(TEXTS)
    predict = PipelinePredictor("text-classification", model=text_model, input_column="text", batch_size=3)
    batch = {"id": np.arange(len(TEXTS)), "text": np.array(TEXTS)}
    out = predict(batch)
    assert list(out) == ["id", "text", "label", "score"]
    assert list(out["id"]) == list(range(len(TEXTS)))
    assert close([{"label": l, "score": s} for l, s in zip(out["label"], out["score"])], expected)


def test_list_results_and_output_column(text_model):
    expected = pipeline("text-classification", model=text_model, top_k=None)(TEXTS)
    frame = pd.DataFrame({"text": TEXTS})
    out = PipelinePredictor("text-classification", model=text_model, input_column="text", top_k=None)(frame)
    assert list(out.columns) == ["text", "output"] and close(list(out["output"]), expected)
    out = PipelinePredictor("text-classification", model=text_model, input_column="text",
                            output_column="labels")(pa.table({"text": TEXTS}))
    assert out.column_names == ["text", "labels"]
    assert close(out.column("labels").to_pylist(), pipeline("text-classification", model=text_model)(TEXTS))


def test_audio_bytes_and_arrays(ctc_model, transcripts):
    predict = PipelinePredictor("automatic-speech-recognition", model=ctc_model, input_column="audio", batch_size=2)
    out = predict({"audio": np.array([wav_bytes(c) for c in CLIPS], dtype=object)})
    assert list(out["text"]) == transcripts
    arrays = np.empty(len(CLIPS), dtype=object)
    arrays[:] = list(CLIPS)
    assert list(predict({"audio": arrays})["text"]) == transcripts
    rows = [{"array": c.tolist(), "sampling_rate": RATE} for c in CLIPS]  # how Arrow gives back a struct column
    assert list(predict(pd.DataFrame({"audio": rows}))["text"]) == transcripts


def test_image_bytes_and_paths(tmp_path):
    from vision_helpers import image_bytes, smooth_image, tiny_vision_checkpoint

    model = str(tiny_vision_checkpoint(tmp_path / "vit", "vit", "image-classification"))
    images = [smooth_image(h, w, seed=i) for i, (h, w) in enumerate([(40, 50), (33, 33), (60, 20)])]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"image{i}.png"))
        image.save(paths[-1])
    expected = pipeline("image-classification", model=model)(paths)
    predict = PipelinePredictor("image-classification", model=model, input_column="image", output_column="labels")
    assert close(list(predict({"image": np.array(paths)})["labels"]), expected)
    files = np.array([image_bytes(image, "PNG") for image in images], dtype=object)
    assert close(list(predict(pd.DataFrame({"image": files}))["labels"]), expected)


def test_one_row_batches_keep_the_shape_of_the_others(checkpoint):
    """question-answering and fill-mask answer a list of one input with its result, not a list of one."""
    qa_model = str(checkpoint("bert", "question-answering"))
    questions = [{"question": "Who works here?", "context": "John works at Google in London."},
                 {"question": "Where?", "context": "Mary lives in Berlin."}]
    expected = pipeline("question-answering", model=qa_model)(questions)
    predict = PipelinePredictor("question-answering", model=qa_model, input_column="qa")
    for rows in (questions, questions[1:]):
        out = predict({"qa": np.array(rows, dtype=object)})
        assert list(out) == ["qa", "score", "start", "end", "answer"]
        assert list(out["answer"]) == [r["answer"] for r in expected[-len(rows):]]
    fill = PipelinePredictor("fill-mask", model=str(checkpoint("bert", "masked-lm")), input_column="text", top_k=1)
    for texts in (["Paris is the [MASK] of France.", "I [MASK] it."], ["I [MASK] it."]):
        assert [len(r) for r in fill({"text": np.array(texts)})["output"]] == [1] * len(texts)


def test_on_error_in_batches(ctc_model, transcripts):
    audio = np.array([wav_bytes(CLIPS[0]), b"", wav_bytes(CLIPS[1]), b"not audio"], dtype=object)
    batch = {"id": np.arange(4), "audio": audio}
    record = PipelinePredictor("automatic-speech-recognition", model=ctc_model, input_column="audio",
                               on_error="record", batch_size=4)(batch)
    assert list(record["text"]) == [transcripts[0], None, transcripts[1], None]
    assert [e is None for e in record["error"]] == [True, False, True, False]
    assert list(record["error_type"]) == [None, "InvalidInput", None, "InvalidInput"]
    all_bad = PipelinePredictor("automatic-speech-recognition", model=ctc_model, input_column="audio",
                                on_error="record")
    all_bad(batch)
    out = all_bad({"audio": np.array([b"", b"??"], dtype=object)})  # keeps the columns of the batch before
    assert list(out) == ["audio", "text", "error", "error_type"] and list(out["text"]) == [None, None]
    skip = PipelinePredictor("automatic-speech-recognition", model=ctc_model, input_column="audio",
                             on_error="skip")(batch)
    assert list(skip["id"]) == [0, 2] and list(skip["text"]) == transcripts[:2] and "error" not in skip
    with pytest.raises(InvalidInput):
        PipelinePredictor("automatic-speech-recognition", model=ctc_model, input_column="audio")(batch)


def test_bad_arguments(text_model):
    with pytest.raises(InvalidInput, match="on_error"):
        PipelinePredictor("text-classification", model=text_model, input_column="text", on_error="ignore")
    predict = PipelinePredictor("text-classification", model=text_model, input_column="sentence")
    with pytest.raises(InvalidInput, match="no column 'sentence'"):
        predict({"text": np.array(TEXTS)})
    predict = PipelinePredictor("text-classification", model=text_model, input_column="label")
    with pytest.raises(InvalidInput, match="replace the input column"):
        predict({"label": np.array(TEXTS)})


# ------------------------------------------------------------------ on a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()


def test_map_pipeline_on_two_actors_equals_the_plain_pipeline(ray_cluster, ctc_model, transcripts):
    """Audio file bytes, one of them bad (recorded), over two actors that each load the pipeline once."""
    ray = ray_cluster
    audio = [wav_bytes(c) for c in CLIPS] + [b"RIFF...."] + [wav_bytes(c) for c in CLIPS[::-1]]
    ds = ray.data.from_items([{"id": i, "audio": a} for i, a in enumerate(audio)], override_num_blocks=3)
    out = map_pipeline(ds, "automatic-speech-recognition", model=ctc_model, input_column="audio", on_error="record",
                       batch_size=2, ray_batch_size=3, concurrency=2, num_cpus=0.5)
    rows = sorted(out.drop_columns(["audio"]).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(audio)))
    assert [r["text"] for r in rows] == transcripts + [None] + transcripts[::-1]
    assert [r["error_type"] for r in rows] == [None] * len(CLIPS) + ["InvalidInput"] + [None] * len(CLIPS)
