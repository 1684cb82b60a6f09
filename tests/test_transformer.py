"""The stage-2 transformer: causality, window sizes, KV cache steps and the optimizer groups."""

import math

import pytest
import torch

from core.transformer import GPT, GPTConfig

ROWS, COLS = 4, 5  # the tiny model's trained window


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        image_vocab=32,
        cond_vocab=24,
        n_layer=2,
        n_head=2,
        n_embd=32,
        window_rows=ROWS,
        window_cols=COLS,
    )
    return GPT(config).eval()


def window_tokens(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 24, (batch, 1), generator=generator)
    cond = torch.randint(0, 24, (batch, ROWS * COLS), generator=generator)
    image = torch.randint(0, 32, (batch, ROWS * COLS), generator=generator)
    return prefix, cond, image


def test_forward_returns_one_logit_row_per_image_token():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    assert model(prefix, cond, image, ROWS, COLS).shape == (2, 20, 32)


def test_logits_do_not_see_the_token_they_predict_or_later_ones():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    changed = image.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 32
    before = model(prefix, cond, image, ROWS, COLS)
    after = model(prefix, cond, changed, ROWS, COLS)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_condition_tokens_change_the_prediction():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    other = (cond + 1) % 24
    assert not torch.allclose(
        model(prefix, cond, image, ROWS, COLS), model(prefix, other, image, ROWS, COLS)
    )


def test_model_without_condition_tokens_runs_on_prefix_and_image():
    model = tiny_model()
    prefix, _, image = window_tokens()
    assert model(prefix, None, image, ROWS, COLS).shape == (2, 20, 32)


def test_untrained_model_loss_is_about_log_vocabulary():
    model = tiny_model()
    prefix, cond, image = window_tokens(batch=4)
    assert abs(model.loss(prefix, cond, image, ROWS, COLS).item() - math.log(32)) < 0.05


def test_smaller_window_than_trained_is_accepted():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    logits = model(prefix, cond[:, :6], image[:, :6], 2, 3)
    assert logits.shape == (2, 6, 32)


def test_window_larger_than_trained_is_refused_naming_the_limit():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    with pytest.raises(ValueError, match="at most 4x5"):
        model(prefix, None, image, 5, 4)


def test_prefill_gives_the_full_forward_logits():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    full = model(prefix, cond, image, ROWS, COLS)
    cache = model.new_cache(2, ROWS, COLS, with_cond=True)
    logits = model.prefill(cache, prefix, cond, image[:, :6], ROWS, COLS)
    torch.testing.assert_close(logits, full[:, 6])
    assert cache.length == 1 + 20 + 6


def test_extend_of_k_tokens_equals_k_decode_one_steps():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    stepped = model.new_cache(2, ROWS, COLS, with_cond=True)
    extended = model.new_cache(2, ROWS, COLS, with_cond=True)
    model.prefill(stepped, prefix, cond, image[:, :3], ROWS, COLS)
    model.prefill(extended, prefix, cond, image[:, :3], ROWS, COLS)

    steps = torch.stack([model.decode_one(stepped, image[:, k], k) for k in range(3, 9)], dim=1)
    at_once = model.extend(extended, image[:, 3:9], 3, all_logits=True)
    torch.testing.assert_close(at_once, steps, atol=1e-5, rtol=1e-5)
    assert extended.length == stepped.length == 1 + 20 + 9


def test_truncate_then_extend_matches_full_forward_with_changed_tokens():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    cache = model.new_cache(2, ROWS, COLS, with_cond=True)
    model.prefill(cache, prefix, cond, image[:, :12], ROWS, COLS)
    changed = image.clone()
    changed[:, 5] = (changed[:, 5] + 3) % 32

    model.truncate(cache, 5)
    logits = model.extend(cache, changed[:, 5:12], 5)
    full = model(prefix, cond, changed, ROWS, COLS)
    torch.testing.assert_close(logits, full[:, 12], atol=1e-5, rtol=1e-5)


