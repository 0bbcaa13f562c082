"""The captioner's task: the generic one, plus a cheap caption-quality number in validation.

On the first validation batch, when the samples' JSON carries the shapes world's colour/shape/position, the
captioner greedily decodes up to ``caption_eval_images`` captions per style (at most ``caption_eval_tokens``
tokens: the shapes captions name their attributes in the first sentence) and logs the fraction that names all
three (``val/<style>_all``, see ``t2i_train.metrics.caption_accuracy``). Not during Lightning's sanity check
(an untrained LM decodes every token up to the limit). Other data: loss and token accuracy only.
"""

from __future__ import annotations

from typing import Any

from t2i_train.task import T2ITask


class CaptionerTask(T2ITask):
    def __init__(
        self, *args: Any, caption_eval_images: int = 32, caption_eval_tokens: int = 128, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.caption_eval_images = int(caption_eval_images)
        self.caption_eval_tokens = int(caption_eval_tokens)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and self.caption_eval_images > 0 and not self.trainer.sanity_checking:
            self.log_caption_accuracy(batch)

    def log_caption_accuracy(self, batch: dict[str, Any]) -> None:
        from t2i_train.metrics.caption_accuracy import caption_accuracy, has_attributes

        metas = list(batch.get("meta") or [])[: self.caption_eval_images]
        if not metas or not all(has_attributes(m) for m in metas):
            return
        images = batch["image"][: len(metas)]
        for style in self.model.style_probs:
            captions = self.model.caption(
                images, style=style, method="greedy", max_new_tokens=self.caption_eval_tokens
            )
            score = caption_accuracy(captions, metas)["all"]
            self.log(
                f"val/{style}_all", score, on_step=False, on_epoch=True, batch_size=len(metas), sync_dist=True
            )
