"""The forward (masking) process and the MDM loss: the one place where tokens get masked and the
one place where the loss is computed.

Given clean tokens x0 and a masking rate t (drawn by a t-sampler, samplers.py), every eligible
(response) token is replaced by [MASK] independently with probability p = (1 - eps) t + eps. The
prompt is never masked. The core path, in reading order: mask_rate, random_mask, mirror_masks,
pair_masks, mdm_loss, arm_loss, clean_rows, MaskSpec, draw_masks, row_losses. Below the seam at the
end of the file sit two supplementary methods, ISAD and SyRM: SupplementarySpec, a MaskSpec that
overrides its two hooks (rates, loss). The core only calls the hooks; a reader who skips the seam
loses nothing of the core.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-3
MODES = ("standard", "mirror", "pair")


def mask_rate(t, eps=EPS):
    """p = (1 - eps) t + eps: the per-token masking probability at rate t (eps keeps 1/p finite)."""
    return (1 - eps) * t + eps


def uniform_like(x, generator=None):
    """U(0,1) noise shaped like x, on x's device, from `generator` (a CPU generator works on any
    device)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device).to(x.device)


def per_token(p):
    """Masking probabilities broadcastable to [B, T]: one per row ([B] -> [B, 1])
    or one per token."""
    return p[:, None] if p.dim() == 1 else p


def random_mask(eligible, p, generator=None):
    """Standard masks, BoolTensor[B, T]: each eligible token masked independently with probability
    p (one p per row, or one per token)."""
    u = uniform_like(eligible, generator)
    return eligible & (u < per_token(p))


def mirror_masks(eligible, p, generator=None):
    """MIRROR: two complementary views from ONE uniform draw per token,
    m1 = eligible & (u < p),  m2 = eligible & (u > 1 - p),  u_i ~ U(0, 1).

    Each view is marginally Bernoulli(p) per token, and P(both) = max(0, 2p - 1), so the views are
    disjoint for p <= 1/2. (The paper's released code draws the second view independently: that
    is pair_masks, not MIRROR.) Per-token rates work token by token, so ISAD's q_i keeps each view
    unbiased with its 1/q_i weights.

    The covariance law (the one statement of it in this repository). With l1, l2 the two views'
    losses, each of variance s^2, and correlation rho,  Var((l1 + l2) / 2) = s^2 / 2 (1 + rho).
    Independent views (pair) have rho = 0. For MIRROR the per-token indicators have covariance
    P(both) - p^2 = -min(p, 1 - p)^2 <= 0; if each token's CE did not depend on which other tokens
    are masked (l linear in the indicators with fixed coefficients), Cov(l1, l2) <= 0 exactly, so
    rho <= 0 and the mask-pattern noise A is at least halved. A real model's CE of token i changes
    with the rest of the pattern, so for it rho <= 0 is measured (variance.py), not a theorem.
    A second difference from pair, with no variance argument in it: disjoint views show the model
    more distinct masked tokens per clean row, E[covered] = min(2p, 1) of the tokens against
    pair's 2p - p^2 (3/4 against 2/3 averaged over t ~ U(0, 1)).
    """
    u = uniform_like(eligible, generator)
    p = per_token(p)
    return eligible & (u < p), eligible & (u > 1 - p)


def pair_masks(eligible, p, generator=None):
    """Two independent standard masks ("MultiSample-2"): the equal-compute control for MIRROR.
    P(both) = p^2 per token, so the views are uncorrelated and Var((l1 + l2) / 2) = s^2 / 2."""
    return random_mask(eligible, p, generator), random_mask(eligible, p, generator)


def mdm_loss(logits, x0, mask, eligible, p, q=None):
    """Per-row MDM loss, FloatTensor[B]:  l = (1/P) sum_{i masked} CE_i / p,  P = #eligible tokens.

    Token i is masked with probability p, so E_mask[sum_i 1{i masked} CE_i / p] = sum_i CE_i: the
    1/p weight undoes the masking probability, and E_t E_mask[l] is the per-token negative ELBO of
    the MDM (LLaDA Eq. 3, MDLM Eq. 10). A row where nothing is masked gives exactly 0 and stays in
    the mean: dropping it would bias the estimate upwards, most at small t. The loss is float32
    whatever the autocast dtype: 1/p reaches 1/eps = 1000.
    q (FloatTensor[B, T], ISAD): token i was masked with probability q_i instead of p; its CE is
    weighted by 1/q_i, written as the ratio p/q_i on top of the 1/p.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, T]
    if q is not None:
        ce = ce * (p[:, None] / q)
    P = eligible.sum(1).clamp(min=1)
    return (ce * mask).sum(1) / (p.float() * P)


def arm_loss(logits, x0, eligible):
    """Autoregressive baseline: mean next-token CE over eligible positions (position i predicts
    x0[i+1] from x0[:i+1] under causal attention). Deterministic given x0: no t, no mask."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x0[:, 1:], reduction="none")
    target = eligible[:, 1:]
    return (ce * target).sum(1) / target.sum(1).clamp(min=1)


