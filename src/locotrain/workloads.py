"""Model + data + loss + evaluation + sampling behind one small interface.

Two workloads share the backbone in models/backbone.py:

* `ar_gpt`: causal next-character prediction; validation is the exact cross-entropy in nats
  per character, and bits per character (bpc) = nats / ln 2.
* `masked_diffusion`: the same backbone, bidirectional, with one extra input token [MASK].
  The loss is MDLM's bound on the NLL (Sahoo et al. 2024, arXiv 2406.07524,
  github.com/kuleshov-group/mdlm): cross-entropy on masked positions only, weighted per
  sequence by 1/t, with no mask logit in the head and unmasked positions carried over.
  We use its exact-count form (LLaDA's likelihood estimator, github.com/ML-GSAI/LLaDA):
  mask exactly l of the N scored characters and weight by N/l, i.e. take the mean
  cross-entropy of the masked characters. Integrating the binomial mask count of the
  continuous form against 1/t gives exactly this, with l uniform on 1..N, so both forms
  have the same expectation; the count form has far less variance at small t. Training
  stratifies t over the batch, validation stratifies l over `eval.samples` draws per
  window, so "<= X bpc" is an upper bound comparable with the AR number.

Fair comparison (../docs/workloads.md): both models are scored on the same validation
windows of seq_len + 1 characters and on the same target characters w[1:] (the AR model
conditions on w[:-1]; the diffusion model sees w[1:] only). With a never-masked prefix of P
characters, both are scored on w[P+1:] only (`eval.score_from`).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .data import Corpus, val_windows
from .models.backbone import Backbone, Params, forward, init_params, rotary_tables

LN2 = math.log(2.0)


@dataclass
class EvalResult:
    val_loss: float  # nats per character (an upper bound for the diffusion model)
    val_bpc: float
    stderr_bpc: float  # Monte-Carlo standard error (0 for the exact AR number)
    is_bound: bool
    windows: int

    def describe(self) -> str:
        if self.is_bound:
            return f"<= {self.val_bpc:.4f} bpc (+-{self.stderr_bpc:.4f})"
        return f"{self.val_bpc:.4f} bpc"


@dataclass
class SampleResult:
    text: str
    steps: int  # model evaluations used
    chars: int  # characters generated

    @property
    def steps_per_char(self) -> float:
        return self.steps / max(1, self.chars)


class Workload(ABC):
    """A language-modelling task on one corpus: parameters in, loss out."""

    name = "base"
    summary = ""
    causal = True

    def __init__(self, cfg: Config, corpus: Corpus, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.corpus = corpus
        self.tokenizer = corpus.tokenizer
        self.device = torch.device(device)
        m = cfg.model
        V = corpus.tokenizer.vocab_size
        self.spec = Backbone(
            vocab_in=V + (0 if self.causal else 1), vocab_out=V, depth=m.depth, width=m.width,
            heads=m.heads, seq_len=m.seq_len, causal=self.causal, dropout=m.dropout,
            softcap=m.softcap, latent_input=(not self.causal and cfg.workload.loopholing),
        )
        self.rotary = rotary_tables(self.spec, self.device)
        self.window = m.seq_len + 1  # every training and validation window
        self.score_from = cfg.eval.score_from if cfg.eval.score_from >= 0 else cfg.workload.context_len
        self.amp = self.device.type == "cuda"
        self._train_forward = forward

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the training forward pass (eval and sampling, whose shapes vary,
        stay eager). The number of workers stepped together varies in asynchronous runs:
        torch.compile's default makes that dimension dynamic at its second value instead of
        compiling once per width. `mode="reduce-overhead"` adds CUDA graphs (the batched
        engine asks for it when runtime.cuda_graphs is on)."""
        self._train_forward = torch.compile(forward, mode=mode)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the batched engine should replay this model's steps as CUDA graphs:
        runtime.cuda_graphs = "on" with train.compile on a CUDA device. "auto" is off until
        docs/benchmarks.md measures that graphs pay."""
        return (self.cfg.runtime.cuda_graphs == "on" and self.cfg.train.compile
                and self.device.type == "cuda")

    # -- parameters ---------------------------------------------------------------
    def init_params(self, seed: int) -> Params:
        params = init_params(self.spec, torch.Generator().manual_seed(seed))
        return {k: v.to(self.device) for k, v in params.items()}

    def num_params(self) -> int:
        return self.spec.num_params()

    def autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, params: Params, tokens: torch.Tensor, latent=None, train=False):
        """W models at once: every parameter and `tokens` (W, B, T) lead with the worker
        dimension (models/backbone.py)."""
        fn = self._train_forward if train else forward
        with self.autocast():
            return fn(self.spec, params, tokens, self.rotary, latent=latent, train=train)

    @staticmethod
    def stack(params: Params) -> Params:
        """One model's parameters as a stack of one (views, no copy)."""
        return {k: v.unsqueeze(0) for k, v in params.items()}

    # -- what each workload defines ------------------------------------------------
    @abstractmethod
    def loss(self, params: Params, batch: torch.Tensor,
             generators: list[torch.Generator]) -> torch.Tensor:
        """Training losses of W models, (W,): stacked `params`, batches (W, B, seq_len + 1),
        and each model's own random stream (for masks; unused by the AR model)."""

    @torch.no_grad()
    def evaluate(self, params: Params, limit: int = 0, progress=None) -> EvalResult:
        """Validation loss on the fixed windows (`limit` > 0: an evenly spaced subset);
        `progress(windows_done, windows_total)` is called as it goes. One model: the
        reference that `evaluate_many` is tested against (tests/test_batched_eval.py)."""
        return self.evaluate_stacked(self.stack(params), limit, progress)[0]

    @torch.no_grad()
    def evaluate_many(self, models: list[Params], limit: int = 0) -> list[EvalResult]:
        """`evaluate` of several models of this shape in one stacked computation: every
        window chunk runs through all of them at once (the backbone's worker dimension), so
        each model sees the same windows, chunks and masks as when evaluated alone."""
        stacked = {n: torch.stack([m[n] for m in models]) for n in models[0]}
        return self.evaluate_stacked(stacked, limit)

    @abstractmethod
    def evaluate_stacked(self, params: Params, limit: int = 0, progress=None) -> list[EvalResult]:
        """`evaluate` of M models whose parameters lead with a model dimension M."""

    def eval_key(self, limit: int) -> tuple:
        """Models whose keys are equal can be evaluated together by either one's workload:
        the same task, shapes, device, validation windows and evaluation settings."""
        e = self.cfg.eval
        return (type(self), self.spec, str(self.device), self.amp, self.corpus.sha256,
                len(self.corpus.val), self.score_from, e.batch_size, e.samples, limit)

    @abstractmethod
    def sample(self, params: Params, prompt: str, chars: int, generator: torch.Generator) -> SampleResult:
        """`chars` new characters after `prompt`."""

    def val_windows(self, limit: int = 0) -> torch.Tensor:
        return val_windows(self.corpus.val, self.window, limit).to(self.device)


