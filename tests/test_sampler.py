"""Windowed sampling: placement, token picking, the cached sampler against the naive reference."""

import pytest
import torch

from core.sampler import (
    Condition,
    SamplingOptions,
    WindowCaches,
    default_stride,
    draw_noise,
    filter_logits,
    grid_for_pixels,
    pick_tokens,
    sample,
    sample_cached,
    window_placement,
)
from core.transformer import GPT, GPTConfig

GRID_H, GRID_W = 7, 11
WINDOW = (4, 5)


def tiny_model(seed: int = 0, aligned: bool = False) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        image_vocab=32, cond_vocab=24, n_layer=2, n_head=2, n_embd=32, window_rows=4, window_cols=5,
        aligned_condition=aligned,
    )  # fmt: skip
    model = GPT(config).eval()
    if aligned:  # trained values, not the zero start, so the path changes the logits
        with torch.no_grad():
            model.aligned_embed.weight.normal_(0, 0.5)
    return model


def condition(batch: int = 2, grid_h: int = GRID_H, grid_w: int = GRID_W, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 24, (batch, 1), generator=generator)
    tokens = torch.randint(0, 24, (batch, grid_h, grid_w), generator=generator)
    return Condition(prefix, tokens)


def run(sampler) -> tuple[list, torch.Tensor]:
    """All events of a sampler and its return value."""
    events = []
    while True:
        try:
            events.append(next(sampler))
        except StopIteration as stop:
            return events, stop.value


def sampled_with_logits(model, cond, method, **kwargs):
    logits = {}

    def remember(position, values):
        logits[position] = values.clone()

    options = kwargs.pop("options", SamplingOptions(seed=5))
    events, tokens = run(
        sample(model, cond, GRID_H, GRID_W, options, method=method, on_logits=remember, **kwargs)
    )
    return tokens.clone(), logits


# ---------------------------------------------------------------------------- placement


def test_stride_one_puts_the_target_at_the_window_centre_pinned_at_borders():
    window, stride = (16, 16), (1, 1)
    assert window_placement(20, 30, 64, 64, window, stride) == (12, 22)  # row 8, col 8 inside
    assert window_placement(3, 2, 64, 64, window, stride) == (0, 0)
    assert window_placement(63, 60, 64, 64, window, stride) == (48, 48)


def test_strided_windows_serve_a_block_of_targets():
    window, stride = (10, 16), (4, 8)
    # anchor rows 20..23 -> top 20 + 2 - 5 = 17; anchor columns 32..39 -> left 32 + 4 - 8 = 28
    for i in range(20, 24):
        for j in range(32, 40):
            assert window_placement(i, j, 64, 64, window, stride) == (17, 28)
    assert window_placement(24, 40, 64, 64, window, stride) == (21, 36)


def test_window_always_contains_its_target():
    for stride in [(1, 1), (2, 3), (4, 4), (4, 5), (3, 1)]:
        for i in range(GRID_H):
            for j in range(GRID_W):
                top, left = window_placement(i, j, GRID_H, GRID_W, WINDOW, stride)
                assert 0 <= top <= i < top + WINDOW[0] <= GRID_H
                assert 0 <= left <= j < left + WINDOW[1] <= GRID_W


def test_default_stride_is_half_the_window():
    assert default_stride((10, 16)) == (5, 8)
    assert default_stride((1, 1)) == (1, 1)


def test_window_larger_than_the_model_is_refused_naming_the_limit():
    with pytest.raises(ValueError, match="trained window 4x5"):
        sample(tiny_model(), condition(), GRID_H, GRID_W, SamplingOptions(), window=(5, 5))


def test_stride_larger_than_the_window_is_refused():
    with pytest.raises(ValueError, match="at most the window"):
        sample(tiny_model(), condition(), GRID_H, GRID_W, SamplingOptions(), stride=(5, 1))


# ---------------------------------------------------------------------------- picking


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0, 0.0]])
    kept = filter_logits(logits, SamplingOptions(top_k=3)).isfinite()
    assert kept.tolist() == [[False, True, False, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15]]).log()
    # sorted: 0.5, 0.2 (0.7), 0.15 (0.85), 0.1 (0.95), 0.05
    kept_075 = filter_logits(logits, SamplingOptions(top_p=0.75)).isfinite()
    kept_090 = filter_logits(logits, SamplingOptions(top_p=0.9)).isfinite()
    kept_045 = filter_logits(logits, SamplingOptions(top_p=0.45)).isfinite()
    assert kept_075.tolist() == [[False, True, False, True, True]]
    assert kept_090.tolist() == [[False, True, True, True, True]]
    assert kept_045.tolist() == [[False, True, False, False, False]]


