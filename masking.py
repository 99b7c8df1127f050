"""The forward (masking) process and the MDM loss: the one place where tokens get masked
and the one place where the loss is computed.

Forward process: given clean tokens x0 and a masking rate t ~ U(0,1) (or any t-sampler in
samplers.py), every *eligible* (response) token is replaced by [MASK] independently with
probability p = (1 - eps) * t + eps. The prompt is never masked (SyRM: except its syntax tokens).

A masking mode (standard | mirror | pair) can carry the options of two supplementary methods, ISAD
and SyRM, as a `Masking`; the EMA control variate on the reported loss is `LossControlVariate`.
"""
import torch
import torch.nn.functional as F

from configurator import fail

EPS = 1e-3


def mask_rate(t, eps=EPS):
    """p = (1 - eps) t + eps: the per-token masking probability at rate t (eps keeps 1/p finite)."""
    return (1 - eps) * t + eps


def uniform_like(x, generator=None):
    """U(0,1) noise shaped like x, on x's device, from `generator` (a CPU generator works on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device).to(x.device)


def per_token(p):
    """Masking probabilities broadcastable to [B, T]: one p per row ([B] -> [B, 1]) or one per token ([B, T])."""
    return p[:, None] if p.dim() == 1 else p


def isad_rates(p, critical, delta):
    """ISAD (importance sampling on answer delimiters / critical tokens; targets A), FloatTensor[B, T]:
    q_j = min(1, p + delta) on the critical set S (`critical`, BoolTensor[T] or [B, T]), q_j = p elsewhere;
    p is one rate per row, [B]. mdm_loss(..., q=q) weights each masked CE_j by 1/q_j, so it stays unbiased.

    Why it helps: with fixed CEs, token j adds CE_j^2 (1 - q_j) / q_j / P^2 to the mask-pattern variance,
    which falls as q_j rises, most for the tokens with the largest CE: hence S = the hardest tokens
    (data.py's isad_positions). q_j = 1 removes token j's share entirely. The tokens of S are also seen
    masked more often, i.e. trained on more, at a proportionally smaller weight each."""
    return torch.where(critical, (p[:, None] + delta).clamp(max=1), p[:, None])


def random_mask(eligible, p, generator=None):
    """Standard masks: each eligible token masked independently with probability p (one p per row, or
    one per token for ISAD)."""
    u = uniform_like(eligible, generator)
    return eligible & (u < per_token(p))


def mdm_loss(logits, x0, mask, eligible, p, q=None):
    """Per-row MDM loss, FloatTensor[B]:  l = (1/P) * sum_{i masked} CE_i / p,  P = #eligible tokens.

    Why E_mask[l] is the ELBO term: token i is masked with probability p, so
    E_mask[sum_i 1{i masked} CE_i / p] = sum_i CE_i, i.e. the 1/p weight undoes the masking
    probability and E_t E_mask[l] is the (per-token) negative ELBO of the MDM (LLaDA Eq. 3,
    MDLM Eq. 10). A row where nothing is masked gives exactly 0 and is kept in the mean:
    dropping it would bias the estimate upwards, most at small t.
    The loss is computed in float32 whatever the autocast dtype: 1/p reaches 1/eps = 1000.

    ISAD (q, FloatTensor[B, T], given when token i was masked with probability q_i instead of p): each
    masked CE_i is weighted by 1/q_i instead of 1/p, written as the importance ratio p/q_i on top of the
    1/p, l = (1/P) sum_{i masked} CE_i (p/q_i) / p. Then E_mask[1{i masked} CE_i / q_i] = CE_i still,
    so the loss stays unbiased whatever q is (q_i > 0).
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, T]
    if q is not None:
        ce = ce * (p[:, None] / q)
    P = eligible.sum(1).clamp(min=1)
    return (ce * mask).sum(1) / (p.float() * P)


