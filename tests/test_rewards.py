"""The reward side on the stand-in classifier: the scorer's numbers, then the batching server
under bare asyncio and as an async Ray actor called from several Ray actors at once.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_rewards.py -q
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from modelhost.loading import ModelLoadError
from rewards import RewardServer, RewardSettings, SentimentScorer

POSITIVE_TEXT = "A wonderful, moving film with great acting."
NEGATIVE_TEXT = "Worst film ever. Terrible plot and awful acting."
# Different lengths, so a merged batch really pads; the empty text is [CLS] [SEP] only.
TEXTS = [
    POSITIVE_TEXT,
    NEGATIVE_TEXT,
    "Okay.",
    "",
    "I rented this movie on video and I thought it was the best thing I had seen all year, "
    "the cast is superb and the story never lets go of you until the very last scene.",
    "boring",
    "The plot was thin but the actors did what they could with it.",
]


def settings_for(folder: Path, **overrides: object) -> RewardSettings:
    return RewardSettings(model=str(folder), device="cpu", **overrides)


@pytest.fixture(scope="module")
def scorer(reward_dir: Path) -> SentimentScorer:
    return SentimentScorer(settings_for(reward_dir))


@pytest.fixture(scope="module")
def one_at_a_time(scorer: SentimentScorer) -> dict[str, float]:
    """Each text scored alone: the reference every batched path must match."""
    return {text: scorer.score([text])[0] for text in TEXTS}


# --- SentimentScorer -------------------------------------------------------------------


def test_scores_match_published_figures(scorer: SentimentScorer) -> None:
    # models/FIGURES.md: 1.45 and -2.28 for these two sentences.
    assert scorer.positive_index == 1
    positive, negative = scorer.score([POSITIVE_TEXT, NEGATIVE_TEXT])
    assert positive == pytest.approx(1.45, abs=0.05)
    assert negative == pytest.approx(-2.28, abs=0.05)


def test_positive_logit_is_found_by_name(reward_dir: Path, tmp_path: Path,
                                         scorer: SentimentScorer) -> None:
    """POSITIVE moved to index 0 (labels and classifier rows swapped): same rewards."""
    swapped = tmp_path / "swapped"
    shutil.copytree(reward_dir, swapped)
    config = json.loads((swapped / "config.json").read_text())
    config["id2label"] = {"0": "POSITIVE", "1": "NEGATIVE"}
    config["label2id"] = {"POSITIVE": 0, "NEGATIVE": 1}
    (swapped / "config.json").write_text(json.dumps(config))
    weights = load_file(swapped / "model.safetensors")
    for name in ("classifier.weight", "classifier.bias"):
        weights[name] = weights[name].flip(0).contiguous()  # rows follow the labels
    save_file(weights, swapped / "model.safetensors", metadata={"format": "pt"})

    moved = SentimentScorer(settings_for(swapped))
    assert moved.positive_index == 0
    assert moved.score(TEXTS) == pytest.approx(scorer.score(TEXTS), abs=1e-5)


def test_missing_label_names_the_setting(reward_dir: Path) -> None:
    with pytest.raises(ValueError, match="positive_label") as raised:
        SentimentScorer(settings_for(reward_dir, positive_label="HAPPY"))
    message = str(raised.value)
    assert "NEGATIVE" in message and "POSITIVE" in message and "\n" not in message


def test_unloadable_hub_id_asks_for_a_local_folder() -> None:
    # HF_HUB_OFFLINE=1 (conftest) makes the hub look-up fail at once.
    with pytest.raises(ModelLoadError, match="reward model .* not a local folder .* local save_pretrained folder") as raised:
        SentimentScorer(RewardSettings(model="no-such-org/no-such-reward-model", device="cpu"))
    assert "\n" not in str(raised.value)


def test_batched_equals_one_at_a_time(reward_dir: Path, scorer: SentimentScorer,
                                      one_at_a_time: dict[str, float]) -> None:
    expected = [one_at_a_time[text] for text in TEXTS]
    assert scorer.score(TEXTS) == pytest.approx(expected, abs=1e-5)
    chunked = SentimentScorer(settings_for(reward_dir, max_batch_size=3))
    assert chunked.score(TEXTS) == pytest.approx(expected, abs=1e-5)
    assert scorer.score([]) == []


# --- RewardServer under bare asyncio ----------------------------------------------------


def ask(server: RewardServer, texts: list[str]):
    """The server's rewards for whole texts (empty prompts: the classifier reads prompt + response)."""
    async def scores() -> list[float]:
        return (await server.score([""] * len(texts), texts))["rewards"]
    return scores()


