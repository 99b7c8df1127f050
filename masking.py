"""The forward (masking) process and the MDM loss: the one place where tokens get masked
and the one place where the loss is computed.

Forward process: given clean tokens x0 and a masking rate t ~ U(0,1) (or any t-sampler in
samplers.py), every *eligible* (response) token is replaced by [MASK] independently with
probability p = (1 - eps) * t + eps. The prompt is never masked.
"""
import torch
import torch.nn.functional as F

EPS = 1e-3


def mask_rate(t, eps=EPS):
    """p = (1 - eps) t + eps: the per-token masking probability at rate t (eps keeps 1/p finite)."""
    return (1 - eps) * t + eps


def uniform_like(x, generator=None):
    """U(0,1) noise shaped like x, on x's device, from `generator` (a CPU generator works on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device).to(x.device)


def random_mask(eligible, p, generator=None):
    """Standard masks: each eligible token masked independently with probability p (one p per row)."""
    u = uniform_like(eligible, generator)
    return eligible & (u < p[:, None])


def mdm_loss(logits, x0, mask, eligible, p):
    """Per-row MDM loss, FloatTensor[B]:  l = (1/P) * sum_{i masked} CE_i / p,  P = #eligible tokens.

    Why E_mask[l] is the ELBO term: token i is masked with probability p, so
    E_mask[sum_i 1{i masked} CE_i / p] = sum_i CE_i, i.e. the 1/p weight undoes the masking
    probability and E_t E_mask[l] is the (per-token) negative ELBO of the MDM (LLaDA Eq. 3,
    MDLM Eq. 10). A row where nothing is masked gives exactly 0 and is kept in the mean:
    dropping it would bias the estimate upwards, most at small t.
    The loss is computed in float32 whatever the autocast dtype: 1/p reaches 1/eps = 1000.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, T]
    P = eligible.sum(1).clamp(min=1)
    return (ce * mask).sum(1) / (p.float() * P)


def mirror_masks(eligible, p, generator=None):
    """MIRROR: two complementary views from ONE uniform draw per token.

    m1 = eligible & (u < p),  m2 = eligible & (u > 1 - p),  u_i ~ U(0,1).
    Each view is marginally Bernoulli(p) per token; P(both) = max(0, 2p - 1), so for p <= 1/2 the
    views are disjoint. (The paper's released code draws the second view independently: that is
    `pair_masks`, not MIRROR.)

    Variance law: with l1, l2 the two views' losses, each of variance s^2 and correlation rho,
    Var((l1 + l2)/2) = s^2/2 * (1 + rho). Independent views (pair) have rho = 0. For MIRROR the
    per-token mask indicators have covariance P(both) - p^2 = -min(p, 1-p)^2 <= 0; if each token's
    CE did not depend on which other tokens are masked (l linear in the indicators with fixed
    coefficients), that makes Cov(l1, l2) <= 0 exactly, so rho <= 0 and the pattern noise A is at
    least halved. With a real model the CE of token i changes with the rest of the mask pattern,
    so rho <= 0 is an empirical fact to be measured (variance.py), not a theorem.
    """
    u = uniform_like(eligible, generator)
    p = p[:, None]
    return eligible & (u < p), eligible & (u > 1 - p)


def pair_masks(eligible, p, generator=None):
    """Two independent standard masks ("MultiSample-2"): the equal-compute control for MIRROR.
    P(both) = p^2 per token, so the views are uncorrelated and Var((l1+l2)/2) = s^2/2."""
    return random_mask(eligible, p, generator), random_mask(eligible, p, generator)


def arm_loss(logits, x0, eligible):
    """Autoregressive baseline: mean next-token CE over eligible positions (position i predicts
    x0[i+1] from x0[:i+1] under causal attention). Deterministic given x0: no t, no mask."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x0[:, 1:], reduction="none")
    target = eligible[:, 1:]
    return (ce * target).sum(1) / target.sum(1).clamp(min=1)


MASKINGS = ("standard", "mirror", "pair")


def row_losses(model, x0, eligible, t, masking="standard", generator=None):
    """One draw of the training loss per clean row: FloatTensor[B].

    The composition used by train.py, variance.py and samplers.py (P-POTS measurement):
    p = mask_rate(t) -> mask(s) -> x_t -> model -> mdm_loss. For `mirror`/`pair` both views go
    through the model in ONE forward pass (concatenated on the batch) and the row's loss is
    (l1 + l2)/2. A causal (ARM) model ignores t and masks and returns arm_loss.
    """
    if model.config.causal:
        return arm_loss(model(x0), x0, eligible)
    p = mask_rate(t)
    if masking == "standard":
        masks = (random_mask(eligible, p, generator),)
    elif masking == "mirror":
        masks = mirror_masks(eligible, p, generator)
    elif masking == "pair":
        masks = pair_masks(eligible, p, generator)
    else:
        raise ValueError(f"unknown masking {masking!r}; choose from {MASKINGS}")
    k = len(masks)
    mask = torch.cat(masks)
    x0k, eligible_k, pk = x0.repeat(k, 1), eligible.repeat(k, 1), p.repeat(k)
    x_t = torch.where(mask, model.config.mask_id, x0k)
    loss = mdm_loss(model(x_t), x0k, mask, eligible_k, pk)
    return loss.view(k, -1).mean(0)