class ARGPT(Workload):
    name = "ar_gpt"
    summary = "character-level GPT, causal; exact bits per character"
    causal = True

    def loss(self, params, batch, generators):
        logits, _ = self._forward(params, batch[..., :-1], train=True)
        nll = F.cross_entropy(logits.flatten(0, 2), batch[..., 1:].flatten(), reduction="none")
        return nll.view(len(batch), -1).mean(1)

    @torch.no_grad()
    def evaluate_stacked(self, params, limit=0, progress=None):
        windows = self.val_windows(limit)
        M = _models(params)
        totals, count = [0.0] * M, 0
        done = 0
        for chunk in windows.split(self.cfg.eval.batch_size):
            if progress is not None:
                progress(done, len(windows))
            done += len(chunk)
            logits = self._forward(params, chunk[:, :-1].expand(M, -1, -1))[0]  # (M, n, T, V)
            targets = chunk[:, 1:].repeat(M, 1)
            nll = F.cross_entropy(logits.flatten(0, 1).transpose(1, 2), targets, reduction="none")
            nll = nll.view(M, *chunk[:, 1:].shape)[..., self.score_from:]
            for m, s in enumerate(nll.double().sum((1, 2)).tolist()):  # one sync per chunk
                totals[m] += s
            count += nll[0].numel()
        return [EvalResult(t / count, t / count / LN2, 0.0, False, len(windows)) for t in totals]

    @torch.no_grad()
    def sample(self, params, prompt, chars, generator):
        ids = self.tokenizer.encode(prompt or "\n")
        x = torch.tensor([ids], device=self.device)
        params = self.stack(params)
        temperature = self.cfg.sample.temperature
        for _ in range(chars):
            logits = self._forward(params, x[None, :, -self.spec.seq_len:])[0][0]
            nxt = _pick(logits[0, -1], temperature, generator)
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
        return SampleResult(self.tokenizer.decode(x[0].tolist()), chars, chars)