def clean_rows(batch_size, mode, matched_compute):
    """Clean (x0) rows per step: batch_size, or batch_size / 2 for two views (mirror, pair) at
    matched compute, so that every method runs batch_size forward rows; the paper's protocol
    (matched_compute=False) runs batch_size clean rows, so 2 x batch_size forward rows."""
    if mode not in ("mirror", "pair") or not matched_compute:
        return batch_size
    if batch_size % 2:
        raise ValueError(f"--masking={mode} with matched_compute runs batch_size/2 clean rows, "
                         f"each twice: --batch_size={batch_size} must be even")
    return batch_size // 2


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """How a batch is masked: standard (one view) | mirror | pair (two views, loss = their mean).
    Two hooks, rates and loss, are what the core calls; the supplementary methods override them
    (SupplementarySpec, below the seam). str(spec) names it for logs, e.g. 'mirror'."""
    mode: str = "standard"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown masking {self.mode!r}; choose from {', '.join(MODES)}")

    @property
    def views(self):
        return 1 if self.mode == "standard" else 2

    def rates(self, eligible, p):
        """(maskable tokens, masking rates): the response at rate p."""
        return eligible, p

    def loss(self, logits, x0k, mask, eligible, p, k):
        """Per-row losses of the k views stacked on the batch (x0k, mask, p); `eligible` holds
        one copy of the rows."""
        return mdm_loss(logits, x0k, mask, eligible.repeat(k, 1), p)

    def __str__(self):
        return self.mode


def draw_masks(eligible, t, spec=MaskSpec(), generator=None):
    """The masks of one batch, drawn apart from any forward pass: a tuple of BoolTensor[B, T], one
    per view. train.py draws a step's masks once for the whole global batch and gives each
    micro-batch its rows, so the estimator does not depend on how the batch is split."""
    maskable, p = spec.rates(eligible, mask_rate(t))
    if spec.mode == "standard":
        return (random_mask(maskable, p, generator),)
    return (mirror_masks if spec.mode == "mirror" else pair_masks)(maskable, p, generator)


def row_losses(model, x0, eligible, t, spec=MaskSpec(), generator=None, masks=None):
    """One draw of the training loss per clean row, FloatTensor[B]: p = mask_rate(t) -> mask(s) ->
    x_t -> model -> mdm_loss. Two views (mirror, pair) go through the model in ONE forward pass,
    concatenated on the batch, and the row's loss is (l1 + l2) / 2. A causal (ARM) model ignores t
    and the masks and returns arm_loss. `masks`: views already drawn by draw_masks for these rows
    (default: drawn here from `generator`). Used by train.py, variance.py and samplers.py."""
    config = getattr(model, "module", model).config  # through a DistributedDataParallel wrapper
    if config.causal:
        return arm_loss(model(x0), x0, eligible)
    masks = draw_masks(eligible, t, spec, generator) if masks is None else masks
    mask = torch.cat(masks)
    k = len(masks)
    x0k, p = x0.repeat(k, 1), mask_rate(t).repeat(k)
    logits = model(torch.where(mask, config.mask_id, x0k))
    return spec.loss(logits, x0k, mask, eligible, p, k).view(k, -1).mean(0)


# ------------------------------------------------------------- behind the seam: ISAD, SyRM
def isad_rates(p, critical, delta):
    """ISAD's per-token masking rates, FloatTensor[B, T]: q_j = min(1, p + delta) on the critical
    set S (`critical`, BoolTensor[T] or [B, T]) and q_j = p elsewhere; p is one rate per row, [B].

    mdm_loss(..., q=q) weights each masked CE_j by 1/q_j. That keeps each token's MARGINAL weight
    right (E[1{j masked} / q_j] = 1), but ISAD is a different denoising objective, not an unbiased
    estimate of the ELBO: masking S at q != p changes the context every other token is predicted
    from, and a real model's CE of token i depends on which other tokens are masked (test_all.py
    shows the gap; with fixed logits there is none). Aim: A. With fixed CEs token j adds
    CE_j^2 (1 - q_j) / q_j / P^2 to the mask-pattern variance, which falls as q_j rises."""
    return torch.where(critical, (p[:, None] + delta).clamp(max=1), p[:, None])


