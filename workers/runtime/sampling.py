"""Per-job sampling inside one batched ``model.generate`` call.

HF's sampling draws every row of a batch from torch's process-global generator, so a job's tokens
would depend on how many rows were drawn before it, i.e. on its batch neighbours. ``JobSampler``
instead samples each job's rows from that job's own ``torch.Generator`` with its own temperature,
top-k and top-p, and hands back logits on which greedy decoding picks exactly the sampled token:
``generate`` runs with ``do_sample=False``, so none of HF's own warpers touch the logits after it.

Draw order (what makes a job's stream independent of its neighbours): at every decoding step each
sampling job draws ``rows_per_job`` uniforms (one per codebook row, codebook 0 first) from its own
generator, whether or not the delay pattern later overwrites that position. A job's n-th draw is
therefore always the same number, however many jobs share the call and whatever their lengths.
Tokens are picked by inverting the cumulative distribution over the kept tokens in token-id
order. Every step is a per-row operation over the whole vocabulary (no sort of the batch: a full
stable sort cost more than the tiny model's decoder step), so a row's arithmetic does not depend
on its neighbours; only rows with top-p are sorted, each on its own.

Classifier-free guidance: transformers' MusicGen ``generate`` appends its own
``ClassifierFreeGuidanceLogitsProcessor`` *after* the processors it is given, so this processor
sees the doubled (conditional, unconditional) logits. It combines them itself with the same
formula and returns its choice twice; HF's guidance then computes ``u + (c - u) * s`` with
``c == u``, which is exactly ``u`` in floating point. Should a later transformers apply guidance
first, the logits arrive undoubled and are used as they are: correct either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from workers.runtime.batch import GenerationItem


@dataclass(frozen=True)
class JobSampling:
    """One job's sampling parameters, as the request contract defines them.

    ``temperature`` 0 is greedy (the seed is then unused); ``top_k`` 0 and ``top_p`` 0 or 1 are off.
    """

    seed: int
    temperature: float
    top_k: int
    top_p: float

    @property
    def greedy(self) -> bool:
        """Whether this job takes the most likely token at every step."""
        return self.temperature <= 0


def sampling_of(item: GenerationItem, seed: int) -> JobSampling:
    """``item``'s sampling parameters with the seed it runs under (``batch.seed_of``)."""
    return JobSampling(seed=seed, temperature=item.temperature, top_k=item.top_k, top_p=item.top_p)


class JobSampler(LogitsProcessor):
    """Samples each job's rows from its own generator; greedy decoding then picks that token.

    ``jobs`` are in batch order; row ``r`` of the (guided) logits belongs to job
    ``r // rows_per_job`` (transformers lays MusicGen's rows out as batch x codebooks).
    ``guidance_scale`` is the call's CFG scale, applied when the logits arrive doubled.
    """

    def __init__(self, jobs: Sequence[JobSampling], *, guidance_scale: float,
                 device: str | torch.device) -> None:
        if not jobs:
            raise ValueError("JobSampler needs at least one job")
        self._jobs = list(jobs)
        self._guidance_scale = guidance_scale
        self._device = torch.device(device)
        # Generators live on the model's device: a CUDA draw from a CPU generator is refused.
        self._generators = [
            None if job.greedy else torch.Generator(device=self._device).manual_seed(job.seed)
            for job in self._jobs]
        self._rows: dict[int, RowSampling] = {}  # by rows per job, built on first use

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        doubled = scores.shape[0] == 2 * input_ids.shape[0]
        if doubled:  # (conditional, unconditional) halves: HF's own formula, in the same order
            half = input_ids.shape[0]
            cond, uncond = scores[:half], scores[half:]
            logits = uncond + (cond - uncond) * self._guidance_scale
        else:
            logits = scores
        tokens = self.choose(logits)
        picked = torch.zeros_like(logits)
        # 1 on the chosen token and 0 elsewhere: finite, so HF's guidance arithmetic after us is
        # exact, and argmax (greedy decoding) returns the chosen token.
        picked.scatter_(1, tokens[:, None], 1.0)
        out = torch.cat([picked, picked]) if doubled else picked
        return out  # type: ignore[return-value]

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The token of every row of (guided) ``logits``, shaped ``(rows,)``."""
        rows, vocab = logits.shape
        if rows % len(self._jobs):
            raise ValueError(f"{rows} logit rows do not divide among {len(self._jobs)} jobs")
        per_job = rows // len(self._jobs)
        if all(generator is None for generator in self._generators):
            return logits.argmax(dim=-1)
        if per_job not in self._rows:
            self._rows[per_job] = RowSampling.of(self._jobs, per_job, self._device)
        return choose_tokens(logits, self._rows[per_job], self._draws(per_job, logits.device))

    def _draws(self, per_job: int, device: torch.device) -> torch.Tensor:
        """``per_job`` uniforms in [0, 1) per job, from that job's generator (zeros if greedy)."""
        parts = [torch.zeros(per_job, device=device) if generator is None
                 else torch.rand(per_job, generator=generator, device=device)
                 for generator in self._generators]
        return torch.cat(parts)