class MaskedDiffusion(Workload):
    name = "masked_diffusion"
    summary = "masked text diffusion on the same backbone; NELBO bound in bits per character"
    causal = False

    def __init__(self, cfg, corpus, device="cpu"):
        super().__init__(cfg, corpus, device)
        self.mask_id = corpus.tokenizer.vocab_size
        self.context_len = cfg.workload.context_len
        self.loopholing = cfg.workload.loopholing

    def _predict(self, params, x, train=False, two_pass=None):
        """Logits of W stacked models for inputs x (W, B, T), with Loopholing's two passes.

        Loopholing (Jo et al. 2025, arXiv 2510.19304) trains with self-conditioning: a first
        pass with an empty latent, no gradient; a second pass that adds its final hidden
        state. `self_cond_rate` is the fraction of training batches that take two passes;
        `two_pass` (W,) says which models' batches do (all of them outside training)."""
        if not self.loopholing:
            return self._forward(params, x, train=train)[0]
        latent = torch.zeros(*x.shape, self.spec.width, device=x.device)
        if two_pass is None or bool(two_pass.any()):
            with torch.no_grad():
                hidden = self._forward(params, x, latent=latent, train=train)[1].float()
            keep = torch.ones(len(x), dtype=torch.bool) if two_pass is None else two_pass
            latent = torch.where(keep.to(x.device).view(-1, 1, 1, 1), hidden, latent)
        return self._forward(params, x, latent=latent, train=train)[0]

    def _mask_exactly(self, n_seq: int, T: int, P: int, ell: torch.Tensor, generator) -> torch.Tensor:
        """A (n_seq, T) mask with exactly ell[i] masked positions among positions >= P,
        chosen uniformly at random."""
        ranks = torch.rand(n_seq, T - P, generator=generator).argsort(dim=1).argsort(dim=1)
        mask = torch.zeros(n_seq, T, dtype=torch.bool)
        mask[:, P:] = ranks < ell.view(-1, 1)
        return mask.to(self.device)

    def _masked_nll(self, params, x, mask, train=False, two_pass=None) -> torch.Tensor:
        """Mean cross-entropy over the masked positions of each sequence of W stacked models:
        x and mask (W, n_seq, T) -> (W, n_seq)."""
        logits = self._predict(params, torch.where(mask, self.mask_id, x), train, two_pass)
        nll = F.cross_entropy(logits.flatten(0, 2), x.flatten(), reduction="none").view(x.shape)
        return (nll * mask).sum(-1) / mask.sum(-1)

    def loss(self, params, batch, generators):
        """The bound with mask rates stratified across the batch (MDLM's low-discrepancy
        sampler) and exactly l = ceil(t N) masked characters per sequence, weighted N / l.
        Drawing the count instead of Bernoulli masks keeps the bound and removes the
        variance of tiny t, where one masked character would carry a weight of 1/t. Each
        model draws its masks from its own stream, in the same order whatever the batch."""
        x = batch[..., 1:]  # the same target characters as the AR model scores
        W, B, T = x.shape
        N = T - self.context_len
        masks, two_pass = [], torch.zeros(W, dtype=torch.bool)
        for w, generator in enumerate(generators):
            u = torch.rand((), generator=generator).item()
            t = (torch.arange(B, dtype=torch.float64) + u) / B
            ell = (t * N).ceil().long().clamp(1, N)
            masks.append(self._mask_exactly(B, T, self.context_len, ell, generator))
            if self.loopholing:
                rate = self.cfg.workload.self_cond_rate
                two_pass[w] = torch.rand((), generator=generator).item() < rate
        return self._masked_nll(params, x, torch.stack(masks), True, two_pass).mean(-1)

    @torch.no_grad()
    def evaluate_stacked(self, params, limit=0, progress=None):
        """NELBO in the exact-count form, `eval.samples` stratified draws per window.

        Standard error: the collapsed-strata estimator (pairs of neighbouring strata), which
        overstates the Monte-Carlo variance slightly, so the reported error is conservative."""
        K = self.cfg.eval.samples
        P = self.score_from
        # The same masks every evaluation, and for every model of a stack: they are drawn
        # once per chunk and shared.
        generator = torch.Generator().manual_seed(1234)
        windows = self.val_windows(limit)[:, 1:]
        M = _models(params)
        W, T = windows.shape
        N = T - P
        per_window = torch.empty(M, W, K, dtype=torch.float64)
        rows = max(1, self.cfg.eval.batch_size // K) if K <= self.cfg.eval.batch_size else 1
        for w0 in range(0, W, rows):
            if progress is not None:
                progress(w0, W)
            chunk = windows[w0:w0 + rows]
            n = len(chunk)
            x = chunk.repeat_interleave(K, dim=0)  # (n*K, T)
            u = torch.rand(n, 1, generator=generator)
            ell = 1 + ((torch.arange(K)[None, :] + u) * N / K).long().clamp(max=N - 1)  # 1..N
            mask = self._mask_exactly(n * K, T, P, ell, generator)
            nll = self._masked_nll(params, x.expand(M, -1, -1), mask.expand(M, -1, -1))
            per_window[:, w0:w0 + n] = nll.double().view(M, n, K).cpu()
        return [_bound(p) for p in per_window]

    @torch.no_grad()
    def sample(self, params, prompt, chars, generator):
        """Block-wise generation: every block of seq_len characters is conditioned on the last
        `context` characters generated so far (tiny-diffusion's continuous blocks)."""
        T = self.spec.seq_len
        context = self.context_len or T // 4
        ids = self.tokenizer.encode(prompt or "\n")[-(T - 1):]
        out, steps, target = list(ids), 0, len(ids) + chars
        while len(out) < target:
            ctx = out[-context:] if len(out) > len(ids) else out
            new = min(T - len(ctx), target - len(out))
            block, n_steps = self._denoise(params, ctx, new, generator)
            out += block
            steps += n_steps
        return SampleResult(self.tokenizer.decode(out), steps, chars)

    def _denoise(self, params, ctx: list[int], new: int, generator) -> tuple[list[int], int]:
        s = self.cfg.sample
        x = torch.tensor([ctx + [self.mask_id] * new], device=self.device)
        gen_pos = torch.arange(len(ctx), len(ctx) + new, device=self.device)
        latent = torch.zeros(1, x.size(1), self.spec.width, device=self.device)
        steps = 0

        stacked = self.stack(params)

        def predict(x, latent):
            if self.loopholing:
                logits, hidden = self._forward(stacked, x[None], latent=latent[None])
                return logits[0], hidden[0].float()
            return self._forward(stacked, x[None])[0][0], latent

        if s.method == "remask":
            # Iterative refinement (RoBERTaDiffusion-style): predict every generated position,
            # then re-mask a random, shrinking fraction of them; the last step keeps all.
            n_steps = max(1, s.steps)
            for i in range(n_steps):
                logits, latent = predict(x, latent)
                x[0, gen_pos] = _pick(logits[0, gen_pos], s.temperature, generator)
                keep_masked = int(round(new * (1 - (i + 1) / n_steps)))
                if keep_masked:
                    order = torch.randperm(new, generator=generator)[:keep_masked].to(self.device)
                    x[0, gen_pos[order]] = self.mask_id
                steps += 1
        else:
            # Confidence-threshold parallel decoding (Fast-dLLM style): commit every masked
            # position whose top probability reaches the threshold, at least one per step.
            while (x[0] == self.mask_id).any():
                logits, latent = predict(x, latent)
                masked = (x[0] == self.mask_id).nonzero().squeeze(1)
                probs = logits[0, masked].softmax(-1)
                conf = probs.max(-1).values
                commit = conf >= s.threshold
                if not commit.any():
                    commit[conf.argmax()] = True
                chosen = _pick(logits[0, masked[commit]], s.temperature, generator)
                x[0, masked[commit]] = chosen
                steps += 1
        return x[0, len(ctx):].tolist(), steps


def _bound(per_window: torch.Tensor) -> EvalResult:
    """One model's NELBO from its (windows, samples) cross-entropies, with the standard error
    of the collapsed strata."""
    W, K = per_window.shape
    estimate = per_window.mean().item()
    pairs = per_window[:, : K - K % 2].view(W, -1, 2)
    var_w = ((pairs[..., 0] - pairs[..., 1]) ** 2).sum(1) / K**2 if K >= 2 else per_window.var()
    stderr = math.sqrt(var_w.sum().item()) / W
    return EvalResult(estimate, estimate / LN2, stderr / LN2, True, W)


def _models(params: Params) -> int:
    """How many models a stack of parameters holds (its leading dimension)."""
    return len(next(iter(params.values())))


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Sample ids from logits (..., V) at a temperature; 0 means argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1).cpu()
    flat = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator)
    return flat.view(probs.shape[:-1]).to(logits.device)


WORKLOADS = {"ar_gpt": ARGPT, "masked_diffusion": MaskedDiffusion}


def build_workload(cfg: Config, corpus: Corpus, device="cpu") -> Workload:
    return WORKLOADS[cfg.workload.name](cfg, corpus, device)