def test_top_k_then_top_p_renormalises_over_the_k_kept():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top-2 leaves 0.4 / 0.7 = 0.571 and 0.3 / 0.7 = 0.429; p = 0.5 needs only the first
    kept = filter_logits(logits, SamplingOptions(top_k=2, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_temperature_divides_the_kept_logits():
    logits = torch.tensor([[2.0, 4.0]])
    assert filter_logits(logits, SamplingOptions(temperature=2.0)).tolist() == [[1.0, 2.0]]


def test_greedy_picks_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, -1.0, 0.0]])
    picked = pick_tokens(logits, torch.tensor([0.99, 0.99]), SamplingOptions(greedy=True))
    assert picked.tolist() == [1, 0]


def test_pick_inverts_the_cdf_of_the_uniform():
    logits = torch.tensor([[0.25, 0.25, 0.5]]).log().expand(4, 3)
    uniforms = torch.tensor([0.1, 0.3, 0.6, 0.999])
    assert pick_tokens(logits, uniforms, SamplingOptions()).tolist() == [0, 1, 2, 2]


def test_pick_never_returns_a_filtered_token():
    logits = torch.tensor([[5.0, 0.0, 4.0, 0.0]]).expand(3, 4)
    uniforms = torch.tensor([0.0, 0.5, 1.0 - 1e-12], dtype=torch.float64)
    picked = pick_tokens(logits, uniforms, SamplingOptions(top_k=2))
    assert set(picked.tolist()) <= {0, 2}


def test_noise_depends_on_the_seed_only():
    assert torch.equal(draw_noise(2, 3, 4, seed=7), draw_noise(2, 3, 4, seed=7))
    assert not torch.equal(draw_noise(2, 3, 4, seed=7), draw_noise(2, 3, 4, seed=8))


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("stride", [(1, 1), (2, 3), (4, 4)])
def test_cached_sampler_matches_naive_logits_and_tokens(stride):
    model, cond = tiny_model(), condition()
    naive_tokens, naive_logits = sampled_with_logits(
        model, cond, "naive", window=WINDOW, stride=stride
    )
    cached_tokens, cached_logits = sampled_with_logits(
        model, cond, "cached", window=WINDOW, stride=stride
    )
    assert len(cached_logits) == GRID_H * GRID_W
    for position, logits in naive_logits.items():
        torch.testing.assert_close(cached_logits[position], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached_tokens, naive_tokens)


