"""Clean training (`train.method: none`)."""
from .base import Defense
from .registry import register_defense


@register_defense("none")
class CleanTraining(Defense):
    def loss(self, model, batch):
        return self.task_loss(model(batch["image"]), batch)
