"""The length penalty of the "positive and short" example: minus a tenth of a point for each
word beyond the fourth (so "short" is up to four words, and an empty response gains nothing).

A reward function takes the prompts and the responses (two lists of str, decoded without
special tokens) and returns one float per pair. The policy can only shorten a response by
ending it with EOS sooner, since each response's longest length is drawn by the sampler.
"""
from __future__ import annotations

FREE_WORDS = 4


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    return [-0.1 * max(0, len(response.split()) - FREE_WORDS) for response in responses]