@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_cached_sampler_matches_naive_with_the_aligned_condition(stride):
    model, cond = tiny_model(aligned=True), guided_condition()
    for options in (SamplingOptions(seed=5), SamplingOptions(seed=5, guidance=2.0)):
        naive_tokens, naive_logits = sampled_with_logits(
            model, cond, "naive", window=WINDOW, stride=stride, options=options
        )
        cached_tokens, cached_logits = sampled_with_logits(
            model, cond, "cached", window=WINDOW, stride=stride, options=options
        )
        for position, logits in naive_logits.items():
            torch.testing.assert_close(cached_logits[position], logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(cached_tokens, naive_tokens)


def test_cached_sampler_matches_naive_without_condition_grid():
    model = tiny_model()
    cond = Condition(condition().prefix)
    naive_tokens, _ = sampled_with_logits(model, cond, "naive", stride=(2, 3))
    cached_tokens, _ = sampled_with_logits(model, cond, "cached", stride=(2, 3))
    assert torch.equal(cached_tokens, naive_tokens)


def test_cached_sampler_matches_naive_with_a_smaller_window():
    model, cond = tiny_model(), condition()
    naive_tokens, _ = sampled_with_logits(model, cond, "naive", window=(3, 4), stride=(2, 2))
    cached_tokens, _ = sampled_with_logits(model, cond, "cached", window=(3, 4), stride=(2, 2))
    assert torch.equal(cached_tokens, naive_tokens)


@pytest.mark.parametrize("method", ["naive", "cached"])
def test_one_window_grid_equals_plain_full_context_sampling(method):
    model = tiny_model()
    cond = condition(grid_h=4, grid_w=5)
    options = SamplingOptions(seed=3, top_k=20)
    _, windowed = run(sample(model, cond, 4, 5, options, stride=(2, 3), method=method))

    # The plain reference: the whole grid is one sequence; sample it token by token, each from
    # one forward of everything (unknown tokens are zeros: causality hides them).
    noise = draw_noise(2, 4, 5, seed=3)
    image = torch.zeros(2, 20, dtype=torch.long)
    flat_cond = cond.tokens.reshape(2, 20)
    for k in range(20):
        with torch.no_grad():
            logits = model(cond.prefix, flat_cond, image, 4, 5)[:, k]
        image[:, k] = pick_tokens(logits, noise[:, k // 5, k % 5], options)
    assert torch.equal(windowed, image.view(2, 4, 5))


def guided_condition(batch: int = 2) -> Condition:
    cond = condition(batch)
    unguided = torch.full_like(cond.tokens, 23)  # one "empty" id everywhere
    return Condition(cond.prefix, cond.tokens, unguided)


@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_guided_cached_sampler_matches_guided_naive(stride):
    model, cond = tiny_model(), guided_condition()
    options = SamplingOptions(seed=5, guidance=3.0)
    naive_tokens, naive_logits = sampled_with_logits(
        model, cond, "naive", window=WINDOW, stride=stride, options=options
    )
    cached_tokens, cached_logits = sampled_with_logits(
        model, cond, "cached", window=WINDOW, stride=stride, options=options
    )
    for position, logits in naive_logits.items():
        torch.testing.assert_close(cached_logits[position], logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached_tokens, naive_tokens)


def test_guidance_extrapolates_from_the_unguided_logits():
    # On a one-window grid the first token's logits are one forward of the prefix and the
    # condition: guided = unguided + 2.5 * (conditioned - unguided).
    model, cond = tiny_model(), guided_condition()
    small = Condition(cond.prefix, cond.tokens[:, :4, :5], cond.unguided[:, :4, :5])
    with torch.no_grad():
        conditioned = model.next_token_logits(small.prefix, small.tokens.reshape(2, 20), None, 4, 5)
        unguided = model.next_token_logits(small.prefix, small.unguided.reshape(2, 20), None, 4, 5)
    seen = {}
    options = SamplingOptions(seed=0, guidance=2.5)
    run(sample(model, small, 4, 5, options, on_logits=lambda p, v: seen.setdefault(p, v.clone())))
    expected = unguided + 2.5 * (conditioned - unguided)
    torch.testing.assert_close(seen[(0, 0)], expected, atol=1e-5, rtol=1e-5)


def test_class_guidance_extrapolates_from_the_unguided_prefix():
    # No condition grid (free generation of a scene class): the unguided rows differ only in
    # their prefix, and the first token's logits are one forward of each prefix.
    model = tiny_model()
    prefix, unguided_prefix = torch.tensor([[3], [9]]), torch.tensor([[17], [17]])
    with torch.no_grad():
        conditioned = model.next_token_logits(prefix, None, None, 4, 5)
        unguided = model.next_token_logits(unguided_prefix, None, None, 4, 5)
    seen = {}
    options = SamplingOptions(seed=0, guidance=2.5)
    cond = Condition(prefix, unguided_prefix=unguided_prefix)
    run(sample(model, cond, 4, 5, options, on_logits=lambda p, v: seen.setdefault(p, v.clone())))
    expected = unguided + 2.5 * (conditioned - unguided)
    torch.testing.assert_close(seen[(0, 0)], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_class_guided_cached_sampler_matches_class_guided_naive(stride):
    cond = Condition(torch.tensor([[3], [9]]), unguided_prefix=torch.tensor([[17], [17]]))
    options = SamplingOptions(seed=5, guidance=3.0)
    naive, _ = sampled_with_logits(
        tiny_model(), cond, "naive", window=WINDOW, stride=stride, options=options
    )
    cached, _ = sampled_with_logits(
        tiny_model(), cond, "cached", window=WINDOW, stride=stride, options=options
    )
    assert torch.equal(cached, naive)


def test_an_unguided_prefix_of_another_shape_is_refused():
    cond = Condition(torch.tensor([[3], [9]]), unguided_prefix=torch.tensor([[17]]))
    with pytest.raises(ValueError, match="must match"):
        next(sample(tiny_model(), cond, GRID_H, GRID_W, SamplingOptions(guidance=2.0)))


def prior_options(**kwargs) -> SamplingOptions:
    """A bias table of two rows: row 0 pushes token 7 up by 50, row 1 adds nothing; the left
    four columns use row 0, the top-right cell none (-1), the rest row 1."""
    table = torch.zeros(2, 32)
    table[0, 7] = 50.0
    index = torch.ones(GRID_H, GRID_W, dtype=torch.long)
    index[:, :4] = 0
    index[0, -1] = -1
    return SamplingOptions(seed=5, bias_table=table, bias_index=index, **kwargs)


@pytest.mark.parametrize("method", ["cached", "naive"])
def test_a_bias_row_is_added_where_its_index_points(method):
    model, cond = tiny_model(), condition()
    plain, plain_logits = sampled_with_logits(model, cond, method, window=WINDOW)
    biased, biased_logits = sampled_with_logits(
        model, cond, method, window=WINDOW, options=prior_options()
    )
    # the first token sees no earlier token, so only the bias differs there
    expected = plain_logits[(0, 0)].clone()
    expected[:, 7] += 50.0
    torch.testing.assert_close(biased_logits[(0, 0)], expected)
    assert (biased[:, :, :4] == 7).all()  # +50 beats any logit of this model
    assert not (plain[:, :, :4] == 7).all()


def test_a_bias_table_without_its_index_is_refused():
    with pytest.raises(ValueError, match="give both or neither"):
        SamplingOptions(bias_table=torch.zeros(2, 32))


def test_biased_cached_sampler_matches_biased_naive():
    model, cond = tiny_model(), condition()
    options = prior_options(top_k=8)
    cached, _ = sampled_with_logits(model, cond, "cached", window=WINDOW, options=options)
    naive, _ = sampled_with_logits(model, cond, "naive", window=WINDOW, options=options)
    assert torch.equal(cached, naive)


def test_guidance_one_ignores_the_unguided_grid():
    model = tiny_model()
    plain, _ = sampled_with_logits(model, condition(), "cached", window=WINDOW)
    guided, _ = sampled_with_logits(model, guided_condition(), "cached", window=WINDOW)
    assert torch.equal(plain, guided)


def test_guidance_without_an_unguided_grid_is_refused():
    options = SamplingOptions(guidance=2.0)
    with pytest.raises(ValueError, match="unguided counterpart"):
        next(sample(tiny_model(), condition(), GRID_H, GRID_W, options))


def test_cached_sampler_serves_several_windows_per_model_pass():
    work = {}
    sampler = sample_cached(
        tiny_model(), condition(), GRID_H, GRID_W, SamplingOptions(), stride=(2, 3), work=work
    )
    events, _ = run(sampler)
    assert len(events) == 77
    assert work["passes"] < 50  # rows advance together: 77 tokens take fewer passes


def test_window_caches_cut_back_to_the_first_changed_token():
    model, cond = tiny_model(), condition()
    caches = WindowCaches(model, cond, WINDOW)
    crop = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(4))
    caches.logits(0, 0, crop[:, :10])
    changed = crop.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 32

    logits = caches.logits(0, 0, changed[:, :12])
    cond_crop = cond.tokens[:, :4, :5].reshape(2, 20)
    expected = model.next_token_logits(cond.prefix, cond_crop, changed[:, :12], 4, 5)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert caches.counts["cut_back"] == 1
    assert caches.counts["extend_tokens"] == 6  # tokens 6..11 fed again, not all twelve


# ---------------------------------------------------------------------------- seeds, regions


def test_same_seed_gives_the_same_tokens():
    model, cond = tiny_model(), condition()
    first, _ = sampled_with_logits(model, cond, "cached", options=SamplingOptions(seed=11))
    second, _ = sampled_with_logits(model, cond, "cached", options=SamplingOptions(seed=11))
    assert torch.equal(first, second)


def test_different_seed_gives_different_tokens():
    model, cond = tiny_model(), condition()
    first, _ = sampled_with_logits(model, cond, "cached", options=SamplingOptions(seed=11))
    second, _ = sampled_with_logits(model, cond, "cached", options=SamplingOptions(seed=12))
    assert not torch.equal(first, second)


def test_seed_gives_the_same_tokens_whatever_the_sampler():
    model, cond = tiny_model(), condition()
    naive, _ = sampled_with_logits(model, cond, "naive", stride=(2, 2))
    cached, _ = sampled_with_logits(model, cond, "cached", stride=(2, 2))
    assert torch.equal(naive, cached)


def region_mask() -> torch.Tensor:
    mask = torch.zeros(1, GRID_H, GRID_W, dtype=torch.bool)
    mask[:, 2:5, 3:8] = True
    return mask


@pytest.mark.parametrize("method", ["naive", "cached"])
def test_region_resampling_never_changes_a_token_outside_the_mask(method):
    model, cond = tiny_model(), condition()
    known = torch.randint(0, 32, (2, GRID_H, GRID_W), generator=torch.Generator().manual_seed(9))
    mask = region_mask()
    tokens, _ = sampled_with_logits(model, cond, method, known=known, mask=mask)
    assert torch.equal(tokens[:, ~mask[0]], known[:, ~mask[0]])
    assert bool((tokens[:, mask[0]] >= 0).all())


def test_region_resampling_cached_matches_naive():
    model, cond = tiny_model(), condition()
    known = torch.randint(0, 32, (2, GRID_H, GRID_W), generator=torch.Generator().manual_seed(9))
    mask = region_mask()
    naive, _ = sampled_with_logits(model, cond, "naive", known=known, mask=mask, stride=(2, 3))
    cached, _ = sampled_with_logits(model, cond, "cached", known=known, mask=mask, stride=(2, 3))
    assert torch.equal(naive, cached)


def test_canvas_extension_samples_only_the_unknown_area():
    model, cond = tiny_model(), condition()
    known = torch.full((2, GRID_H, GRID_W), -1)
    known[:, :, :6] = torch.randint(
        0, 32, (2, GRID_H, 6), generator=torch.Generator().manual_seed(2)
    )
    options = SamplingOptions(seed=5)
    events, tokens = run(sample(model, cond, GRID_H, GRID_W, options, known=known))
    assert events[-1].tokens_total == GRID_H * 5
    assert torch.equal(tokens[:, :, :6], known[:, :, :6])
    assert bool((tokens >= 0).all())


def test_empty_mask_is_refused():
    known = torch.zeros(1, GRID_H, GRID_W, dtype=torch.long)
    mask = torch.zeros(1, GRID_H, GRID_W, dtype=torch.bool)
    with pytest.raises(ValueError, match="no position"):
        sample(tiny_model(), condition(), GRID_H, GRID_W, SamplingOptions(), known=known, mask=mask)


def test_known_tokens_beyond_the_codebook_are_refused():
    known = torch.full((1, GRID_H, GRID_W), 40)
    mask = region_mask()
    with pytest.raises(ValueError, match="image_vocab allows 0..31"):
        sample(tiny_model(), condition(), GRID_H, GRID_W, SamplingOptions(), known=known, mask=mask)


def test_events_count_every_token_and_end_with_the_finished_grid():
    model, cond = tiny_model(), condition()
    events, tokens = run(sample(model, cond, GRID_H, GRID_W, SamplingOptions()))
    assert [event.tokens_done for event in events] == list(range(1, GRID_H * GRID_W + 1))
    assert events[-1].rows_done == GRID_H and events[-1].eta == 0.0
    assert events[-1].tokens is tokens and bool((tokens >= 0).all())
    assert all(a.rows_done <= b.rows_done for a, b in zip(events, events[1:], strict=False))


# ---------------------------------------------------------------------------- sizes


def test_pixel_size_rounds_up_to_whole_tokens():
    grid = grid_for_pixels(1000, 700, factor=16)
    assert (grid.grid_w, grid.grid_h) == (63, 44)
    assert (grid.padded_width, grid.padded_height) == (1008, 704)
    assert (grid.width, grid.height) == (1000, 700)


def test_exact_multiple_is_not_padded():
    grid = grid_for_pixels(1024, 1024, factor=16)
    assert (grid.grid_w, grid.grid_h, grid.padded_width) == (64, 64, 1024)


def test_size_below_one_token_is_refused_naming_the_minimum():
    with pytest.raises(ValueError, match="minimum is 16x16 pixels"):
        grid_for_pixels(10, 300, factor=16)


def test_sampling_options_refuse_zero_temperature():
    with pytest.raises(ValueError, match="greedy=True"):
        SamplingOptions(temperature=0.0)


def test_sampling_options_take_guidance_from_0_to_8():
    assert SamplingOptions(guidance=8.0).guidance == 8.0
    assert SamplingOptions(guidance=0.0).guidance == 0.0
    for outside in (-0.5, 8.5):
        with pytest.raises(ValueError, match="between 0 and 8"):
            SamplingOptions(guidance=outside)