@dataclass(frozen=True)
class RowSampling:
    """Sampling parameters per logit row, for ``choose_tokens``.

    Tensors hold one value per row, shaped ``(rows, 1)``; the plain fields are the same facts
    known on the host, so that choosing a token never waits on the device to learn them.
    ``JobSampler`` builds one per call shape, the decode engine (``workers.runtime.engine``) one
    per set of active rows: both paths share one implementation of the arithmetic.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor  # inf where top-p is off
    greedy: torch.Tensor
    max_top_k: int  # the largest top_k of any row, 0 when no row filters by top-k
    nucleus: torch.Tensor | None  # indices of the rows with top-p on, None when none has
    # Host-side shortcuts, each skipping whole-vocabulary passes that would change nothing:
    # a division by a temperature of 1, the greedy argmax when no row is greedy, and the
    # per-row top-k bookkeeping when every row keeps the same k > 0.
    unit_temperature: bool = False  # every row's temperature is 1 (or the row is greedy)
    any_greedy: bool = True
    same_top_k: int = 0  # the one top_k of every row when they share one > 0, else 0

    @classmethod
    def of(cls, jobs: Sequence[JobSampling], per_job: int,
           device: str | torch.device) -> RowSampling:
        """``per_job`` consecutive rows for each of ``jobs``, in order (MusicGen's codebooks)."""
        def per_row(values: list[float] | list[int] | list[bool]) -> torch.Tensor:
            return torch.tensor(values, device=device).repeat_interleave(per_job)[:, None]

        # top_p 0 ("off") keeps every token: compare against infinity rather than 1.0, so that
        # float rounding of a cumulative sum near 1 can never drop a token when it is off.
        top_p = [job.top_p if 0 < job.top_p < 1 else float("inf") for job in jobs]
        nucleus = [index * per_job + offset for index, p in enumerate(top_p)
                   if p != float("inf") for offset in range(per_job)]
        temperatures = [1.0 if job.greedy else job.temperature for job in jobs]
        top_ks = {job.top_k for job in jobs}
        return cls(
            temperature=per_row(temperatures),
            top_k=per_row([job.top_k for job in jobs]), top_p=per_row(top_p),
            greedy=per_row([job.greedy for job in jobs]),
            max_top_k=max(top_ks),
            nucleus=torch.tensor(nucleus, device=device) if nucleus else None,
            unit_temperature=all(t == 1.0 for t in temperatures),
            any_greedy=any(job.greedy for job in jobs),
            same_top_k=top_ks.pop() if len(top_ks) == 1 and min(top_ks) > 0 else 0)


def choose_tokens(logits: torch.Tensor, rows: RowSampling, draws: torch.Tensor) -> torch.Tensor:
    """The token of every row of (guided) ``logits`` ``(rows, vocab)``, shaped ``(rows,)``.

    ``draws`` holds one uniform in [0, 1) per row (any value for greedy rows). Every operation
    is per row over the whole vocabulary, so a row's token depends on its own logits, parameters
    and draw only, never on the rows beside it. The shortcuts ``RowSampling`` allows skip only
    operations that would leave every value as it was (a division by 1, a filter that keeps
    everything), so a row's token is the same with or without them.
    """
    vocab = logits.shape[-1]
    scaled = logits.float()
    if not rows.unit_temperature:
        scaled = scaled / rows.temperature
    scaled = _top_k_filter(scaled, rows)
    probs = scaled.softmax(dim=-1)
    if rows.nucleus is not None:
        probs[rows.nucleus] = _top_p_filter(probs[rows.nucleus], rows.top_p[rows.nucleus])
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(1)
    # A draw rounding up to the total mass would land past the last kept token: clamp to it.
    ids = torch.arange(vocab, device=logits.device, dtype=torch.int32)
    last_kept = ((probs > 0) * ids).amax(dim=-1)
    sampled = torch.minimum(index, last_kept)
    if not rows.any_greedy:
        return sampled
    return torch.where(rows.greedy.squeeze(1), logits.argmax(dim=-1), sampled)


def _top_k_filter(scaled: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties at the k-th kept, as HF does); 0 = all."""
    if rows.max_top_k <= 0:
        return scaled
    vocab = scaled.shape[-1]
    if rows.same_top_k:  # every row keeps the same k: its k-th value is the last of topk's
        keep = min(rows.same_top_k, vocab)
        kth = scaled.topk(keep, dim=-1).values[:, keep - 1:]  # exact copies of the values
        return scaled.masked_fill(scaled < kth, float("-inf"))
    k = rows.top_k.clamp(1, vocab)
    largest = scaled.topk(min(rows.max_top_k, vocab), dim=-1).values
    kth = largest.gather(1, (k.clamp(max=largest.shape[-1]) - 1))
    # Rows with top-k off compare against -inf: nothing is below it, every token stays.
    kth = torch.where(rows.top_k > 0, kth, float("-inf"))
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside each row's nucleus: once the more likely tokens (ties broken by
    token id) hold ``top_p`` of the mass, the rest go; the most likely token always stays."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)