def test_feeds_of_two_windows_in_one_pass_match_separate_runs():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    _, other_cond, other_image = window_tokens(seed=2)
    first = model.new_cache(2, ROWS, COLS, with_cond=True)
    second = model.new_cache(2, ROWS, COLS, with_cond=True)
    model.prefill(first, prefix, cond, image[:, :4], ROWS, COLS)

    together = model.run_feeds(
        [
            model.feed_image(first, image[:, 4:5], 4),
            model.feed_prompt(second, prefix, other_cond, other_image[:, :9], ROWS, COLS),
        ]
    )
    torch.testing.assert_close(together[0], model(prefix, cond, image, ROWS, COLS)[:, 5])
    alone = model(prefix, other_cond, other_image, ROWS, COLS)[:, 9]
    torch.testing.assert_close(together[1], alone, atol=1e-5, rtol=1e-5)


def test_feeding_out_of_order_is_refused():
    model = tiny_model()
    prefix, cond, image = window_tokens()
    cache = model.new_cache(2, ROWS, COLS, with_cond=True)
    model.prefill(cache, prefix, cond, image[:, :4], ROWS, COLS)
    with pytest.raises(ValueError, match="holds 4 image tokens"):
        model.decode_one(cache, image[:, 6], 6)


def test_optimizer_decays_linear_weights_only():
    model = tiny_model()
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    decayed_ids = {id(p) for p in decayed["params"]}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert id(model.blocks[0].attn.qkv.weight) in decayed_ids
    assert id(model.head.weight) in decayed_ids
    assert id(model.image_embed.weight) not in decayed_ids
    assert id(model.blocks[0].ln1.weight) not in decayed_ids
    assert len(decayed["params"]) == 2 * 4 + 1  # four linear layers per block, plus the head


def test_warm_start_keeps_blocks_and_the_rows_of_unchanged_stages(tmp_path):
    from core.checkpoint import save_checkpoint
    from core.models import Vocabulary
    from core.train_transformer import warm_start

    # The old model knew a 6-code layout stage and a 4-code edges stage; the new one has a
    # 3-class layout stage (other tokens) and the same edges stage.
    old_vocabulary = Vocabulary.build({"image": 32, "layout": 6, "edges": 4}, ["layout", "edges"])
    new_vocabulary = Vocabulary.build({"image": 32, "layout": 3, "edges": 4}, ["layout", "edges"])
    torch.manual_seed(0)
    old = GPT(GPTConfig(32, old_vocabulary.size, 2, 2, 32, ROWS, COLS))
    extra = {
        "vocabulary": old_vocabulary.as_dict(),
        "stages": {"image": "i" * 64, "layout": "a" * 64, "edges": "e" * 64},
    }
    save_checkpoint(tmp_path / "old", "transformer", old.config, old.state_dict(), "", extra)
    torch.manual_seed(1)
    new = GPT(GPTConfig(32, new_vocabulary.size, 2, 2, 32, ROWS, COLS))
    fresh_layout = new.cond_embed.weight[0:3].clone()

    hashes = {"image": "i" * 64, "layout": "b" * 64, "edges": "e" * 64}
    fresh = warm_start(new, str(tmp_path / "old"), new_vocabulary, hashes)

    assert fresh == ["layout"]
    assert torch.equal(new.blocks[1].mlp.fc.weight, old.blocks[1].mlp.fc.weight)
    assert torch.equal(new.image_embed.weight, old.image_embed.weight)
    # edges: rows 3..6 now, rows 6..9 before; the two prefix tokens: 7, 8 now, 10, 11 before
    assert torch.equal(new.cond_embed.weight[3:7], old.cond_embed.weight[6:10])
    assert torch.equal(new.cond_embed.weight[7:9], old.cond_embed.weight[10:12])
    assert torch.equal(new.cond_embed.weight[0:3], fresh_layout)


