"""An exact oracle for the masked-diffusion validation bound (MaskedDiffusion.evaluate).

The bound (MDLM, Sahoo et al. 2024, linear schedule alpha_t = 1 - t) on the NLL of the N scored
characters of a window x, given its never-masked prefix of P characters, is

    NELBO(x) = int_0^1 (1/t) E_{S ~ Bernoulli(t) on the scored positions} [sum_{i in S} nll_i(S)] dt

where nll_i(S) = -log p(x_i | x with the positions of S replaced by [MASK]). Conditioning on
|S| = l (C(N, l) equally likely subsets, binomial probability C(N, l) t^l (1-t)^(N-l)) and
using int_0^1 t^(l-1) (1-t)^(N-l) dt = (l-1)! (N-l)! / N! = 1 / (l C(N, l)), every subset S
gets the weight

    w(S) = B(|S|, N - |S| + 1) = 1 / (|S| C(N, |S|))

so NELBO(x) = sum_l (1/l) E_{|S|=l}[sum_{i in S} nll_i(S)]
            = N E_{l ~ U{1..N}} E_{|S|=l}[mean_{i in S} nll_i(S)],
and the bound in nats per character is NELBO(x) / N, averaged over windows (all of them score
the same N characters): the mean NLL over the masked characters, l uniform on 1..N.

The oracle below enumerates all 2^N - 1 subsets of every window, one forward pass each, with
the backbone called directly (not through the workload's masking code), and weights them with
w(S) / N from the integral form.
"""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from locotrain.data import CharTokenizer, Corpus
from locotrain.models.backbone import forward_one as forward
from locotrain.workloads import LN2, build_workload

from conftest import tiny_config

SEQ_LEN = 5  # diffusion sees w[1:] of windows of seq_len + 1 characters: T = 5
WINDOWS = 64
SAMPLES = 600  # a multiple of N (3, 4, 5) with an even count per mask size: exact strata
CHARS = "abcdef"
ABS_TOL = 0.025  # nats per character; the bound here is about 3 nats


def _corpus(windows=WINDOWS, seed=0) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    V = len(CHARS)
    val = torch.randint(V, (windows * (SEQ_LEN + 1),), generator=g)
    train = torch.randint(V, (200,), generator=g)
    return Corpus("oracle", CharTokenizer(CHARS), train, val)


def _workload(*overrides, samples=SAMPLES):
    cfg = tiny_config("workload.name=masked_diffusion", f"model.seq_len={SEQ_LEN}",
                      f"eval.samples={samples}", *overrides)
    return build_workload(cfg, _corpus(), "cpu")