def syrm_loss(logits, x0, mask, eligible, syntax, p, alpha, q=None):
    """SyRM (syntax-and-response mask), FloatTensor[B]:  L = alpha L_resp + (1 - alpha) L_syntax.

    The maskable set is the response (`eligible`) plus the prompt's syntax tokens (`syntax`, e.g. '+' and
    '='), and each part is an mdm_loss over its own token set: L_part = (1/P_part) sum_{i in part, masked}
    CE_i / p (ISAD: / q_i), P_part = #tokens of the part in the row (a row without syntax gets L_syntax = 0).
    alpha = 1 gives exactly mdm_loss over the response (tested bit for bit), whatever the mask does to the
    syntax tokens.

    SyRM CHANGES THE OBJECTIVE (slightly biased, as the paper says): the response is now also learnt from
    contexts whose syntax is masked, and a syntax term is added, so the optimum of L is not the optimum
    of the MDM ELBO in general; the paper bounds how far it moves. In our synthetic tasks the syntax
    tokens sit at fixed positions, so masking them hides nothing about the response and both terms can
    be minimised at once: the optimum does not move there, only the loss value (scaled by alpha) and the
    gradient noise change. Target: A, the mask-pattern noise. Part of any drop in L's variance is
    only the factor alpha^2 on L_resp's variance, so compare variances relative to the loss's scale.
    """
    resp = mdm_loss(logits, x0, mask & eligible, eligible, p, q)
    return alpha * resp + (1 - alpha) * mdm_loss(logits, x0, mask & syntax, syntax, p, q)


def mirror_masks(eligible, p, generator=None):
    """MIRROR: two complementary views from ONE uniform draw per token.

    m1 = eligible & (u < p),  m2 = eligible & (u > 1 - p),  u_i ~ U(0,1).
    Each view is marginally Bernoulli(p) per token; P(both) = max(0, 2p - 1), so for p <= 1/2 the
    views are disjoint. (The paper's released code draws the second view independently: that is
    `pair_masks`, not MIRROR.) With ISAD's per-token q the same draw works token by token: u_i < q_i
    and u_i > 1 - q_i are each Bernoulli(q_i), so each view stays unbiased with the 1/q_i weights.

    Variance law: with l1, l2 the two views' losses, each of variance s^2 and correlation rho,
    Var((l1 + l2)/2) = s^2/2 * (1 + rho). Independent views (pair) have rho = 0. For MIRROR the
    per-token mask indicators have covariance P(both) - p^2 = -min(p, 1-p)^2 <= 0; if each token's
    CE did not depend on which other tokens are masked (l linear in the indicators with fixed
    coefficients), that makes Cov(l1, l2) <= 0 exactly, so rho <= 0 and the pattern noise A is at
    least halved. With a real model the CE of token i changes with the rest of the mask pattern,
    so rho <= 0 is an empirical fact to be measured (variance.py), not a theorem.
    """
    u = uniform_like(eligible, generator)
    p = per_token(p)
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


class Masking(str):
    """A masking mode with the options of ISAD and SyRM: pass it wherever a mode name goes (`masking`).

    It IS the mode's name (a str subclass): it compares, prints and logs (json) as 'standard', 'mirror'
    or 'pair', so every caller that forwards `masking` (variance.measure, samplers.measure_curve) forwards
    the options with it, unchanged. A plain name is a Masking without options.

      isad        ISAD's critical set S, BoolTensor[T] or [B, T] (task.isad_positions); None = off
      isad_delta  ISAD's Delta: S is masked with q = min(1, p + Delta) (the paper's code: 0.2)
      syntax      SyRM's syntax tokens of the prompt, BoolTensor[T] or [B, T] (task.syntax_positions); None = off
      syrm_alpha  SyRM's alpha in L = alpha L_resp + (1 - alpha) L_syntax
    """

    def __new__(cls, mode="standard", isad=None, isad_delta=0.2, syntax=None, syrm_alpha=1.0):
        if mode not in MASKINGS:
            raise ValueError(f"unknown masking {mode!r}; choose from {MASKINGS}")
        if not 0 < isad_delta <= 1:
            fail(f"isad_delta must be in (0, 1], got {isad_delta}")
        if not 0 <= syrm_alpha <= 1:
            fail(f"syrm_alpha must be in [0, 1] (1 = off), got {syrm_alpha}")
        self = super().__new__(cls, mode)
        self.isad, self.isad_delta, self.syntax, self.syrm_alpha = isad, isad_delta, syntax, syrm_alpha
        return self


