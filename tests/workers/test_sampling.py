"""Per-job random streams and the loose batch key, on the real tiny model (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ClassifierFreeGuidanceLogitsProcessor, LogitsProcessorList

from workers.runtime import GenerationItem, LoadedModel, generate
from workers.runtime.batch import batch_groups, bucket_frames, padding_waste
from workers.runtime.frames import bucket_for, frames_for, max_new_tokens_for, padding_waste_for
from workers.runtime.sampling import JobSampler, JobSampling

# Measured on this CPU (float32, one thread): a seeded item alone and inside a batch of different
# neighbours samples the same tokens; its audio differs by at most 9e-8 (peak ~0.25), from
# float rounding in the batched text encoder and EnCodec decoder. A different token anywhere
# would move samples by ~1e-2, so this bound proves the token streams are identical.
ALONE_VS_BATCHED_MAX_DIFF = 1e-6


def job(seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0) -> JobSampling:
    return JobSampling(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p)


def choose(jobs: list[JobSampling], logits: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    sampler = JobSampler(jobs, guidance_scale=guidance, device="cpu")
    return sampler.choose(logits)


# --- (1) the same seeded item alone and among different neighbours -----------------------------

def test_a_seeded_item_sounds_the_same_alone_and_among_different_neighbours(
        tiny_model: LoadedModel) -> None:
    target = GenerationItem("calm piano", 0.5, seed=7, temperature=0.9, top_k=100, top_p=0.95)
    alone = generate(tiny_model, [target])[0]
    neighbours = [
        GenerationItem("loud rock drums with a much longer prompt than the target", 0.55, seed=1,
                       temperature=0.7, top_k=50),
        target,
        GenerationItem("jazz", 0.6, seed=99, top_k=0, top_p=0.9),
        GenerationItem("x", 0.52, seed=3, temperature=0.0),
        GenerationItem("ambient pads", 0.5, seed=7, top_k=250),  # same seed, other parameters
    ]
    batched = generate(tiny_model, neighbours)
    assert batched[1].batch_size == 5  # it really shared one call with all four
    assert batched[1].seed == alone.seed == 7
    assert batched[1].samples.shape == alone.samples.shape == (1, 16000)
    difference = float(np.abs(batched[1].samples - alone.samples).max())
    assert difference <= ALONE_VS_BATCHED_MAX_DIFF
    # Its place in the batch does not matter either.
    reordered = generate(tiny_model, [target, *neighbours[:1], *neighbours[2:]])
    assert float(np.abs(reordered[0].samples - alone.samples).max()) <= ALONE_VS_BATCHED_MAX_DIFF


def test_a_melody_item_sounds_the_same_alone_and_among_different_neighbours(
        tiny_melody_model: LoadedModel) -> None:
    t = np.arange(64000) / 32000
    tone = ((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 32000)
    shorter = ((0.5 * np.sin(2 * np.pi * 330 * t[:40000])).astype(np.float32), 32000)
    target = GenerationItem("calm piano", 0.5, seed=7, melody=tone)
    alone = generate(tiny_melody_model, [target])[0]
    neighbours = [GenerationItem("soft drums", 0.55, seed=1, melody=shorter, top_k=20), target,
                  GenerationItem("calm piano", 0.6, seed=3, temperature=0.0, melody=tone),
                  # A longer prompt runs in its own call: the melody model attends to padding.
                  GenerationItem("loud rock drums with a much longer prompt", 0.5, seed=4,
                                 melody=tone)]
    batched = generate(tiny_melody_model, neighbours)
    assert [r.batch_size for r in batched] == [3, 3, 3, 1]
    difference = float(np.abs(batched[1].samples - alone.samples).max())
    assert difference <= ALONE_VS_BATCHED_MAX_DIFF


def test_a_job_draws_the_same_tokens_wherever_it_sits_in_the_batch() -> None:
    torch.manual_seed(0)
    mine = torch.randn(4, 2048)
    others = torch.randn(8, 2048)
    alone = choose([job(seed=11, top_k=50)], mine)
    first = choose([job(seed=11, top_k=50), job(seed=3), job(seed=4, temperature=0.0)],
                   torch.cat([mine, others]))
    last = choose([job(seed=3, top_p=0.5), job(seed=4), job(seed=11, top_k=50)],
                  torch.cat([others, mine]))
    assert torch.equal(alone, first[:4]) and torch.equal(alone, last[8:])


# --- (2) seeds ---------------------------------------------------------------------------------

def test_same_seed_repeats_in_a_batch_and_other_seeds_differ(tiny_model: LoadedModel) -> None:
    items = [GenerationItem("calm piano", 0.4, seed=seed) for seed in (21, 22, 21)]
    first = generate(tiny_model, items)
    again = generate(tiny_model, items)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.samples, b.samples)
    # Same prompt and parameters in one call: only the seed tells rows apart.
    assert not np.array_equal(first[0].samples, first[1].samples)
    assert float(np.abs(first[0].samples - first[2].samples).max()) <= ALONE_VS_BATCHED_MAX_DIFF


def test_sampling_leaves_the_global_torch_generator_alone(tiny_model: LoadedModel) -> None:
    item = GenerationItem("calm piano", 0.3, seed=5)
    torch.manual_seed(1)
    first = generate(tiny_model, [item])[0].samples
    state = torch.random.get_rng_state()
    generate(tiny_model, [item])
    assert torch.equal(state, torch.random.get_rng_state())  # nothing drew from it
    torch.manual_seed(2)
    assert np.array_equal(first, generate(tiny_model, [item])[0].samples)


# --- (3) greedy rows pick the argmax of the guided logits --------------------------------------

def test_greedy_rows_pick_the_argmax_of_the_guided_logits() -> None:
    torch.manual_seed(1)
    scores = torch.randn(2 * 3 * 4, 2048)  # (cond, uncond) x 3 jobs x 4 codebooks
    input_ids = torch.zeros(3 * 4, 1, dtype=torch.long)
    jobs = [job(seed=1, temperature=0.0), job(seed=2), job(seed=3, temperature=0.0)]
    processors = LogitsProcessorList([JobSampler(jobs, guidance_scale=3.0, device="cpu"),
                                      ClassifierFreeGuidanceLogitsProcessor(3.0)])
    out = processors(input_ids, scores)  # HF appends its CFG after ours: it must pass through
    cond, uncond = scores.split(12)
    guided = uncond + (cond - uncond) * 3.0
    picked = out.argmax(dim=-1)
    assert out.shape == (12, 2048) and torch.equal(out.sum(dim=-1), torch.ones(12))
    assert torch.equal(picked[:4], guided[:4].argmax(dim=-1))
    assert torch.equal(picked[8:], guided[8:].argmax(dim=-1))
    assert not torch.equal(picked[4:8], guided[4:8].argmax(dim=-1))  # the sampled job


def test_temperature_zero_is_exactly_transformers_own_greedy_search(
        tiny_model: LoadedModel) -> None:
    item = GenerationItem("calm piano", 0.3, seed=1, temperature=0.0)
    ours = generate(tiny_model, [item])[0].samples
    steps = max_new_tokens_for(bucket_for(0.3, tiny_model), tiny_model.num_codebooks)
    inputs = tiny_model.processor(text=["calm piano"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        theirs = tiny_model.model.generate(**inputs, do_sample=False, guidance_scale=3.0,
                                           max_new_tokens=steps)
    assert np.array_equal(ours, theirs.numpy()[0, :, :ours.shape[-1]])


# --- (4) top-k 1 (and a vanishing top-p) equal greedy ------------------------------------------

@pytest.mark.parametrize("fields", [{"top_k": 1}, {"top_k": 0, "top_p": 1e-6}])
def test_a_one_token_nucleus_equals_greedy(tiny_model: LoadedModel,
                                           fields: dict[str, float]) -> None:
    greedy = generate(tiny_model, [GenerationItem("calm piano", 0.3, seed=1, temperature=0.0)])
    narrow = generate(tiny_model, [GenerationItem("calm piano", 0.3, seed=9, temperature=1.3,
                                                  **fields)])  # type: ignore[arg-type]
    assert np.array_equal(greedy[0].samples, narrow[0].samples)


def test_top_k_and_top_p_keep_only_their_tokens() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2000, 1)
    top2 = choose([job(seed=seed, top_k=2) for seed in range(500)], logits)
    assert set(top2.tolist()) == {0, 1}
    nucleus = choose([job(seed=seed, top_p=0.65) for seed in range(500)], logits)
    assert set(nucleus.tolist()) == {0, 1}  # 0.4 + 0.3 reach 0.65; 0.2 and 0.1 are cut


def test_sampled_tokens_follow_the_tempered_distribution() -> None:
    logits = torch.log(torch.tensor([[0.75, 0.25]])).repeat(4000, 1)
    tokens = choose([job(seed=seed) for seed in range(1000)], logits)
    assert abs(float((tokens == 1).float().mean()) - 0.25) < 0.03
    # Temperature 0.5 squares the odds: 0.25^2 / (0.75^2 + 0.25^2) = 0.1
    cooled = choose([job(seed=seed, temperature=0.5) for seed in range(1000)], logits)
    assert abs(float((cooled == 1).float().mean()) - 0.1) < 0.03


# --- (5) what shares a batch -------------------------------------------------------------------

@pytest.mark.parametrize(("frames", "bucket"), [
    (1, 8), (8, 8), (9, 16), (25, 32), (50, 56), (100, 112), (500, 512), (513, 640),
    (1490, 1500), (1500, 1500),
])
def test_bucket_edges(frames: int, bucket: int) -> None:
    assert bucket_frames(frames, 1500) == bucket


def test_batch_groups_split_by_bucket_guidance_and_melody_only() -> None:
    melody = (np.zeros(3200, dtype=np.float32), 32000)
    items = [
        GenerationItem("a", 1.0, seed=1),                                   # bucket 56
        GenerationItem("other prompt", 0.99, seed=2, temperature=0.2, top_k=3, top_p=0.5),
        GenerationItem("a", 1.0, seed=1, guidance_scale=4.0),              # other CFG scale
        GenerationItem("a", 1.0, seed=1, guidance_scale=1.0),              # CFG off ...
        GenerationItem("a", 1.0, seed=1, guidance_scale=0.5),              # ... is one call
        GenerationItem("a", 1.0, seed=1, melody=melody),                   # melody
        GenerationItem("a", 0.5, seed=1),                                   # bucket 32
        GenerationItem("a", 1.1, seed=9, temperature=0.0),                  # bucket 56 (55 frames)
    ]
    groups = batch_groups(items, lambda d: bucket_frames(max(1, round(d * 50)), 1500))
    assert groups == [[0, 1, 7], [2], [3, 4], [5], [6]]
    # A melody model also splits by prompt length in tokens (here: words).
    by_words = batch_groups(items, lambda d: bucket_frames(max(1, round(d * 50)), 1500),
                            lambda prompt: len(prompt.split()))
    assert by_words == [[0, 7], [1], [2], [3, 4], [5], [6]]


# --- (6) the padding waste ---------------------------------------------------------------------

def test_padding_waste_counts_frames_no_item_needed(tiny_model: LoadedModel) -> None:
    assert padding_waste([25, 32], [32, 32]) == pytest.approx(7 / 64)
    assert padding_waste([], []) == 0.0
    with pytest.raises(ValueError):
        padding_waste([40], [32])
    items = [GenerationItem("a", 0.5), GenerationItem("b", 0.64)]  # 25 and 32 frames, bucket 32
    assert [frames_for(i.duration_s, tiny_model) for i in items] == [25, 32]
    assert padding_waste_for(tiny_model, items) == pytest.approx(7 / 64)
    results = generate(tiny_model, items)
    assert [r.padding_waste for r in results] == pytest.approx([7 / 64, 7 / 64])
    assert generate(tiny_model, [GenerationItem("c", 0.64)])[0].padding_waste == 0.0