def _perturbed(params, scale=0.5, seed=7, only=None):
    """Init plus seeded noise, so predictions are far from uniform and depend on context
    (the zero-initialised head and residual projections would otherwise hide both)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + (scale * torch.randn(v.shape, generator=g) if only is None or k in only else 0)
            for k, v in params.items()}


def _subsets(P, T):
    return [S for l in range(1, T - P + 1) for S in itertools.combinations(range(P, T), l)]


def _weight(N, l) -> Fraction:
    """(1/N) int_0^1 (1/t) t^l (1-t)^(N-l) dt: the continuous-time MDLM weight of one subset
    of size l, per scored character."""
    return Fraction(math.factorial(l - 1) * math.factorial(N - l), math.factorial(N)) / N


def _oracle(wl, params, P):
    """Exact bound by enumeration. Returns (bound in nats/char, per-window (W,) bound,
    per-window per-size mean-over-masked-NLL (W, N+1) indexed by l, its variance over
    the subsets of each size (W, N+1))."""
    windows = wl.val_windows()[:, 1:]
    W, T = windows.shape
    N = T - P
    subsets = _subsets(P, T)
    masks = torch.zeros(len(subsets), T, dtype=torch.bool)
    for j, S in enumerate(subsets):
        masks[j, list(S)] = True
    x = windows.repeat_interleave(len(subsets), dim=0)  # (W * |subsets|, T)
    m = masks.repeat(W, 1)
    with torch.no_grad():
        logits, _ = forward(wl.spec, params, torch.where(m, wl.mask_id, x), wl.rotary)
    nll = -logits.double().log_softmax(-1).gather(-1, x[..., None])[..., 0]  # (., T)
    sums = (nll * m).sum(1).view(W, len(subsets))  # sum over S of nll_i(S)
    sizes = torch.tensor([len(S) for S in subsets])
    weights = torch.tensor([float(_weight(N, len(S))) for S in subsets], dtype=torch.float64)
    per_window = (sums * weights).sum(1)
    means = sums / sizes  # mean NLL over the masked positions, per subset
    by_size = torch.zeros(W, N + 1, dtype=torch.float64)
    var_by_size = torch.zeros(W, N + 1, dtype=torch.float64)
    for l in range(1, N + 1):
        sel = means[:, sizes == l]
        by_size[:, l] = sel.mean(1)
        var_by_size[:, l] = sel.var(1, unbiased=False)
    return per_window.mean().item(), per_window, by_size, var_by_size


def test_subset_weights_are_the_exact_count_form():
    """The integral weight is (1/N)(1/l)/C(N, l): l uniform on 1..N, mean over the masked
    characters. The weights spread exactly one unit over every scored character."""
    for N in range(1, 8):
        for l in range(1, N + 1):
            assert _weight(N, l) == Fraction(1, N) * Fraction(1, l) / math.comb(N, l)
        assert sum(math.comb(N, l) * l * _weight(N, l) for l in range(1, N + 1)) == 1


@pytest.mark.parametrize("overrides,P", [
    ((), 0),
    (("workload.context_len=2",), 2),  # never-masked prefix, scored from it (score_from = -1)
    (("eval.score_from=1",), 1),  # unmasked prefix at evaluation only
])
def test_evaluate_matches_exact_bound(overrides, P):
    wl = _workload(*overrides)
    assert wl.score_from == P
    params = _perturbed(wl.init_params(0))
    exact, per_window, by_size, var_by_size = _oracle(wl, params, P)
    W, N = len(per_window), SEQ_LEN - P
    # the count form of the same number, from the per-size means
    assert exact == pytest.approx(by_size[:, 1:].mean().item(), rel=1e-12)
    # the exact Monte-Carlo error of evaluate()'s estimator: with K = m N draws stratified
    # exactly over l (m of each size), Var = sum_w m sum_l Var_l(w) / (K W)^2
    true_se = math.sqrt(SAMPLES // N * var_by_size[:, 1:].sum().item()) / (SAMPLES * W)
    # power: a fixed mask count (e.g. N // 2, the "50% mask" mistake) gives a number this test
    # tells apart from the bound, whatever the Monte-Carlo draws
    wrong = by_size[:, N // 2 or 1].mean().item()
    assert abs(wrong - exact) > max(2 * ABS_TOL, 10 * true_se), (wrong, exact, true_se)

    result = wl.evaluate(params)
    assert result.is_bound and result.windows == W
    se = result.stderr_bpc * LN2  # nats
    err = result.val_loss - exact
    assert abs(err) <= 4 * se and abs(err) <= ABS_TOL, (
        f"evaluate() = {result.val_loss:.5f} nats/char but the exact bound is {exact:.5f} "
        f"(diff {err:+.5f}, {err / se:+.1f} stderr of {se:.5f}); by mask count l=1..{N}: "
        f"{[round(v, 4) for v in by_size[:, 1:].mean(0).tolist()]}"
    )
    assert result.val_bpc == pytest.approx(result.val_loss / LN2, rel=1e-12)
    # the reported stderr is the real Monte-Carlo error (conservative, and not so large that
    # "within 4 stderr" says nothing)
    assert 0.75 * true_se <= se <= 2.0 * true_se, (se, true_se)
    assert se < 0.01


def test_masked_nll_by_hand_on_an_identity_backbone():
    """At init every block is the identity (zero residual projections), so the logits at a
    position depend on its own input token only: every masked position predicts
    softmax(head @ rmsnorm(wte[MASK])). With a random head and embedding, the NLL of a masked
    character is known in closed form, and _masked_nll must be the mean over the masked ones."""
    wl = _workload()
    params = _perturbed(wl.init_params(0), scale=1.0, only={"wte", "head"})
    assert all(torch.count_nonzero(params[k]) == 0 for k in params if k.endswith((".wo", ".proj")))
    e = params["wte"][wl.mask_id].double()
    logq = (params["head"].double() @ (e / e.square().mean().sqrt())).log_softmax(0)
    x = torch.tensor([[0, 1, 2, 3, 4], [5, 5, 0, 2, 1], [3, 0, 4, 1, 5], [2, 2, 2, 3, 0]])
    subsets = [(0,), (1, 3), (0, 2, 4), (1, 2, 3, 4)]
    mask = torch.zeros(4, SEQ_LEN, dtype=torch.bool)
    for r, S in enumerate(subsets):
        mask[r, list(S)] = True
    with torch.no_grad():
        got = wl._masked_nll(wl.stack(params), x[None], mask[None])[0]
    for r, S in enumerate(subsets):
        by_hand = sum(-logq[x[r, i]].item() for i in S) / len(S)
        assert got[r].item() == pytest.approx(by_hand, rel=1e-5, abs=1e-6), (r, S)
    # the per-character costs differ, so sum/N, sum/T or a mean over all T would not match
    assert len({round(-logq[c].item(), 3) for c in range(len(CHARS))}) == len(CHARS)


def test_masked_nll_matches_explicit_masking_with_context():
    """With a context-dependent model: explicit masks of several sizes, against one forward
    pass per masked input and the mean NLL over its masked positions. The logits come from the
    input built from x, and are reused for y, which differs from x only under the mask: the
    characters under the mask must not reach the prediction, only the targets."""
    wl = _workload()
    params = _perturbed(wl.init_params(0))
    x = torch.tensor([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1], [1, 1, 0, 0, 5], [2, 3, 4, 5, 0]])
    mask = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]],
                        dtype=torch.bool)
    y = torch.where(mask, (x + 1 + torch.arange(SEQ_LEN)) % len(CHARS), x)
    assert (y != x)[mask].all()
    with torch.no_grad():
        nll = lambda t: wl._masked_nll(wl.stack(params), t[None], mask[None])[0]  # noqa: E731
        got_x, got_y = nll(x), nll(y)
        for r in range(len(x)):
            inp = torch.where(mask[r], wl.mask_id, x[r])
            logits, _ = forward(wl.spec, params, inp[None], wl.rotary)
            lp = logits[0].double().log_softmax(-1)
            masked = mask[r].nonzero().flatten().tolist()
            for tokens, got in ((x, got_x), (y, got_y)):
                by_hand = sum(-lp[i, tokens[r, i]].item() for i in masked) / len(masked)
                assert got[r].item() == pytest.approx(by_hand, rel=1e-5), r
    assert not torch.allclose(got_x, got_y)