def masking_from_config(config, task):
    """The Masking a train.py config describes, with `task`'s ISAD set (isad_tokens: 'none' = off) and,
    for syrm_alpha < 1, its syntax tokens. Configs from before these options give the plain mode."""
    rule, alpha = config.get("isad_tokens", "none"), config.get("syrm_alpha", 1.0)
    return Masking(config["masking"], isad=None if rule == "none" else task.isad_positions(rule),
                   isad_delta=config.get("isad_delta", 0.2),
                   syntax=task.syntax_positions() if alpha < 1 else None, syrm_alpha=alpha)


def _rates(opts, p):
    """The masking probability of every token: p per row, or ISAD's q = min(1, p + Delta) on S, [B, T]."""
    return p if opts.isad is None else isad_rates(p, opts.isad.to(p.device), opts.isad_delta)


def draw_masks(eligible, t, masking="standard", generator=None):
    """The masks of one batch, drawn apart from any forward pass: a tuple of BoolTensor[B, T], one per view
    (standard: 1; mirror, pair: 2). train.py draws a step's masks once for the whole global batch, the same on
    every rank, and gives each micro-batch its rows, so the training estimator does not depend on how the
    batch is split over processes or accumulation steps."""
    opts = masking if isinstance(masking, Masking) else Masking(masking)
    q = _rates(opts, mask_rate(t))
    maskable = eligible if opts.syntax is None else eligible | opts.syntax.to(eligible.device)
    if opts == "standard":
        return (random_mask(maskable, q, generator),)
    return (mirror_masks if opts == "mirror" else pair_masks)(maskable, q, generator)


def row_losses(model, x0, eligible, t, masking="standard", generator=None, masks=None):
    """One draw of the training loss per clean row: FloatTensor[B].

    The composition used by train.py, variance.py and samplers.py (P-POTS measurement):
    p = mask_rate(t) -> mask(s) -> x_t -> model -> mdm_loss. For `mirror`/`pair` both views go
    through the model in ONE forward pass (concatenated on the batch) and the row's loss is
    (l1 + l2)/2. A causal (ARM) model ignores t and masks and returns arm_loss. `masks`: the views
    already drawn by draw_masks for these rows (default: drawn here from `generator`).
    A Masking with options adds, in any of the three modes: ISAD, the critical set S masked with
    q = min(1, p + Delta) and weighted 1/q (isad_rates, mdm_loss's q); SyRM, the prompt's syntax tokens
    maskable too and the loss split into response and syntax parts (syrm_loss).
    """
    config = getattr(model, "module", model).config  # through a DistributedDataParallel wrapper
    if config.causal:
        return arm_loss(model(x0), x0, eligible)
    opts = masking if isinstance(masking, Masking) else Masking(masking)
    masks = draw_masks(eligible, t, opts, generator) if masks is None else masks
    p = mask_rate(t)
    k = len(masks)
    mask = torch.cat(masks)
    x0k, eligible_k, pk = x0.repeat(k, 1), eligible.repeat(k, 1), p.repeat(k)
    qk = None if opts.isad is None else _rates(opts, p).repeat(k, 1)
    x_t = torch.where(mask, config.mask_id, x0k)
    logits = model(x_t)
    if opts.syntax is None:
        loss = mdm_loss(logits, x0k, mask, eligible_k, pk, qk)
    else:
        syntax_k = (opts.syntax.to(x0.device) & ~eligible).repeat(k, 1)
        loss = syrm_loss(logits, x0k, mask, eligible_k, syntax_k, pk, opts.syrm_alpha, qk)
    return loss.view(k, -1).mean(0)


