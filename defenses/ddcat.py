"""DDC-AT, dynamic divide-and-conquer adversarial training (`train.method: ddcat`, ddcat.md §3, §10).

Needs a DDC-AT model (`pspnet_ddcat`, `deeplabv3_ddcat`): main branch f_n (`cls1`, the deployed
head), auxiliary branch f_a (`cls2`), mask branch f_m (`mask1`, 2-way) and the layer3 aux head.
One iteration, on a global batch of B images with the first n = floor(B * (1 - adv_fraction)) kept
clean (B//2 at the published 0.5; which images those are does not depend on the number of processes,
see `defenses.sat.process_clean_count`, and a process may hold only clean or only adversarial ones):

1. BIM on the main branch f_n for the whole batch (eps 0.03, 3 steps of 0.01, no random start,
   eval mode): the last B - n images are trained on adversarially, and the first n need it for
   their division labels.
2. Division labels of the clean part, eval mode, no gradients: M = 1[argmax o(x_adv) != argmax
   o(x)] with o the routed output (f_a where argmax f_m == 1, else f_n) -- pixels whose routed
   prediction flips go to f_a. The adversarial part gets mask label 0 (f_n) everywhere.
3. One train-mode forward of [x[:n]; x_adv[n:]] (dropout on, the routing too): hard routing by
   the mask head's own prediction, o = where(argmax o_m == 1, o_a, o_n), and
   L = CE(o, y) + CE(o_m, M) + aux_weight * CE(aux, y). The argmax is not differentiable, so f_m
   learns from its own CE only, and f_n / f_a only on the pixels routed to them.

The mask CE counts every pixel, ignore-labelled ones included, as published (ddcat.md §9 item 22);
``train.ddcat.mask_ignore: true`` leaves the pixels labelled ``data.ignore_label`` out of it.
The deployed model is f_n alone: the DDC-AT model's eval-mode output is o_n, and its checkpoint
loads into the plain PSPNet / DeepLabv3 with f_a and f_m dropped (``ddcat_main_head`` format).

Fixed from the published scripts (each changes cost only, not results):
- the routed forwards only need an argmax: two no-grad eval forwards of the clean part (x and
  x_adv) replace the original's grad-enabled forward of the whole batch at every attack step plus
  one on the final adversarial batch (ddcat.md §9 item 14); the clean part's division labels were
  the only ones used, so the adversarial part's are not computed; and when the attack starts at the
  clean image (no random start, as published) the routed prediction of x comes from the attack's
  first forward (`main_and_routed`: f_a and f_m on the same backbone features, without gradients);
- the attack runs on the unwrapped model with input gradients only (`Defense.adversarial`), not
  through DDP with every other loss added times 0 and parameter gradients zeroed (§9 item 15);
- the logs keep the routed CE, the mask CE and the aux CE apart (the original's "MainLoss" summed
  the first two) and report the clean and adversarial parts' loss and accuracy of the training
  forward (§9 item 17).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attacks import attack_mode
from models import route
from utils import dist
from utils.errors import SetupError
from utils.metrics import class_map

from .base import Defense, ce_and_logp
from .registry import register_defense
from .sat import DDCAT_BIM, describe_split, part_logs, process_clean_count, refuse_multitask

DDCAT_HEADS = ("cls1", "cls2", "mask1")


@register_defense("ddcat")
class DDCATTraining(Defense):
    default_attack = DDCAT_BIM

    def __init__(self, cfg):
        super().__init__(cfg)
        settings = cfg.train.ddcat
        self.adv_fraction = float(settings.adv_fraction)
        self.mask_ignore = bool(settings.mask_ignore)

    def prepare(self, model: nn.Module) -> None:
        refuse_multitask(model, "ddcat")
        if not all(hasattr(model, h) for h in DDCAT_HEADS):
            raise SetupError(f"train.method 'ddcat' needs a DDC-AT model with main, auxiliary and mask heads; "
                             f"model.name '{self.cfg.model.name}' has none (use pspnet_ddcat or deeplabv3_ddcat)")

    def describe(self) -> str:
        mask = (f"the pixels not labelled {self.ignore}" if self.mask_ignore
                else "every pixel, ignore-labelled ones included")
        return (describe_split("ddcat", self.attack, self.adv_fraction, self.cfg.train.batch_size)
                + f"; mask CE over {mask}")

    @torch.no_grad()
    def division_labels(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                        p_clean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """M [B,H,W] (long): 1 where the eval-mode routed prediction of x_adv differs from that of x
        (`p_clean`: that of x when already known)."""
        net = dist.unwrap(model)
        with attack_mode(net):
            if p_clean is None:
                p_clean = class_map(route(net.outputs(x)))
            p_adv = class_map(route(net.outputs(x_adv)))
        return (p_adv != p_clean).long()

    def training_batch(self, model: nn.Module, batch: dict) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(images [x[:n]; x_adv[n:]], mask labels [M; 0], n clean images)."""
        x, y = batch["image"], batch["label"]
        n_clean = process_clean_count(x.shape[0], self.adv_fraction)
        routed: dict = {}

        def clean_forward(net, inp):  # the attack's forward of x also routes its clean part
            out, routed["p_clean"] = net.main_and_routed(inp, n_clean)
            return out
        # the whole batch: see the module docstring
        x_adv = self.adversarial(model, x, y, batch["index"], clean_forward=clean_forward if n_clean else None)
        m = torch.zeros_like(y)
        if n_clean:
            m[:n_clean] = self.division_labels(model, x[:n_clean], x_adv[:n_clean], routed.get("p_clean"))
        return torch.cat([x[:n_clean], x_adv[n_clean:]]), m, n_clean

    def loss(self, model, batch):
        x, m, n_clean = self.training_batch(model, batch)
        return self.batch_loss(model, x, m, batch["label"], n_clean)

    def batch_loss(self, model: nn.Module, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor, n_clean: int):
        """(loss, logs) of the train-mode forward of x with mask labels m, the first n_clean images clean."""
        outputs = model(x)  # train mode: {"out": o_n, "adv": o_a, "mask": o_m, "aux"}
        o = route(outputs)
        routed, logp = ce_and_logp(o, y, self.ignore)
        if self.mask_ignore:
            mask = F.cross_entropy(outputs["mask"], m.masked_fill(y == self.ignore, self.ignore),
                                   ignore_index=self.ignore)
        else:  # published: a plain CrossEntropyLoss() over all B*H*W pixels
            mask = F.cross_entropy(outputs["mask"], m)
        aux = F.cross_entropy(outputs["aux"], y, ignore_index=self.ignore)
        loss = routed + mask + self.aux_weight * aux
        with torch.no_grad():
            logs = {"loss_routed": routed.detach(), "loss_mask": mask.detach(), "loss_aux": aux.detach(),
                    "routed_to_fa": (class_map(outputs["mask"]) == 1).float().mean()}
            if n_clean:
                logs["flip_share"] = m[:n_clean].float().mean()  # clean pixels labelled for f_a
            logs.update(part_logs(o, y, n_clean, self.ignore, logp))
        return loss, logs
