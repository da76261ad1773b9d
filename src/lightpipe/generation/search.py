"""Token selection strategies: greedy, sampling, and beam search.

Greedy and sampling pick one token per row from the processed scores. Beam search keeps `num_beams`
running hypotheses per input and up to `num_beams` finished ones; it is transformers' vectorised beam
search step for step (same candidate count, length penalty, early-stopping heuristics and tie order), so
its results equal the reference's.
"""

from __future__ import annotations

import torch

LARGE_NEGATIVE = -1.0e9  # transformers' "impossible" score; kept rather than -inf so that sums stay finite


class Greedy:
    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows, V) scores -> (rows,) best tokens."""
        return scores.argmax(dim=-1)


class Sample:
    """Draw from softmax(scores); `generator` makes draws reproducible without touching the global RNG."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


class BeamSearch:
    """Beam search state for `batch` inputs with `num_beams` beams each (rows = batch * num_beams).

    Per step: `step(log_probs)` takes the processed (rows, V) log-probabilities of the next token, extends the
    hypotheses, and returns the (rows,) parent row of each new running beam (reorder the cache with it).
    `tokens()` gives the running (rows, length) sequences; `finished` says whether the search is over.
    """

    def __init__(self, prompt: torch.Tensor, batch: int, num_beams: int, max_length: int, eos_ids: list[int],
                 fill_token: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 do_sample: bool = False, generator: torch.Generator | None = None):
        rows, prompt_length = prompt.shape
        device = prompt.device
        self.batch, self.num_beams, self.max_length = batch, num_beams, max_length
        self.prompt_length = self.length = prompt_length
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.do_sample, self.generator = do_sample, generator
        # Candidates kept per step: enough that num_beams of them are not finished, even if the best all end.
        self.candidates = max(2, 1 + len(eos_ids)) * num_beams
        self.top_beams = torch.arange(self.candidates, device=device) < num_beams  # (K,)

        self.running = torch.full((batch, num_beams, max_length), fill_token, dtype=torch.long, device=device)
        self.running[:, :, :prompt_length] = prompt.view(batch, num_beams, prompt_length)
        self.running_scores = torch.zeros((batch, num_beams), device=device)
        self.running_scores[:, 1:] = LARGE_NEGATIVE  # only the first beam counts at the start: beams are equal
        self.running_parents = torch.full((batch, num_beams, max_length - prompt_length), -1, dtype=torch.long,
                                          device=device)
        self.best = self.running.clone()  # finished hypotheses, best first
        self.best_scores = torch.full((batch, num_beams), LARGE_NEGATIVE, device=device)
        self.best_parents = self.running_parents.clone()
        self.best_done = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
        self.can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.finished = False

    def tokens(self) -> torch.Tensor:
        """(rows, length) running sequences."""
        return self.running[:, :, :self.length].reshape(-1, self.length)

    def step(self, log_probs: torch.Tensor) -> torch.Tensor:
        batch, beams, length = self.batch, self.num_beams, self.length
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, beams, vocab) + self.running_scores[:, :, None]).view(batch, beams * vocab)
        cand_scores, cand_ids = self._top_candidates(total)  # (batch, K)

        # Candidate k continues beam cand_ids // vocab with token cand_ids % vocab.
        source_beam = cand_ids // vocab
        cand_tokens = cand_ids % vocab
        cand_running = _gather(self.running, source_beam)  # (batch, K, max_length)
        cand_running[:, :, length] = cand_tokens
        cand_parents = _gather(self.running_parents, source_beam)
        row_offset = torch.arange(batch, device=cand_ids.device)[:, None] * beams
        cand_parents[:, :, length - self.prompt_length] = source_beam + row_offset  # the row, across the batch

        ends = torch.isin(cand_tokens, self.eos)  # (batch, K)
        if length + 1 >= self.max_length:
            ends = torch.ones_like(ends)

        # The best num_beams candidates that go on become the running beams.
        going_on = cand_scores + ends.float() * LARGE_NEGATIVE
        keep = torch.topk(going_on, k=beams).indices
        self.running = _gather(cand_running, keep)
        self.running_scores = _gather(going_on, keep)
        self.running_parents = _gather(cand_parents, keep)

        self._add_finished(cand_running, cand_scores, cand_parents, ends)
        self.length += 1
        self._update_can_improve()
        # Go on while some input can still improve, (with early_stopping=True) has fewer than num_beams finished
        # hypotheses, and some candidate was not stopped.
        all_full = bool(self.best_done.all()) and self.early_stopping is True
        self.finished = not bool(self.can_improve.any()) or all_full or bool(ends.all())
        return self.running_parents[:, :, length - self.prompt_length].reshape(-1)

    def _top_candidates(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.do_sample:
            return torch.topk(total, k=self.candidates)
        ids = torch.multinomial(total.softmax(dim=-1), num_samples=self.candidates, generator=self.generator)
        scores, order = total.gather(1, ids).sort(dim=-1, descending=True)
        return scores, ids.gather(1, order)

    def _add_finished(self, cand_running, cand_scores, cand_parents, ends) -> None:
        """Merge candidates that just ended (among the top num_beams) into the finished hypotheses."""
        just_ended = ends & self.top_beams[None, :]
        scores = cand_scores / ((self.length + 1 - self.prompt_length) ** self.length_penalty)
        full = self.best_done.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        scores = scores + full.float() * LARGE_NEGATIVE
        scores = scores + (~self.can_improve).float() * LARGE_NEGATIVE
        scores = scores + (~just_ended).float() * LARGE_NEGATIVE
        merged_scores = torch.cat((self.best_scores, scores), dim=1)
        top = torch.topk(merged_scores, k=self.num_beams).indices
        self.best = _gather(torch.cat((self.best, cand_running), dim=1), top)
        self.best_scores = _gather(merged_scores, top)
        self.best_parents = _gather(torch.cat((self.best_parents, cand_parents), dim=1), top)
        self.best_done = _gather(torch.cat((self.best_done, just_ended), dim=1), top)

    def _update_can_improve(self) -> None:
        """Whether the best running beam could still beat the worst finished hypothesis (transformers' heuristic)."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_length
        else:
            best_length = self.length - self.prompt_length
        best_running = self.running_scores[:, :1] / (best_length ** self.length_penalty)
        worst_done = torch.where(self.best_done, self.best_scores.min(dim=1, keepdim=True).values,
                                 torch.tensor(LARGE_NEGATIVE, device=self.best_scores.device))
        self.can_improve = self.can_improve & (best_running > worst_done).any(dim=-1, keepdim=True)

    def result(self, num_return_sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequences (batch*n, T), scores (batch*n,), parents (batch*n, T - prompt)) of the n best hypotheses,
        cut to the longest one. parents[i, s] is the row whose scores chose generated token s (-1 past the end)."""
        n = num_return_sequences
        sequences = self.best[:, :n].reshape(self.batch * n, -1)
        scores = self.best_scores[:, :n].reshape(-1)
        parents = self.best_parents[:, :n].reshape(self.batch * n, -1)
        generated = int((parents >= 0).sum(dim=1).max())
        return sequences[:, :self.prompt_length + generated], scores, parents[:, :generated]


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (batch, beams, ...) -> tensor[b, index[b, j], ...] for index (batch, k)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)