def saved_edges_model(tmp_path) -> tuple:
    """A plain model knowing image and edges tokens, saved as the transformer `tmp_path/old`."""
    from core.checkpoint import save_checkpoint
    from core.models import Vocabulary

    vocabulary = Vocabulary.build({"image": 32, "edges": 4}, ["edges"])
    torch.manual_seed(0)
    old = GPT(GPTConfig(32, vocabulary.size, 2, 2, 32, ROWS, COLS)).eval()
    extra = {"vocabulary": vocabulary.as_dict(), "stages": {"image": "i" * 64, "edges": "e" * 64}}
    save_checkpoint(tmp_path / "old", "transformer", old.config, old.state_dict(), "", extra)
    return old, vocabulary


def test_warm_start_after_another_image_vqgan_keeps_the_image_tables_fresh(tmp_path):
    from core.train_transformer import warm_start

    old, vocabulary = saved_edges_model(tmp_path)
    torch.manual_seed(1)
    new = GPT(GPTConfig(32, vocabulary.size, 2, 2, 32, ROWS, COLS))
    image_embed, head = new.image_embed.weight.clone(), new.head.weight.clone()

    fresh = warm_start(
        new, str(tmp_path / "old"), vocabulary, {"image": "j" * 64, "edges": "e" * 64}
    )

    assert "image_embed and head (another image VQGAN)" in fresh
    assert torch.equal(new.image_embed.weight, image_embed)
    assert torch.equal(new.head.weight, head)
    assert torch.equal(new.blocks[0].attn.qkv.weight, old.blocks[0].attn.qkv.weight)


def test_warm_start_from_a_bundle_with_a_fine_tuned_decoder_keeps_the_image_tables(tmp_path):
    from core.checkpoint import save_checkpoint, write_manifest
    from core.models import Vocabulary
    from core.train_transformer import warm_start

    # The bundle's transformer records its bundled image VQGAN's weights hash; that VQGAN is a
    # decoder fine-tune whose tokens are those of the encoder "i" * 64 the new run uses. The
    # superres task's condition rows are image tokens too.
    vocabulary = Vocabulary.build({"image": 32, "edges": 4}, ["edges", "superres4"])
    torch.manual_seed(0)
    old = GPT(GPTConfig(32, vocabulary.size, 2, 2, 32, ROWS, COLS))
    image_sha = save_checkpoint(
        tmp_path / "image", "vqgan", {}, {"w": torch.ones(2)}, "", {"tokens_from": "i" * 64}
    )
    extra = {"vocabulary": vocabulary.as_dict(), "stages": {"image": image_sha, "edges": "e" * 64}}
    state = old.state_dict()
    save_checkpoint(tmp_path / "transformer", "transformer", old.config, state, "", extra)
    write_manifest(tmp_path, {"transformer": "transformer", "image": "image"})
    torch.manual_seed(1)
    new = GPT(GPTConfig(32, vocabulary.size, 2, 2, 32, ROWS, COLS))

    fresh = warm_start(
        new, str(tmp_path / "transformer"), vocabulary, {"image": "i" * 64, "edges": "e" * 64}
    )

    assert fresh == []
    assert torch.equal(new.image_embed.weight, old.image_embed.weight)
    assert torch.equal(new.head.weight, old.head.weight)
    assert torch.equal(new.cond_embed.weight, old.cond_embed.weight)


def test_warm_start_into_an_aligned_model_computes_what_the_old_one_did(tmp_path):
    from core.train_transformer import warm_start

    old, vocabulary = saved_edges_model(tmp_path)
    torch.manual_seed(1)
    config = GPTConfig(32, vocabulary.size, 2, 2, 32, ROWS, COLS, aligned_condition=True)
    new = GPT(config).eval()

    fresh = warm_start(
        new, str(tmp_path / "old"), vocabulary, {"image": "i" * 64, "edges": "e" * 64}
    )

    assert fresh == ["aligned_embed"]
    assert new.aligned_embed.weight.abs().max().item() == 0
    prefix = torch.full((1, 1), vocabulary.prefix_id("task:edges"))
    cond = torch.randint(0, 4, (1, ROWS * COLS))  # edges tokens sit at offset 0 here
    image = torch.randint(0, 32, (1, 7))
    torch.testing.assert_close(
        new(prefix, cond, image, ROWS, COLS), old(prefix, cond, image, ROWS, COLS)
    )