def syrm_loss(logits, x0, mask, eligible, syntax, p, alpha, q=None):
    """SyRM (syntax-and-response mask), FloatTensor[B]:  L = alpha L_resp + (1 - alpha) L_syntax.

    The maskable set is the response (`eligible`) plus the prompt's syntax tokens (`syntax`, e.g.
    '+' and '='); each part is an mdm_loss over its own token set (a row without syntax gets
    L_syntax = 0). alpha = 1 gives exactly mdm_loss over the response (tested bit for bit).
    SyRM changes the objective (slightly biased, as the paper says): the response is also learnt
    from contexts whose syntax is masked, and a syntax term is added. In our tasks the syntax sits
    at fixed positions, so masking it hides nothing about the response: the optimum does not move
    there, only the loss scale (alpha) and the gradient noise do. Aim: A."""
    resp = mdm_loss(logits, x0, mask & eligible, eligible, p, q)
    return alpha * resp + (1 - alpha) * mdm_loss(logits, x0, mask & syntax, syntax, p, q)


@dataclass(frozen=True, eq=False)
class SupplementarySpec(MaskSpec):
    """A MaskSpec with ISAD and/or SyRM switched on (each None = off):

      isad        ISAD's critical set S, BoolTensor[T] or [B, T]
      isad_delta  ISAD's Delta: S is masked with q = min(1, p + Delta) (the paper's code: 0.2)
      syntax      SyRM's prompt syntax tokens, BoolTensor[T] or [B, T]
      syrm_alpha  SyRM's alpha in L = alpha L_resp + (1 - alpha) L_syntax
    str(spec) names it for logs, e.g. 'standard+isad'."""
    isad: torch.Tensor = None
    isad_delta: float = 0.2
    syntax: torch.Tensor = None
    syrm_alpha: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.isad_delta <= 1:
            raise ValueError(f"isad_delta must be in (0, 1], got {self.isad_delta}")
        if not 0 <= self.syrm_alpha <= 1:
            raise ValueError(f"syrm_alpha must be in [0, 1] (1 = off), got {self.syrm_alpha}")

    def rates(self, eligible, p):
        """SyRM adds the prompt's syntax tokens to the maskable set; ISAD raises the rate on S to q
        (isad_rates)."""
        if self.syntax is not None:
            eligible = eligible | self.syntax.to(eligible.device)
        if self.isad is not None:
            p = isad_rates(p, self.isad.to(p.device), self.isad_delta)
        return eligible, p

    def loss(self, logits, x0k, mask, eligible, p, k):
        q = None if self.isad is None else isad_rates(p[:len(eligible)], self.isad.to(p.device),
                                                      self.isad_delta).repeat(k, 1)
        eligible_k = eligible.repeat(k, 1)
        if self.syntax is None:
            return mdm_loss(logits, x0k, mask, eligible_k, p, q)
        syntax_k = (self.syntax.to(eligible.device) & ~eligible).repeat(k, 1)
        return syrm_loss(logits, x0k, mask, eligible_k, syntax_k, p, self.syrm_alpha, q)

    def __str__(self):
        return "+".join([self.mode] + ["isad"] * (self.isad is not None)
                        + ["syrm"] * (self.syntax is not None))


def mask_spec_from_config(config, dataset):
    """The MaskSpec a train.py config describes: a plain MaskSpec(masking), or a SupplementarySpec
    with `dataset`'s ISAD set (isad_tokens: 'none' = off) and, for syrm_alpha < 1, its syntax
    tokens."""
    rule, alpha = config["isad_tokens"], config["syrm_alpha"]
    if rule == "none" and alpha == 1:
        return MaskSpec(config["masking"])
    return SupplementarySpec(config["masking"],
                             isad=None if rule == "none" else dataset.isad_positions(rule),
                             isad_delta=config["isad_delta"],
                             syntax=dataset.syntax_positions() if alpha < 1 else None,
                             syrm_alpha=alpha)
