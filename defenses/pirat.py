"""PIR-AT (`train.method: pirat`, sea.md §4): adversarial training on 100 % adversarial batches.

Every training batch is replaced by its adversarial version: PGD on the pixel-averaged cross-entropy of
the main output, eps 4/255, step 0.01 (2.55/255), 5 steps, starting at the clean image (no random
start), crafted in eval mode; the loss is CE(main) + aux_weight * CE(aux) on that batch only, with no
clean term. The "R" of PIR-AT (a robust ImageNet backbone to start from, `model.pretrained` in
initmodel/) and the optimiser recipe (AdamW with weight decay on conv / linear weights only, linear
warmup then poly, per iteration, for UperNet; SGD with 10x heads for PSPNet) are config settings:
see the `*_pirat.yaml` experiments and `config/_base_/schedules/`. UperNet's decode and aux heads
start from N(0, 0.02) with zero biases (models/upernet.py), as in the PIR-AT code.

Fixed defect of the original (sea.md §9.1 item 8): there, `optimizer.zero_grad()` runs before the
attack and the attack calls `loss.backward()` on the model, so the parameter gradients of every attack
step (taken in eval mode at the clean input and at the intermediate iterates) are added to the
training gradient. Here the attack goes through `Defense.adversarial` (frozen parameters, gradients
w.r.t. the input only): the update is the gradient of the adversarial batch's loss alone.

Logs: `loss_adv`, `acc_adv` (main output on the adversarial batch, the training forward) and
`loss_aux`; `loss_clean`, `acc_clean` (main output on the clean batch in eval mode). The clean values
come for free from the attack's first forward when the attack starts at the clean image (PGD without
random start, as here); an attack with a random start costs one more forward without gradients. (Early in
a run from scratch, while the BatchNorm running statistics are still fresh, the eval-mode clean values
can trail the training-mode adversarial ones.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attacks import attack_mode
from utils import dist
from utils.errors import SetupError

from .base import Defense, pixel_accuracy
from .registry import register_defense


@register_defense("pirat")
class PIRATTraining(Defense):
    # sea.md §4.1: Pgd_Attack with EPS 4, alpha 1e-2 (= 2.55/255), N_ITERS 5, delta starting at 0, CE
    default_attack = {"name": "pgd", "eps": 4.0, "alpha": 2.55, "steps": 5, "random_start": False}

    def prepare(self, model) -> None:
        name = self.cfg.model.name
        if getattr(model, "multitask", False):
            raise SetupError(f"train.method pirat trains one segmentation output; model '{name}' is multitask "
                             f"(outputs {list(getattr(model, 'tasks', []))})")
        if hasattr(model, "mask1"):
            raise SetupError(f"train.method pirat trains the main and aux heads; model '{name}' has DDC-AT's "
                             f"routed heads (use its plain variant, pspnet or deeplabv3)")

    def loss(self, model, batch):
        x, y = batch["image"], batch["label"]
        at_x = {}

        def clean_forward(net, inp):  # the attack's forward of x: its output gives the clean statistics
            out = net(inp)
            at_x["logits"] = out.detach()
            return out
        x_adv = self.adversarial(model, x, y, batch["index"], clean_forward=clean_forward)
        clean = at_x.get("logits")
        if clean is None:  # the attack started elsewhere (random start): one forward without gradients
            net = dist.unwrap(model)
            with torch.no_grad(), attack_mode(net):
                clean = net(x)
        outputs = model(x_adv)
        loss, logs = self.seg_loss(outputs, y)
        logs["loss_adv"] = logs.pop("loss_main")
        logs["acc_adv"] = pixel_accuracy(outputs["out"], y, self.ignore)
        logs["loss_clean"] = F.cross_entropy(clean.float(), y, ignore_index=self.ignore).detach()
        logs["acc_clean"] = pixel_accuracy(clean, y, self.ignore)
        return loss, logs

    def describe(self) -> str:
        return (f"pirat (100% adversarial batches, no clean loss term; parameters frozen during the attack), "
                f"training attack {self.attack}")
