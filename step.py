"""One training step, as train.py runs it and lab/bench.py times it, with no host sync.

    loss = mean_rows(w * l),  l = masking.row_losses (two views: the mean of both, per x0 row)
    -> backward -> clip the gradient norm -> AdamW (fused)

A GPU runs ahead of the Python that launches its kernels until something reads a value back.
Nothing in a step does: the batch arrives by non-blocking copies from pinned memory (stage), the
learning rate is a device tensor changed in place, and the loss, the gradient norm and whether the
step was clipped stay device tensors that train.py reads at its log intervals.

The non-finite guard lives on the device too. A step whose loss or gradient norm is not finite sets
found_inf, which the fused AdamW reads to skip its update (parameters and moments untouched), so
the weights in memory stay finite; the first such step's iteration, loss and norm are kept, and
`health()` reads them, once, at a log interval or before an evaluation or a checkpoint. (fp16's
GradScaler skips steps with inf gradients itself; there only a non-finite loss is flagged.)
"""
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from masking import row_losses


def stage(tensors, device):
    """CPU tensors on `device`: a CUDA copy from pinned memory with non_blocking=True, which the
    host does not wait for; elsewhere the tensors themselves (CPU) or a plain copy (MPS)."""
    if torch.device(device).type != "cuda":
        return tuple(z.to(device) for z in tensors)
    return tuple(z.pin_memory().to(device, non_blocking=True) for z in tensors)


class Step:
    """The optimiser step of one global batch. Built once per run: `model` (the Transformer),
    `train_model` (the model the loss calls: model itself, or its DDP wrapper), `optimizer` (fused
    AdamW, model.configure_optimizers), `spec` (masking.MaskSpec), grad_clip (0 = no clipping; the
    norm is computed either way), `scaler` (a GradScaler, enabled for fp16 only), `micro_batches`
    (gradient accumulation), rank / world_size (DDP: this process's share of the rows),
    `micro_context(k)` (a context for micro-batch k of the global batch, e.g. its dropout RNG),
    compile (True or a torch.compile mode: compile the whole loss function, model, masking and
    mdm_loss, not only the model; the optimiser step stays eager, so the learning rate, a device
    tensor, neither recompiles nor freezes), start_iter
    (the iteration of the first call, for the guard's record), autocast (the forward's dtype
    context, model.device_and_dtype).

    step(x0, eligible, t, w, masks, lr) -> (losses [global rows], loss, grad_norm, clipped), all
    device tensors: l per row of the global batch (every rank sees them all), mean w l, the
    gradient norm before clipping, and a bool tensor."""

    def __init__(self, model, train_model, optimizer, spec, grad_clip, scaler=None,
                 micro_batches=1, rank=0, world_size=1, micro_context=None, compile=False,
                 start_iter=0, autocast=None):
        self.model, self.train_model, self.optimizer, self.spec = model, train_model, optimizer, spec
        self.grad_clip, self.micro_batches, self.rank, self.world_size = \
            grad_clip, micro_batches, rank, world_size
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.micro_context = micro_context or (lambda k: nullcontext())
        self.autocast = autocast or nullcontext()
        self.loss_fn = torch.compile(row_losses, mode=compile if isinstance(compile, str) else None) \
            if compile else row_losses
        device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr = torch.zeros((), device=device)  # set by every call
        for group in optimizer.param_groups:  # AdamW reads it where its kernels run
            group["lr"] = self.lr
        self.found_inf = torch.zeros((), device=device)  # 1.0: the fused AdamW skips this update
        self.it = torch.tensor(float(start_iter), device=device)
        self.first_bad = torch.full((3,), math.nan, device=device)  # iteration, loss, grad norm

    def __call__(self, x0, eligible, t, w, masks, lr):
        self.lr.fill_(lr)
        rows = len(x0) // (self.world_size * self.micro_batches)
        parts, loss = [], 0.0
        for micro in range(self.micro_batches):
            k = self.rank * self.micro_batches + micro  # its index in the global batch
            mb = slice(k * rows, (k + 1) * rows)
            last = micro == self.micro_batches - 1
            ddp = self.world_size > 1 and not last  # all-reduce the gradients once, at the end
            with self.train_model.no_sync() if ddp else nullcontext():
                with self.autocast, self.micro_context(k):
                    part = self.loss_fn(self.train_model, x0[mb], eligible[mb], t[mb], self.spec,
                                        masks=None if masks is None else tuple(m[mb] for m in masks))
                micro_loss = (w[mb] * part).mean() / self.micro_batches
                (micro_loss if self.scaler is None else self.scaler.scale(micro_loss)).backward()
            parts.append(part.detach())
            loss = loss + micro_loss.detach()
        losses = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.world_size > 1:  # every rank's rows, in row order; the loss of the whole batch
            shares = [torch.empty_like(losses) for _ in range(self.world_size)]
            dist.all_gather(shares, losses)
            losses = torch.cat(shares)
            loss = (w * losses).mean()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                     if self.grad_clip else torch.nn.utils.get_total_norm(
                         [p.grad for p in self.params if p.grad is not None]))
        self._guard(loss, grad_norm)
        if self.scaler is None:
            self.optimizer.found_inf = self.found_inf
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.it += 1
        return losses, loss, grad_norm, grad_norm > (self.grad_clip or math.inf)

    def _guard(self, loss, grad_norm):
        """found_inf = the step is not finite; the first such step is recorded (device ops only)."""
        finite = torch.isfinite(loss) if self.scaler else torch.isfinite(loss + grad_norm)
        self.found_inf.copy_(~finite)
        new = ~finite & torch.isnan(self.first_bad[0])
        record = torch.stack([self.it, loss.float(), grad_norm.float()])
        self.first_bad.copy_(torch.where(new, record, self.first_bad))

    def health(self):
        """None while every step so far was finite, else (iteration, loss, grad norm) of the first
        that was not (its update was skipped). Reads the device: call it at a log interval."""
        it, loss, norm = self.first_bad.tolist()
        return None if math.isnan(it) else (int(it), loss, norm)