def test_warm_start_from_another_shape_names_the_tensor(tmp_path):
    from core.checkpoint import CheckpointError, save_checkpoint
    from core.models import Vocabulary
    from core.train_transformer import warm_start

    vocabulary = Vocabulary.build({"image": 32, "edges": 4}, ["edges"])
    wide = GPT(GPTConfig(32, vocabulary.size, 2, 2, 64, ROWS, COLS))
    extra = {"vocabulary": vocabulary.as_dict(), "stages": {}}
    save_checkpoint(tmp_path / "wide", "transformer", wide.config, wide.state_dict(), "", extra)
    narrow = GPT(GPTConfig(32, vocabulary.size, 2, 2, 32, ROWS, COLS))
    with pytest.raises(CheckpointError, match="init needs the same layers, width and window"):
        warm_start(narrow, str(tmp_path / "wide"), vocabulary, {})


def aligned_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(32, 24, 2, 2, 32, ROWS, COLS, aligned_condition=True)
    return GPT(config).eval()


def test_aligned_condition_adds_each_targets_own_condition_to_the_input_before_it():
    model = aligned_model()
    with torch.no_grad():
        model.aligned_embed.weight.copy_(torch.arange(24.0)[:, None].expand(24, 32))  # row i = i
    prefix = torch.zeros(1, 1, dtype=torch.long)
    cond = torch.arange(1, 21)[None]  # condition k is the id k + 1
    image = torch.zeros(1, 5, dtype=torch.long)
    with_path = model._embed(prefix, cond, image, ROWS, COLS)
    model.aligned_embed.weight.data.zero_()
    without = model._embed(prefix, cond, image, ROWS, COLS)
    added = (with_path - without)[0, :, 0].round(decimals=4)  # the same in every channel
    # the last condition position (sequence 20) predicts image 0, whose condition id is 1;
    # image input k (sequence 21 + k) predicts image k + 1, whose condition id is k + 2
    assert added[:21].tolist() == [0.0] * 20 + [1.0]  # the prefix and conditions 0..18: none
    assert added[21:].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_aligned_condition_starts_at_zero_so_the_model_computes_as_without_it():
    plain = tiny_model()
    aligned = aligned_model()
    assert aligned.aligned_embed.weight.abs().max().item() == 0  # as constructed
    # every other tensor taken from the plain model; the aligned table keeps its initial zeros
    missing, unexpected = aligned.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["aligned_embed.weight"] and unexpected == []
    prefix, cond, image = window_tokens()
    torch.testing.assert_close(
        aligned(prefix, cond, image, ROWS, COLS), plain(prefix, cond, image, ROWS, COLS)
    )


def test_extend_with_an_aligned_condition_matches_the_full_forward():
    model = aligned_model()
    with torch.no_grad():
        model.aligned_embed.weight.normal_(0, 0.5)
    prefix, cond, image = window_tokens()
    with torch.no_grad():
        full = model(prefix, cond, image, ROWS, COLS)  # B, 20, V
    cache = model.new_cache(2, ROWS, COLS, with_cond=True)
    first = model.prefill(cache, prefix, cond, image[:, :7], ROWS, COLS)  # predicts image 7
    torch.testing.assert_close(first, full[:, 7], atol=1e-5, rtol=1e-5)
    rest = model.extend(cache, image[:, 7:12], 7, all_logits=True)  # predict images 8..12
    torch.testing.assert_close(rest, full[:, 8:13], atol=1e-5, rtol=1e-5)
