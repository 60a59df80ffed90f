"""The sentiment reward: the raw POSITIVE logit of a text classifier.

The recipe (TRL's gpt2-sentiment notebook) rewards a rollout with the POSITIVE logit,
no softmax, of `lvwerra/distilbert-imdb` on `query text + response text`. The notebook
took that logit by list position, which broke when the pipeline sorted labels by score;
here the index is looked up by label NAME in the model's config once at start-up.

The caller decodes the texts (with special tokens skipped); this module only scores
strings. It imports torch and transformers, never ray, learner/ or actors/.
"""
from __future__ import annotations

import logging

import torch
from transformers import AutoModelForSequenceClassification

from modelhost.loading import load_model_and_tokenizer
from modelhost.process import resolve_device
from rewards.settings import RewardSettings

logger = logging.getLogger(__name__)

__all__ = ["RewardSettings", "SentimentScorer", "find_label_index"]


def find_label_index(id2label: dict[int, str], label: str) -> int:
    """The logit index of `label`, by name; a ValueError listing the labels if absent."""
    by_name = {name: int(index) for index, name in id2label.items()}
    if label not in by_name:
        have = [id2label[i] for i in sorted(id2label, key=int)]
        raise ValueError(
            f"reward model has no label {label!r} (its labels: {have}); "
            f"set RewardSettings.positive_label to one of them"
        )
    return by_name[label]


class SentimentScorer:
    """Scores texts with a sequence classifier: one padded, no-grad fp32 forward pass per chunk."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        # fp32 explicitly: the reward must not depend on the dtype the checkpoint was saved in.
        model, self.tokenizer = load_model_and_tokenizer(AutoModelForSequenceClassification, settings.model,
                                                         "reward model")
        # Fail at start-up, not at the first score, when the label is missing.
        self.positive_index: int = find_label_index(model.config.id2label, settings.positive_label)
        self.model = model.to(self.device).eval()
        logger.info("reward model %s on %s, %s at logit index %d", settings.model, self.device,
                    settings.positive_label, self.positive_index)

    def score(self, texts: list[str]) -> list[float]:
        """Raw POSITIVE logit of each text, in order."""
        step = self.settings.max_batch_size
        scores: list[float] = []
        for start in range(0, len(texts), step):
            scores.extend(self._score_chunk(texts[start:start + step]))
        return scores

    @torch.inference_mode()
    def _score_chunk(self, texts: list[str]) -> list[float]:
        # Padding is masked out, so a text scores the same alone or in a padded batch.
        encoded = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.settings.max_length, return_tensors="pt")
        logits = self.model(**encoded.to(self.device)).logits  # (B, num_labels)
        return logits[:, self.positive_index].float().cpu().tolist()
