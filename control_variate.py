"""The paper's EMA method: a bin-wise control variate on the REPORTED loss value (train.py's
cv_bins, cv_eta). Supplementary: it never changes training, because the correction carries no
gradient (see LossControlVariate). Not to be confused with weight EMA (model.weight_ema), which
averages the weights that are evaluated."""
import torch


class LossControlVariate:
    """EMA: a bin-wise control variate on the REPORTED loss value (the paper's EMA method;
    targets B).

    A step's value is y = mean_i w_i l_i over rows i with rate t_i, t-weight w_i and loss l_i. Split
    t into m equal bins, j(t) = min(floor(m t), m - 1). The baseline b_j is an EMA (rate eta,
    debiased like Adam's moments) of the unweighted l of the rows that fell in bin j: it tracks
    g_j = E[l | t in bin j], the t-dependent part of l. Row i's control is the zero-mean
        b~_i = w_i b_{j(t_i)} - (1/m) sum_j b_j,
    and the step reports
        y_adj = y - c mean_i b~_i,   c = Cov(w l, b~) / Var(b~)
    with Cov and Var from EMA moments (rate eta) of the row values. Subtracting the baseline's exact
    mean (1/m) sum_j b_j = int_0^1 b_{j(t)} dt rather than an EMA of it makes b~ zero-mean for every
    unbiased t-sampler (uniform, stratified, P-POTS): E[w f(t)] = int_0^1 f(t) dt for any f. b and c
    come from the state BEFORE the batch (which only updates it afterwards), so given the past
    E[y_adj] = E[y] exactly: unbiased for the loss value. Not exactly under the biased samplers
    (clipped; P-POTS with max_weight), where y_adj is off by c (E[w b(t)] - int b).

    c is one coefficient, not one per bin: the baseline is constant inside a bin, so a per-bin
    Cov/Var has no within-bin variation to estimate, and a bin-dependent c would break E[b~] = 0,
    which holds only on average over the bins.

    THE GRADIENT IS UNCHANGED. b and c carry no gradient, so d y_adj / d theta = d y / d theta
    exactly (tested bit for bit): this lowers the variance of the loss value that is logged, not of
    the update the optimiser takes, and cannot change training. The paper does not say so.
    State: float64 tensors on the loss's device and a python step count, replaced (never changed in
    place) at every step, so a state_dict is a snapshot and a weights_only checkpoint can hold it.
    Nothing reads the device: the correction is a tensor, for train.py to read when it logs.
    """
    keys = ("bins", "eta", "baseline", "updates", "moments", "steps")

    def __init__(self, bins=10, eta=0.01):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"the loss control variate needs cv_bins >= 1 (0 = off), got {bins}")
        if not 0 < eta <= 1:
            raise ValueError(f"cv_eta must be in (0, 1], got {eta}")
        self.bins, self.eta, self.steps = bins, eta, 0
        self.baseline = torch.zeros(bins, dtype=torch.float64)  # EMA of l per bin, not yet debiased
        self.updates = torch.zeros(bins, dtype=torch.float64)  # how many steps updated each bin
        # EMA of the row means of y, b~, y b~, b~^2
        self.moments = torch.zeros(4, dtype=torch.float64)

    def state_dict(self):
        return {k: getattr(self, k) for k in self.keys}

    def load_state_dict(self, sd):
        for k in self.keys:
            setattr(self, k, sd[k])

    def baselines(self):
        """b_j, float64[m]: the debiased EMA of l in bin j (0 for a bin not seen yet)."""
        seen = self.updates > 0
        return torch.where(seen,
                           self.baseline / (1 - (1 - self.eta) ** self.updates).clamp(min=1e-300),
                           0.0)

    def coefficient(self):
        """c = Cov(y, b~) / Var(b~) from the debiased EMA moments, a 0-d tensor; 0 while Var(b~)
        is (numerically) 0."""
        if self.steps == 0:
            return torch.zeros((), dtype=torch.float64, device=self.moments.device)
        my, mh, myh, mhh = self.moments / (1 - (1 - self.eta) ** self.steps)
        var = mhh - mh * mh
        return torch.where(var > 1e-9 * mhh, (myh - my * mh) / var, 0.0)

    def correction(self, t, w, losses):
        """c mean_i b~_i for this batch, a 0-d float64 tensor on the losses' device computed from
        the state before the batch; then the batch updates the state. The caller reports
        (w * losses).mean() - correction."""
        device = losses.device
        for k in ("baseline", "updates", "moments"):
            setattr(self, k, getattr(self, k).to(device))
        t, w, loss = (z.detach().to(device, torch.float64) for z in (t, w, losses))
        j = (t * self.bins).long().clamp(0, self.bins - 1)
        b = self.baselines()
        y, h = w * loss, w * b[j] - b.mean()
        out = self.coefficient() * h.mean()
        keep = 1 - self.eta
        batch_moments = torch.stack([y.mean(), h.mean(), (y * h).mean(), (h * h).mean()])
        self.moments = keep * self.moments + self.eta * batch_moments
        self.steps += 1
        count = torch.bincount(j, minlength=self.bins).double()
        mean_l = torch.zeros(self.bins, dtype=torch.float64,
                             device=device).index_add(0, j, loss) / count.clamp(min=1)
        seen = count > 0
        self.baseline = torch.where(seen, keep * self.baseline + self.eta * mean_l, self.baseline)
        self.updates = self.updates + seen
        return out