def requests_of(count: int) -> list[list[str]]:
    """`count` requests of 1..4 texts each, cycling through TEXTS."""
    return [[TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 4)] for i in range(count)]


def test_server_merges_concurrent_requests(reward_dir: Path,
                                           one_at_a_time: dict[str, float]) -> None:
    server = RewardServer(settings_for(reward_dir, max_batch_size=8, max_wait_ms=50))
    requests = requests_of(12) + [TEXTS * 2]  # the last one alone exceeds max_batch_size

    async def fire() -> list[list[float]]:
        return await asyncio.gather(*(ask(server, texts) for texts in requests))

    results = asyncio.run(fire())
    for texts, scores in zip(requests, results):
        assert scores == pytest.approx([one_at_a_time[t] for t in texts], abs=1e-5)
    stats = server.stats()
    total = sum(len(texts) for texts in requests)
    assert stats["requests"] == len(requests)
    assert stats["texts"] == total == sum(stats["batch_sizes"])
    assert max(stats["batch_sizes"]) <= 8
    # All requests arrive at once, so every pass but the last is full.
    assert stats["forward_passes"] == -(-total // 8) < len(requests)
    assert stats["mean_batch_size"] == pytest.approx(total / stats["forward_passes"])
    server.reset_stats()
    assert server.stats()["requests"] == 0 and server.stats()["batch_sizes"] == []


def test_pass_starts_once_every_caller_has_asked(reward_dir: Path, one_at_a_time: dict[str, float]) -> None:
    """With its callers counted, the server merges requests that arrive far apart and starts the
    pass when the last caller asks, not when the (long) window ends."""
    server = RewardServer(settings_for(reward_dir, max_wait_ms=20_000), callers=2)

    async def fire() -> tuple[list[list[float]], float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = asyncio.ensure_future(ask(server, TEXTS[:3]))
        await asyncio.sleep(0.5)  # the second caller asks half a second later
        results = await asyncio.wait_for(asyncio.gather(first, ask(server, TEXTS[3:])), 15)
        return results, loop.time() - start

    results, seconds = asyncio.run(fire())
    assert results[0] + results[1] == pytest.approx([one_at_a_time[t] for t in TEXTS], abs=1e-5)
    assert server.stats()["batch_sizes"] == [len(TEXTS)]
    assert seconds < 10, "the pass waited for the window instead of the last caller"


class FailingOnceServer(RewardServer):
    """Test-only: the first forward pass raises, as a CUDA OOM or a broken model would."""

    failed = False

    def _forward(self, prompts: list[str], responses: list[str]):
        if not self.failed:
            self.failed = True
            raise RuntimeError("forward pass failed on purpose")
        return super()._forward(prompts, responses)


def test_failed_forward_pass_reaches_every_caller(reward_dir: Path,
                                                  one_at_a_time: dict[str, float]) -> None:
    server = FailingOnceServer(settings_for(reward_dir, max_batch_size=64, max_wait_ms=50))

    async def fire() -> tuple[list[object], list[float]]:
        calls = (ask(server, texts) for texts in requests_of(5))
        failed = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        # The server survives the failure: the next request is scored normally.
        after = await asyncio.wait_for(ask(server, [POSITIVE_TEXT]), 30)
        return failed, after

    failed, after = asyncio.run(fire())
    assert len(failed) == 5
    assert all(isinstance(error, RuntimeError) for error in failed)
    assert after == pytest.approx([one_at_a_time[POSITIVE_TEXT]], abs=1e-5)


def test_bad_input_fails_only_its_caller(reward_dir: Path,
                                         one_at_a_time: dict[str, float]) -> None:
    server = RewardServer(settings_for(reward_dir, max_wait_ms=50))

    async def fire() -> list[object]:
        calls = [ask(server, [NEGATIVE_TEXT]), ask(server, [None]), server.score("a str", "a str"),
                 server.score(["two", "prompts"], ["one response"])]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)

    good, bad, str_instead_of_list, unpaired = asyncio.run(fire())
    assert good == pytest.approx([one_at_a_time[NEGATIVE_TEXT]], abs=1e-5)
    assert isinstance(bad, TypeError) and isinstance(str_instead_of_list, TypeError)
    assert isinstance(unpaired, ValueError)


# --- RewardServer as an async Ray actor ---------------------------------------------------


def test_ray_server_merges_requests_of_several_actors(ray_local, reward_dir: Path,
                                                      one_at_a_time: dict[str, float]) -> None:
    ray = ray_local

    class Caller:
        """A stand-in rollout actor: sends its requests without waiting in between.

        Defined here, not at module level: Ray workers cannot import this test module, and
        cloudpickle ships a function-local class by value.
        """

        def ready(self, server: object) -> int:
            return os.getpid()  # receiving the handle already loaded the server's class

        def fire(self, server: object, requests: list[list[str]]) -> list[list[float]]:
            import ray

            answers = ray.get([server.score.remote([""] * len(texts), texts) for texts in requests], timeout=120)
            return [answer["rewards"] for answer in answers]

    # A long window, so requests from separate processes surely land in the same one.
    settings = settings_for(reward_dir, max_batch_size=256, max_wait_ms=1000)
    server = ray.remote(num_cpus=0, max_concurrency=32)(RewardServer).remote(settings)
    # Two actors and the driver: three callers. Each actor that receives the server's
    # handle imports rewards.server (Ray loads the actor class to deserialize a handle),
    # i.e. torch + transformers, ~5 s of CPU per stand-in caller here; hence only two,
    # and the handle is handed over before firing, so that all callers fire together.
    callers = [ray.remote(num_cpus=0)(Caller).remote() for _ in range(2)]
    ray.get([caller.ready.remote(server) for caller in callers], timeout=120)
    where = ray.get(server.ping.remote(), timeout=120)
    assert where["pid"] != os.getpid() and where["node_id"] and where["device"] == "cpu"

    per_caller = [requests_of(6)[:3], requests_of(6)[3:]]
    own = requests_of(8)[6:]  # the driver sends two requests as well
    fired = [caller.fire.remote(server, reqs) for caller, reqs in zip(callers, per_caller)]
    own_refs = [server.score.remote([""] * len(texts), texts) for texts in own]
    results = [*ray.get(fired, timeout=60)] + [[a["rewards"] for a in ray.get(own_refs, timeout=60)]]

    for requests, scores in zip(per_caller + [own], results):
        for texts, got in zip(requests, scores):
            assert got == pytest.approx([one_at_a_time[t] for t in texts], abs=1e-5)
    stats = ray.get(server.stats.remote(), timeout=120)
    assert stats["requests"] == 8
    assert stats["forward_passes"] < stats["requests"]
    # Fewer passes than callers: at least one pass merged requests of different callers.
    assert stats["forward_passes"] < 3, stats
    for actor in [server, *callers]:
        ray.kill(actor)


@pytest.mark.timeout(300)
def test_requests_of_two_rollout_actors_are_merged(ray_local, policy_dir: Path, reward_dir: Path) -> None:
    """Two real rollout actors roll out at once; their score requests reach the reward actor
    together and are scored in merged passes: more texts per pass than the larger request.

    The actors are spawned as the driver spawns them: restartable, given the reward actor's
    name (not its handle), and they look it up themselves."""
    from actors.rollout import RolloutSettings, RolloutWorker

    ray = ray_local
    # A wide window: the two actors share 2 cores, so one may finish generating a while after
    # the other; the pass starts when the second asks (callers=2, as the driver counts them).
    settings = settings_for(reward_dir, max_batch_size=256, max_wait_ms=60_000)
    server = ray.remote(RewardServer).options(name="rewards-merging", num_cpus=0, max_concurrency=64,
                                              max_restarts=1).remote(settings, callers=2)
    rollout_settings = RolloutSettings(policy=str(policy_dir), torch_threads=1)
    workers = [ray.remote(RolloutWorker).options(num_cpus=0, max_restarts=1).remote(rollout_settings, ["rewards-merging"])
               for _ in range(2)]
    ray.get([server.ping.remote()] + [w.ping.remote() for w in workers], timeout=180)  # all loaded

    shards = [[[5 + i, 60, 700 + i] for i in range(8)], [[9 + i, 300 + i] for i in range(6)]]
    rollouts = ray.get([w.rollout.remote(queries, 0, shard, 120.0) for shard, (w, queries)
                        in enumerate(zip(workers, shards))], timeout=180)
    stats = ray.get(server.stats.remote(), timeout=60)
    assert [len(r.scores) for r in rollouts] == [8, 6]
    assert stats["requests"] == 2
    assert stats["mean_batch_size"] > max(len(r.texts) for r in rollouts), stats
    for actor in [server, *workers]:
        ray.kill(actor)
