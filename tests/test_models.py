import math

import pytest
import torch

from locotrain.data import load_corpus
from locotrain.models.backbone import forward, forward_one
from locotrain.workloads import build_workload

from conftest import tiny_config


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("", 0.9)


def _randomize(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in params.items()}


def test_ar_model_is_causal(corpus):
    wl = build_workload(tiny_config(), corpus)
    params = _randomize(wl.init_params(0))  # zero-init projections would hide leaks
    x = torch.randint(0, 65, (2, 16))
    logits, _ = forward_one(wl.spec, params, x, wl.rotary)
    for t in range(15):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 65, (2, 15 - t))
        logits2, _ = forward_one(wl.spec, params, y, wl.rotary)
        assert torch.allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-5)
        assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:], atol=1e-5)


def test_diffusion_model_is_bidirectional(corpus):
    wl = build_workload(tiny_config("workload.name=masked_diffusion"), corpus)
    params = _randomize(wl.init_params(0))
    x = torch.randint(0, 65, (1, 16))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 65
    a, _ = forward_one(wl.spec, params, x, wl.rotary)
    b, _ = forward_one(wl.spec, params, y, wl.rotary)
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-5)  # the future changes the past


def test_param_count_matches_nanogpt_size(corpus):
    cfg = tiny_config("model.depth=6", "model.width=384", "model.heads=6", "model.seq_len=256")
    wl = build_workload(cfg, corpus)
    # 6 blocks of 12 d^2 plus untied embedding and head of 65 x 384
    assert wl.num_params() == 6 * 12 * 384**2 + 2 * 65 * 384


@pytest.mark.parametrize("context_len", [0, 4])
def test_diffusion_bound_of_a_uniform_model_is_log_vocab(corpus, context_len):
    """A model with a zero head predicts uniformly over the 65 characters (the mask is not a
    class), so every masked character costs ln 65 and the bound is exactly log2 65 bpc."""
    cfg = tiny_config("workload.name=masked_diffusion", f"workload.context_len={context_len}")
    wl = build_workload(cfg, corpus)
    params = wl.init_params(0)
    assert torch.count_nonzero(params["head"]) == 0
    result = wl.evaluate(params, limit=8)
    assert result.is_bound
    assert result.val_loss == pytest.approx(math.log(65), rel=1e-6)
    assert result.val_bpc == pytest.approx(math.log2(65), rel=1e-6)
    assert result.stderr_bpc < 1e-6  # float32 rounding only
    g = torch.Generator().manual_seed(0)
    batch = corpus.train[:17 * 8].view(8, 17)
    assert wl.loss(wl.stack(params), batch[None], [g]).item() == pytest.approx(math.log(65), rel=1e-6)


def test_diffusion_loss_weights_each_sequence_by_its_mask_count(corpus):
    """With a model whose loss per masked character is known, the training loss is the mean
    over sequences of (sum of masked CE) / (masked count)."""
    wl = build_workload(tiny_config("workload.name=masked_diffusion"), corpus)
    params = _randomize(wl.init_params(0), seed=3)
    batch = corpus.train[: 17 * 8].view(8, 17)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss = wl.loss(wl.stack(params), batch[None], [g1])[0]
    # recompute by hand with the same random stream
    x = batch[:, 1:]
    u = torch.rand((), generator=g2).item()
    t = (torch.arange(8, dtype=torch.float64) + u) / 8
    ell = (t * 16).ceil().long().clamp(1, 16)
    ranks = torch.rand(8, 16, generator=g2).argsort(1).argsort(1)
    mask = ranks < ell[:, None]
    assert torch.equal(mask.sum(1), ell)
    logits, _ = forward_one(wl.spec, params, torch.where(mask, wl.mask_id, x), wl.rotary)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    expected = ((nll * mask).sum(1) / ell).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_stacked_forward_is_each_model_alone(corpus):
    """Three models in one stacked call give each model's own logits, as if run alone."""
    wl = build_workload(tiny_config("model.depth=2"), corpus)
    models = [_randomize(wl.init_params(0), seed=s) for s in range(3)]
    tokens = torch.randint(65, (3, 4, 16), generator=torch.Generator().manual_seed(1))
    stacked = {k: torch.stack([m[k] for m in models]) for k in models[0]}
    together, _ = forward(wl.spec, stacked, tokens, wl.rotary)
    for w, m in enumerate(models):
        alone, _ = forward_one(wl.spec, m, tokens[w], wl.rotary)
        torch.testing.assert_close(together[w], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("overrides", [
    ["sample.method=confidence"],
    ["sample.method=confidence", "sample.threshold=0.01"],
    ["sample.method=remask", "sample.steps=3"],
    ["workload.loopholing=true", "workload.context_len=4"],
])
def test_diffusion_sampler_fills_every_mask(corpus, overrides):
    cfg = tiny_config("workload.name=masked_diffusion", *overrides)
    wl = build_workload(cfg, corpus)
    params = _randomize(wl.init_params(0))
    result = wl.sample(params, "ROMEO:", 50, torch.Generator().manual_seed(0))
    assert result.text.startswith("ROMEO:")
    assert len(result.text) == len("ROMEO:") + 50
    assert all(c in corpus.tokenizer.chars for c in result.text)  # no mask symbol left
    assert result.steps >= 3
    if "sample.threshold=0.01" in overrides:
        # every position clears the bar, so one step per block: 16-char blocks carrying the
        # prompt (6) then the last 4 characters give 10 + 12 + 12 + 12 + 4 new characters
        assert result.steps == 5


def test_ar_sampler_continues_the_prompt(corpus):
    wl = build_workload(tiny_config(), corpus)
    params = _randomize(wl.init_params(0))
    r = wl.sample(params, "KING:", 30, torch.Generator().manual_seed(0))
    assert r.text.startswith("KING:") and len(r.text) == 35 and r.steps_per_char == 1.0