class LossControlVariate:
    """EMA: a bin-wise control variate on the REPORTED loss value (the paper's EMA method; targets B).

    A step's value is y = mean_i w_i l_i over rows i with rate t_i, t-weight w_i and loss l_i. Split t
    into m equal bins, j(t) = min(floor(m t), m - 1). The baseline b_j is an EMA (rate eta, debiased like
    Adam's moments) of the unweighted l of the rows that fell in bin j: it tracks g_j = E[l | t in bin j],
    the t-dependent part of l. Row i's control is the zero-mean
        b~_i = w_i b_{j(t_i)} - (1/m) sum_j b_j,
    and the step reports
        y_adj = y - c mean_i b~_i,   c = Cov(w l, b~) / Var(b~)
    with Cov and Var from EMA moments (rate eta) of the row values. Subtracting the baseline's exact mean
    (1/m) sum_j b_j = int_0^1 b_{j(t)} dt rather than an EMA of it makes b~ zero-mean for every unbiased
    t-sampler (uniform, stratified, P-POTS): E[w f(t)] = int_0^1 f(t) dt for any f. b and c come from the
    state BEFORE the batch (which only updates it afterwards), so given the past E[y_adj] = E[y] exactly:
    unbiased for the loss value. Not exactly under the biased samplers (clipped; P-POTS with max_weight),
    where y_adj is off by c (E[w b(t)] - int b).

    c is one coefficient, not one per bin: the baseline is constant inside a bin, so a per-bin Cov/Var has
    no within-bin variation to estimate, and a bin-dependent c would break E[b~] = 0, which holds only on
    average over the bins.

    THE GRADIENT IS UNCHANGED. b and c carry no gradient, so d y_adj / d theta = d y / d theta exactly
    (tested bit for bit): this lowers the variance of the loss value that is logged, not of the update
    the optimiser takes, and cannot change training. The paper does not say so.
    State: plain python values and float64 tensors, replaced (never changed in place) at every step, so
    a state_dict is a snapshot and a weights_only checkpoint can hold it.
    """
    keys = ("bins", "eta", "baseline", "updates", "moments", "steps")

    def __init__(self, bins=10, eta=0.01):
        if not isinstance(bins, int) or bins < 1:
            fail(f"the EMA control variate needs ema_bins >= 1 (0 = off), got {bins}")
        if not 0 < eta <= 1:
            fail(f"ema_eta must be in (0, 1], got {eta}")
        self.bins, self.eta, self.steps = bins, eta, 0
        self.baseline = torch.zeros(bins, dtype=torch.float64)  # EMA of l per bin, not yet debiased
        self.updates = torch.zeros(bins, dtype=torch.float64)  # how many steps updated each bin
        self.moments = torch.zeros(4, dtype=torch.float64)  # EMA of the row means of y, b~, y b~, b~^2

    def state_dict(self):
        return {k: getattr(self, k) for k in self.keys}

    def load_state_dict(self, sd):
        for k in self.keys:
            setattr(self, k, sd[k])

    def baselines(self):
        """b_j, float64[m]: the debiased EMA of l in bin j (0 for a bin not seen yet)."""
        seen = self.updates > 0
        return torch.where(seen, self.baseline / (1 - (1 - self.eta) ** self.updates).clamp(min=1e-300), 0.0)

    def coefficient(self):
        """c = Cov(y, b~) / Var(b~) from the debiased EMA moments; 0 while Var(b~) is (numerically) 0."""
        if self.steps == 0:
            return 0.0
        my, mh, myh, mhh = (self.moments / (1 - (1 - self.eta) ** self.steps)).tolist()
        var = mhh - mh * mh
        return (myh - my * mh) / var if var > 1e-9 * mhh else 0.0

    def correction(self, t, w, losses):
        """c mean_i b~_i for this batch, a python float computed from the state before the batch; then
        the batch updates the state. The caller reports (w * losses).mean() - correction."""
        t, w, l = (z.detach().double().cpu() for z in (t, w, losses))
        j = (t * self.bins).long().clamp(0, self.bins - 1)
        b = self.baselines()
        y, h = w * l, w * b[j] - b.mean()
        out = self.coefficient() * h.mean().item()
        keep = 1 - self.eta
        batch_moments = torch.stack([y.mean(), h.mean(), (y * h).mean(), (h * h).mean()])
        self.moments = keep * self.moments + self.eta * batch_moments
        self.steps += 1
        count = torch.bincount(j, minlength=self.bins).double()
        mean_l = torch.zeros(self.bins, dtype=torch.float64).index_add(0, j, l) / count.clamp(min=1)
        seen = count > 0
        self.baseline = torch.where(seen, keep * self.baseline + self.eta * mean_l, self.baseline)
        self.updates = self.updates + seen
        return out
