"""text-generation: a prompt (or a chat) -> its continuation, with a decoder-only language model.

preprocess renders a chat with the checkpoint's template and tokenizes; forward runs lightpipe.generation over a
left-padded batch; postprocess decodes. Results have transformers' shapes: a prompt gives a list of
{"generated_text": ...} (one per returned sequence); a chat gives the chat with the reply appended as an assistant
message.

Generation options come, in order of precedence, from the call, the pipeline's construction, the checkpoint's
generation config, and transformers' pipeline defaults for options none of those set (sampling at temperature 0.7,
256 new tokens).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from .. import checks
from ..errors import InvalidInput
from ..generation import GenerationConfig, generate
from ..processing import chat as chat_templates
from ..runtime import ModelItem, Padding
from .base import TextPipeline

# transformers' text-generation pipeline defaults, for options that neither the user nor the checkpoint set.
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_OPTIONS = {"temperature", "top_k", "top_p", "min_p", "typical_p"}
GENERATION_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerationConfig)
                           if f.name not in ("extra", "set_options", "forced_tokens",
                                             "output_scores"))
IGNORED_OPTIONS = ("use_cache", "return_dict_in_generate")  # always on / always a dict in lightpipe


class TextGenerationPipeline(TextPipeline):
    task = "text-generation"
    components: ClassVar[tuple[str, ...]] = ("tokenizer", "generation_config")
    preprocess_params = ("prefix", "truncation", "add_special_tokens", "continue_final_message",
                         "handle_long_generation", "tools", "documents")
    forward_params = GENERATION_OPTIONS + ("generate_kwargs", "streamer", "seed", "stop_sequence") + IGNORED_OPTIONS
    postprocess_params = ("return_full_text", "return_tensors", "return_text", "clean_up_tokenization_spaces",
                          "skip_special_tokens")

    def __init__(self, model, tokenizer=None, *, generation_config: GenerationConfig | None = None, **params):
        self.generation_config = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
        # The options the checkpoint itself sets: the pipeline's defaults never override them.
        self._checkpoint_set = set(self.generation_config.set_options)
        super().__init__(model, tokenizer, **params)

    # ------------------------------------------------------------------ parameters
    def collate_padding(self) -> Padding:
        pad_id = self._pad_id()
        # Decoder-only models generate after the prompt: prompts are padded on the left.
        return Padding(values={"input_ids": pad_id, "attention_mask": 0}, side="left")

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.generation_config.pad_token_id,
                          *self.generation_config.eos_token_ids):
            if candidate is not None:
                return candidate
        return 0

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        forward = {k: v for k, v in params.items() if k in self.forward_params}
        if forward:
            self.generation_options(forward)  # raises InvalidInput before any work
        if sum(params.get(k) is not None for k in ("return_full_text", "return_tensors", "return_text")) > 1 and \
                params.get("return_tensors"):
            raise InvalidInput("return_tensors is mutually exclusive with return_full_text and return_text.")
        for name in ("return_full_text", "return_tensors", "return_text", "truncation", "add_special_tokens",
                     "skip_special_tokens", "continue_final_message"):
            checks.flag(name, params.get(name))
        if params.get("prefix") is not None and not isinstance(params["prefix"], str):
            raise InvalidInput(f"prefix must be a string, not {type(params['prefix']).__name__}.")
        long = params.get("handle_long_generation")
        if long is not None and long != "hole":
            raise InvalidInput(f"handle_long_generation must be None or 'hole', not {long!r}.")

    def generation_options(self, forward: Mapping[str, Any]) -> tuple[GenerationConfig, dict[str, Any]]:
        """The call's forward parameters -> (the GenerationConfig to use, the other options: streamer, seed)."""
        forward = dict(forward)
        other = {k: forward.pop(k) for k in ("streamer", "seed") if k in forward}
        for name in IGNORED_OPTIONS:
            forward.pop(name, None)
        extra = forward.pop("generate_kwargs", None) or {}
        if not isinstance(extra, Mapping):
            raise InvalidInput(f"generate_kwargs must be a dict, not {type(extra).__name__}.")
        extra = dict(extra)
        for name in ("streamer", "seed"):
            if name in extra:
                other[name] = extra.pop(name)
        for name in IGNORED_OPTIONS:
            extra.pop(name, None)
        unknown = sorted(set(extra) - set(GENERATION_OPTIONS))
        if unknown:
            raise InvalidInput(f"unknown generation option(s) {', '.join(unknown)} in generate_kwargs; "
                               f"known: {', '.join(GENERATION_OPTIONS)}.")
        options = {**extra, **forward}
        stop = options.pop("stop_sequence", None)
        if stop is not None:
            options.setdefault("stop_strings", stop)
        if isinstance(options.get("bad_words_ids"), list):
            options["bad_words_ids"] = [tuple(x) if isinstance(x, list) else x for x in options["bad_words_ids"]]
        set_here = self._checkpoint_set | {k for k, v in options.items() if v is not None}
        added = {k: v for k, v in PIPELINE_DEFAULTS.items()
                 if k not in set_here and not (k == "max_new_tokens" and "max_length" in set_here)}
        if self.tokenizer.pad_token_id is not None and "pad_token_id" not in set_here:
            added["pad_token_id"] = self.tokenizer.pad_token_id
        merged_sampling = {**added, **options}.get("do_sample", self.generation_config.do_sample)
        if not merged_sampling:
            added = {k: v for k, v in added.items() if k not in SAMPLING_OPTIONS}
        chosen = {k: v for k, v in {**added, **options}.items() if v is not None}
        checks.positive_int("seed", other.get("seed"), allow_none=True, allow_zero=True)
        streamer = other.get("streamer")
        if streamer is not None and not (callable(getattr(streamer, "put", None))
                                         and callable(getattr(streamer, "end", None))):
            raise InvalidInput("streamer must have put(token_ids) and end() methods (transformers' streamer protocol).")
        config = self.generation_config.replace(**chosen)
        if streamer is not None and config.num_beams > 1:
            raise InvalidInput("streaming works with greedy decoding and sampling, not beam search (num_beams > 1).")
        return config, other

    # ------------------------------------------------------------------ calling
    def is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, str) or chat_templates.is_chat(inputs) or super().is_single(inputs)

    def __call__(self, inputs, **params):
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise InvalidInput("no input given: pass a prompt, a chat, or a list of them.")
        return super().__call__(inputs, **params)

    # ------------------------------------------------------------------ the three stages
    def preprocess(self, inputs, prefix=None, truncation=None, add_special_tokens=None, continue_final_message=None,
                   handle_long_generation=None, tools=None, documents=None):
        if chat_templates.is_chat(inputs):
            continued = chat_templates.wants_continuation(inputs, continue_final_message)
            text = chat_templates.apply_chat_template(self.tokenizer, inputs, add_generation_prompt=not continued,
                                                      continue_final_message=continued, tools=tools,
                                                      documents=documents)
            # The template writes the special tokens itself.
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            meta = {"chat": inputs, "continued": continued}
        else:
            if not isinstance(inputs, str):
                raise InvalidInput(f"a prompt must be a string or a chat (a list of {{'role', 'content'}} "
                                   f"messages), not {type(inputs).__name__}.")
            add = True if add_special_tokens is None else add_special_tokens
            ids = self.tokenizer.encode((prefix or "") + inputs, add_special_tokens=add).ids
            meta = {"prompt": inputs}
        if not ids:
            bos = self.generation_config.bos_token_id
            if bos is None:
                bos = self.tokenizer.special_id("bos_token")
            if bos is None:
                raise InvalidInput("the prompt is empty and this model has no beginning-of-sequence token to start "
                                   "from: give some text.")
            ids = [bos]
        ids = self._fit_context(ids, truncation or handle_long_generation == "hole")
        meta["prompt_ids"] = ids
        features = {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.ones(len(ids), dtype=torch.long)}
        return [ModelItem(features, meta)]

    def _fit_context(self, ids: list[int], truncate: bool) -> list[int]:
        """The prompt, or its end when it does not fit the model's context and truncation is on."""
        limit = getattr(self.model, "max_positions", None)
        if limit is None or len(ids) < limit:
            return ids
        if not truncate:
            raise InvalidInput(f"the prompt is {len(ids)} tokens long and this model's context holds {limit}: "
                               f"{len(ids) - limit + 1} tokens too many to generate even one more. Shorten it, or "
                               "pass truncation=True to keep its end.")
        return ids[len(ids) - limit + 1:]

    def prepare_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        config, other = self.generation_options(params)
        return {"config": config, **other}

    def forward(self, batch, config: GenerationConfig, streamer=None, seed=None):
        prompt_length = batch["input_ids"].shape[1]
        limit = getattr(self.model, "max_positions", None)
        if limit is not None and config.max_new_tokens is not None and prompt_length + config.max_new_tokens > limit:
            # The prompts fit; ask for no more than the context leaves (transformers would fail inside the model).
            config = config.replace(max_new_tokens=limit - prompt_length)
        generator = None if seed is None else torch.Generator(device=batch["input_ids"].device).manual_seed(seed)
        on_token = None
        if streamer is not None:
            streamer.put(batch["input_ids"].cpu())
            on_token = lambda tokens, running: streamer.put(tokens.cpu())  # noqa: E731
        try:
            out = generate(self.model, batch["input_ids"], config, attention_mask=batch["attention_mask"],
                           tokenizer=self.tokenizer, on_token=on_token, generator=generator)
        finally:
            if streamer is not None:
                streamer.end()
        n = config.num_return_sequences
        ends = config.eos_token_ids
        generated = [_until_end(row, ends) for row in out.generated.tolist()]
        return {"generated": [generated[i * n:(i + 1) * n] for i in range(batch["input_ids"].shape[0])]}

    def postprocess(self, outputs, metas, return_full_text=None, return_tensors=None, return_text=None,
                    clean_up_tokenization_spaces=None, skip_special_tokens=None):
        meta, sequences = metas[0], outputs[0]["generated"]
        records = []
        for generated in sequences:
            if return_tensors:
                records.append({"generated_token_ids": meta["prompt_ids"] + generated})
                continue
            text = self.tokenizer.decode(generated, skip_special_tokens=True if skip_special_tokens is None
                                         else skip_special_tokens,
                                         clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            full = True if return_full_text is None else return_full_text
            records.append({"generated_text": self._full(text, meta) if full else text})
        return records

    @staticmethod
    def _full(text: str, meta: dict):
        if "chat" not in meta:
            return meta["prompt"] + text
        return chat_templates.append_reply(meta["chat"], text, continued=meta["continued"])

    # ------------------------------------------------------------------ streaming
    def stream(self, inputs, **params) -> Iterator[str]:
        """Yield the new text of one prompt or chat as it is generated, in pieces that join to the full reply
        (greedy decoding or sampling; the same parameters as a call)."""
        if not self.is_single(inputs):
            raise InvalidInput("stream() takes one prompt or one chat; call the pipeline for lists.")
        if "streamer" in params or "streamer" in (params.get("generate_kwargs") or {}):
            raise InvalidInput("stream() streams by itself: do not pass a streamer.")
        from ..processing.detokenize import Detokenizer

        pieces: queue.Queue = queue.Queue()
        skip = params.get("skip_special_tokens")
        decoder = Detokenizer(self.tokenizer, skip_special_tokens=True if skip is None else skip)
        streamer = _QueueStreamer(decoder, pieces)
        failure: list[BaseException] = []

        def run():
            try:
                self(inputs, **params, streamer=streamer)
            except BaseException as e:  # handed to the consumer
                failure.append(e)
            finally:
                pieces.put(_DONE)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while True:
            piece = pieces.get()
            if piece is _DONE:
                break
            yield piece
        worker.join()
        if failure:
            raise failure[0]


_DONE = object()


class _QueueStreamer:
    """transformers' streamer protocol (put / end) -> text pieces of the new tokens on a queue."""

    def __init__(self, decoder, pieces: queue.Queue):
        self.decoder, self.pieces = decoder, pieces
        self.prompt_seen = False

    def put(self, token_ids: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        piece = self.decoder.add(token_ids.reshape(-1).tolist())
        if piece:
            self.pieces.put(piece)

    def end(self) -> None:
        piece = self.decoder.finish()
        if piece:
            self.pieces.put(piece)


def _until_end(tokens: list[int], eos: list[int]) -> list[int]:
    """A row's generated tokens up to and including its first end-of-sequence token (the rest is padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens
