"""Whisper's timestamp rules as a logits processor: what `whisper_generate` adds to generate() when timestamps are asked
for (generation/ itself knows no architecture)."""

from __future__ import annotations

import torch

from ..generation.processors import NEG_INF


class WhisperTimestamps:
    """Whisper's timestamp grammar (the rules of openai/whisper, as transformers' WhisperTimeStampLogitsProcessor).

    Timestamp tokens are ids >= no_timestamps_token_id + 1. Among the generated tokens (from `begin_index`):
    timestamps come in pairs (except just before end of text); they never decrease; the first token is a
    timestamp no later than `max_initial_timestamp_index`; and when the timestamps together are more likely
    than the best text token, a timestamp must be chosen. <|notimestamps|> is never chosen.
    """

    def __init__(self, no_timestamps_token_id: int, eos_token_id: int, begin_index: int,
                 max_initial_timestamp_index: int | None = None, detect_timestamp_from_logprob: bool = True):
        self.no_timestamps_token_id = no_timestamps_token_id
        self.timestamp_begin = no_timestamps_token_id + 1
        self.eos_token_id = eos_token_id
        self.begin_index = begin_index
        self.max_initial_timestamp_index = max_initial_timestamp_index
        self.detect_timestamp_from_logprob = detect_timestamp_from_logprob

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Each rule masks a slice of the vocabulary for the rows it concerns ((rows, 1) conditions broadcast over a
        # view): no (rows, vocabulary) mask is built, which cost ~1 ms per step at batch 4 and 4 ms with 5 beams.
        scores = scores.clone()
        scores[:, self.no_timestamps_token_id] = NEG_INF
        begin = self.timestamp_begin
        stamps = scores[:, begin:]  # (rows, timestamps), a view
        generated = input_ids[:, self.begin_index:]  # (rows, n)
        rows, n = generated.shape

        if n:
            stamp = generated >= begin  # (rows, n)
            last_was = stamp[:, -1]
            penultimate_was = stamp[:, -2] if n >= 2 else torch.ones_like(last_was)
            # After a lone timestamp the next token is a timestamp or end of text; after a pair, text.
            scores[:, :self.eos_token_id].masked_fill_((last_was & ~penultimate_was)[:, None], NEG_INF)
            stamps.masked_fill_((last_was & penultimate_was)[:, None], NEG_INF)
            # Timestamps never decrease: below the last one is forbidden, and so is the last one itself unless it
            # opens a pair that must be closed (a repeated <|0.00|> otherwise).
            index = torch.arange(n, device=generated.device)
            last_index = torch.where(stamp, index, -1).max(dim=1).values  # (rows,), -1 without timestamps
            last_stamp = generated.gather(1, last_index.clamp(min=0)[:, None]).squeeze(1)
            lowest = torch.where(last_was & ~penultimate_was, last_stamp, last_stamp + 1)
            lowest = torch.where(last_index >= 0, lowest, torch.full_like(lowest, begin))
            offsets = torch.arange(stamps.shape[1], device=scores.device)  # timestamp j is token begin + j
            stamps.masked_fill_(offsets < (lowest - begin)[:, None], NEG_INF)
        else:
            # The first generated token must be a timestamp, and an early one.
            scores[:, :begin] = NEG_INF
            if self.max_initial_timestamp_index is not None:
                scores[:, begin + self.max_initial_timestamp_index + 1:] = NEG_INF

        if self.detect_timestamp_from_logprob:
            logprobs = torch.log_softmax(scores.float(), dim=-1)
            timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
            best_text_logprob = logprobs[:, :begin].max(dim=-1).values
            must_stamp = (timestamp_logprob > best_text_logprob)[:, None]  # (rows, 1)
            scores[:, :begin].masked_fill_(must_stamp, NEG_INF)
        return scores
