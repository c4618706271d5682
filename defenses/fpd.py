"""FPD training (Li et al., CVPR 2020) for FPD-Seg (`train.method: fpd`; mtl_fpd.md §B2, §B3, §B5).

Two-phase training (``train.fpd.adversarial: false``), per batch:

    x_n = x + U(-e, e)                              epsilon-neighbourhood sample (per pixel, not clipped)
    x_hat, seg = model(x_n)                         l2 = MSE(x_hat, x) against the clean image
    if gate and l2 > T:                             restoration warm-up, phase "restore":
        step(l2_weight * l2)                          everything but the classifier learns
    else:                                           phase "joint", all parameters:
        step(ce_weight * CE(seg, y) + l2_weight * l2)
        x_hat2, seg2 = model(x_hat.detach())        cycle step on the restored image, with the weights
        step(CE(seg2, y) + cycle_l2_weight * MSE(x_hat2, x))   the joint step has just updated

Each phase has its own optimiser (as the original's two Adam instances; `param_phases`), gradients are
clipped by ``train.clip_grad_norm`` (5 in the recipes). The gate compares the batch's MSE (averaged over
processes, so all take the same branch) with T at every iteration: training may go back to the warm-up.

Adversarial fine-tuning (``train.fpd.adversarial: true``, from a trained model via ``model.weights``;
§B3): PGD (default 40 steps of 2/255 at 8/255, random start; ``train.attack``) labelled by the model's
own eval-mode predictions (ignore pixels kept ignored), then, with clean and adversarial images in
one forward,

    step((ce_weight * CE(seg(x), y) + l2_weight * MSE(x_hat(x), x)
          + ce_weight * CE(seg(x_adv), y) + l2_weight * MSE(x_hat(x_adv), x_adv)) / 2)
    cycle step on x_hat(x_adv).detach(): CE + cycle_l2_weight * MSE(., x)   (against the clean x)

Defects of the released code fixed here:
- its phase-1 optimiser receives a `filter` iterator that the other optimiser has already consumed, so
  the warm-up trains only the three transposed convolutions; the paper updates the restoration module
  and the front denoising module (the shared backbone), i.e. everything but the classifier. The
  released behaviour is ``train.fpd.phase1_params: restoration_only``.
- its cycle step backpropagates through the first pass's graph (x_hat not detached) after
  ``optimizer.step()`` changed those weights in place (an error on PyTorch >= 1.5, mixed old and new
  weights on 1.1); here x_hat is detached, a new input as in the paper's figure.
Not reproduced: ReduceLROnPlateau and early stopping on the test split (the lr follows
``train.scheduler``; configs use power 0, a constant lr).

Losses and noise live in the [0,1] pixel space of the input (the model returns x_hat there).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from attacks import attack_mode, image_seeds
from utils import dist
from utils.errors import SetupError
from utils.metrics import class_map

from .base import Defense, pixel_accuracy
from .registry import register_defense


@register_defense("fpd")
class FPDTraining(Defense):
    default_attack = {"name": "pgd", "eps": 8.0, "alpha": 2.0, "steps": 40, "random_start": True}

    def __init__(self, cfg):
        settings = cfg.train.fpd
        self.adversarial_finetuning = bool(settings.adversarial)
        if not self.adversarial_finetuning:
            if cfg.train.attack:
                raise SetupError("train.attack is set but train.fpd.adversarial is false: two-phase FPD training "
                                 "uses no attack (set train.fpd.adversarial=true for adversarial fine-tuning)")
            self.default_attack = None
        super().__init__(cfg)
        self.noise_eps = settings.noise_eps / 255.0
        self.gate, self.threshold = bool(settings.gate), float(settings.threshold)
        self.ce_weight, self.l2_weight = settings.ce_weight, settings.l2_weight
        self.cycle_l2_weight = settings.cycle_l2_weight
        self.phase1_params = settings.phase1_params

    def prepare(self, model) -> None:
        if not callable(getattr(model, "phase1_parameters", None)):
            raise SetupError(f"train.method fpd trains an FPD model (model.name fpd_seg: restoration output and "
                             f"classifier); model.name '{self.cfg.model.name}' is not one")

    def param_phases(self, model):
        """Two-phase training: "restore" (the gated warm-up) and "joint" (everything); the adversarial
        fine-tuning has one optimiser."""
        if self.adversarial_finetuning:
            return None
        names: List[str] = [n for n, _ in model.named_parameters()]
        if self.phase1_params == "restoration_only":  # the released code's defect (module docstring)
            restore = [n for n in names if n.startswith("restore.")]
        else:
            ids = {id(p) for p in model.phase1_parameters()}
            restore = [n for n, p in model.named_parameters() if id(p) in ids]
        return {"restore": restore, "joint": names}

    def describe(self) -> str:
        if self.adversarial_finetuning:
            return (f"fpd adversarial fine-tuning, training attack {self.attack} on the model's own predictions, "
                    f"adversarial share 0.5, cycle MSE weight {self.cycle_l2_weight:g}")
        gate = f"gate MSE > {self.threshold:g} (phase-1 parameters: {self.phase1_params})" if self.gate else "no gate"
        return (f"fpd two-phase, noise U(+-{self.noise_eps * 255:g}/255), {gate}, weights ce {self.ce_weight:g} "
                f"l2 {self.l2_weight:g} cycle l2 {self.cycle_l2_weight:g}")

    # ------------------------------------------------------------------ terms
    def _terms(self, out: Dict[str, torch.Tensor], y: torch.Tensor, target: torch.Tensor):
        """(CE(seg, y), MSE(x_hat, target)); the MSE in fp32."""
        ce = F.cross_entropy(out["out"], y, ignore_index=self.ignore)
        l2 = F.mse_loss(out["restored"].float(), target.float())
        return ce, l2

    def noisy(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x + U(-e, e), drawn per image from (seed, epoch, image index): the same for any batch split or resume."""
        if self.noise_eps == 0:
            return x
        keys = [(self.epoch, int(i)) for i in index.tolist()]
        return x + image_seeds(self.cfg.seed, "fpd-noise", keys).uniform(x, self.noise_eps)

    def gated(self, l2: torch.Tensor) -> bool:
        """True while the batch's restoration MSE (mean over processes) is above T."""
        if not self.gate:
            return False
        mean = dist.all_reduce_sum(l2.detach().float().reshape(1)) / dist.world_size()
        return bool(mean.item() > self.threshold)

    def steps(self, model, batch):
        if self.adversarial_finetuning:
            yield from self._adversarial_steps(model, batch)
        else:
            yield from self._two_phase_steps(model, batch)

    def _cycle_step(self, model, x_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """The restored image, detached (a new input), through the model again: CE + beta * MSE to the clean x."""
        out = model(x_hat.detach())
        ce, l2 = self._terms(out, y, x)
        loss = ce + self.cycle_l2_weight * l2
        return loss, {"loss_cycle": loss.detach(), "loss_cycle_ce": ce.detach(), "loss_cycle_l2": l2.detach(),
                      "acc_cycle": pixel_accuracy(out["out"], y, self.ignore)}

    def _two_phase_steps(self, model, batch):
        x, y = batch["image"], batch["label"]
        out = model(self.noisy(x, batch["index"]))
        ce, l2 = self._terms(out, y, x)
        logs = {"loss_ce": ce.detach(), "loss_l2": l2.detach(), "acc_clean": pixel_accuracy(out["out"], y, self.ignore)}
        if self.gated(l2):
            # 0 * the logits: every output stays in the graph, so DDP gets a (zero) gradient for the
            # classifier and the second pass instead of waiting for one; the "restore" optimiser
            # does not hold the classifier, so it does not move
            loss = self.l2_weight * l2 + 0.0 * out["out"].float().sum()
            yield loss, dict(logs, loss_clean=loss.detach(), joint=torch.zeros((), device=x.device)), "restore"
            return
        loss = self.ce_weight * ce + self.l2_weight * l2
        yield loss, dict(logs, loss_clean=loss.detach(), joint=torch.ones((), device=x.device)), "joint"
        yield (*self._cycle_step(model, out["restored"], x, y), "joint")

    def predicted_labels(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's own eval-mode prediction (no label leaking, §B3), ignore pixels of y kept ignored."""
        net = dist.unwrap(model)
        with torch.no_grad(), attack_mode(net):
            pred = class_map(net(x))
        return pred.masked_fill(y == self.ignore, self.ignore)

    def _adversarial_steps(self, model, batch):
        x, y = batch["image"], batch["label"]
        x_adv = self.adversarial(model, x, self.predicted_labels(model, x, y), batch["index"])
        # one forward over [x; x_adv] (BatchNorm statistics over both; two forwards before one backward
        # are not possible under DDP)
        out = model(torch.cat([x, x_adv]))
        n = x.shape[0]
        out_c, out_a = ({k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()})
        ce_c, l2_c = self._terms(out_c, y, x)
        ce_a, l2_a = self._terms(out_a, y, x_adv)  # the adversarial branch restores its own input (§B3)
        loss_c = self.ce_weight * ce_c + self.l2_weight * l2_c
        loss_a = self.ce_weight * ce_a + self.l2_weight * l2_a
        loss = (loss_c + loss_a) / 2
        yield loss, {"loss_clean": loss_c.detach(), "loss_adv": loss_a.detach(), "loss_ce_clean": ce_c.detach(),
                     "loss_l2_clean": l2_c.detach(), "loss_ce_adv": ce_a.detach(), "loss_l2_adv": l2_a.detach(),
                     "acc_clean": pixel_accuracy(out_c["out"], y, self.ignore),
                     "acc_adv": pixel_accuracy(out_a["out"], y, self.ignore)}, None
        yield (*self._cycle_step(model, out_a["restored"], x, y), None)
