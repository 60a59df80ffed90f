"""Reward sources without Ray: the weighted mix (exact, per text), every way a source can answer
wrongly (each a one-line RewardSourceError that fails its pass's requests at once), the HTTP
endpoint's retries, the function checks made before Ray starts, and RewardSettings' bounds.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_reward_sources.py -q
"""
from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from reward_functions import Endpoint, response_chars, the_count
from rewards import RewardServer, RewardSettings, SentimentScorer, SourceSpec
from rewards.sources import PYTHON_OBJECT, HttpSource, RewardSourceError, load_function

PROMPTS = ["The film", "I rented this", "Worst", ""]
RESPONSES = [" was the best of the year.", " movie and the cast was great", " film ever. the end", "Okay."]


def serve(server: RewardServer, *requests: tuple[list[str], list[str]]) -> list:
    """The server's answers (or exceptions) to concurrent requests, under bare asyncio."""
    async def fire() -> list:
        calls = (server.score(p, r) for p, r in requests)
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
    return asyncio.run(fire())


def given(fn, name: str = "fn") -> tuple[RewardSettings, dict]:
    """Settings whose one source is ``fn`` given as a Python object (as learner.train(reward=fn))."""
    spec = f"{PYTHON_OBJECT}:{name}"
    return RewardSettings(function=spec, max_wait_ms=50), {spec: fn}


def test_mix_is_the_weighted_sum_of_its_sources_exactly(reward_dir: Path) -> None:
    endpoint = Endpoint(response_chars)
    try:
        settings = RewardSettings(device="cpu", max_wait_ms=50, sources=[
            SourceSpec(name="sentiment", weight=0.7, model=str(reward_dir)),
            SourceSpec(name="the", weight=-1.5, function="reward_functions:the_count"),
            SourceSpec(name="chars", weight=2.0, url=endpoint.url)])
        server = RewardServer(settings)
        first, second = serve(server, (PROMPTS[:3], RESPONSES[:3]), (PROMPTS[3:], RESPONSES[3:]))
    finally:
        endpoint.close()
    sentiment = SentimentScorer(RewardSettings(model=str(reward_dir), device="cpu"))
    for got, sl in ((first, slice(0, 3)), (second, slice(3, 4))):
        prompts, responses = PROMPTS[sl], RESPONSES[sl]
        assert set(got["sources"]) == {"sentiment", "the", "chars"}
        assert got["sources"]["the"] == the_count(prompts, responses)
        assert got["sources"]["chars"] == response_chars(prompts, responses)
        assert got["sources"]["sentiment"] == pytest.approx(
            sentiment.score([p + r for p, r in zip(prompts, responses)]), abs=1e-5)
        for i, reward in enumerate(got["rewards"]):
            s = got["sources"]
            assert reward == 0.0 + 0.7 * s["sentiment"][i] + -1.5 * s["the"][i] + 2.0 * s["chars"][i]  # exactly


def test_default_is_the_classifier_alone(reward_dir: Path) -> None:
    settings = RewardSettings(model=str(reward_dir), device="cpu", max_wait_ms=50)
    assert settings.source_specs() == [SourceSpec(name="model", model=str(reward_dir))]
    (answer,) = serve(RewardServer(settings), (PROMPTS, RESPONSES))
    assert answer["rewards"] == answer["sources"]["model"]  # weight 1: the classifier's logit, unchanged


BAD_ANSWERS = {
    "too few": (lambda p, r: [0.0] * (len(p) - 1), "returned 3 values for 4 texts"),
    "too many": (lambda p, r: [0.0] * (len(p) + 1), "returned 5 values for 4 texts"),
    "a non-number": (lambda p, r: [0.0, "high", 0.0, 0.0], "non-number for text 1"),
    "None": (lambda p, r: [None] * len(p), "non-number for text 0"),
    "a bool": (lambda p, r: [True] * len(p), "non-number for text 0"),
    "NaN": (lambda p, r: [0.0, 0.0, math.nan, 0.0], "non-finite value for text 2"),
    "inf": (lambda p, r: [-math.inf] * len(p), "non-finite value for text 0"),
    "a string": (lambda p, r: "1.0", "returned a str"),
    "a number": (lambda p, r: 1.0, "returned a float"),
    "raises": (lambda p, r: 1 / 0, "raised ZeroDivisionError: division by zero"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_wrong_answer_fails_the_pass_at_once_with_one_line(case: str) -> None:
    fn, says = BAD_ANSWERS[case]
    settings, functions = given(fn, "judge")
    settings.max_wait_ms = 60_000  # the pass starts when both callers have asked, not after a window
    server = RewardServer(settings, callers=2, functions=functions)
    answers = serve(server, (PROMPTS[:2], RESPONSES[:2]), (PROMPTS[2:], RESPONSES[2:]))
    for error in answers:  # both requests of the merged pass fail with the same line
        assert isinstance(error, RewardSourceError), error
        assert str(error).startswith("reward source 'judge' ") and says in str(error), str(error)
        assert "\n" not in str(error)


def test_numpy_numbers_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    settings, functions = given(lambda p, r: np.arange(len(p), dtype=np.float32))
    (answer,) = serve(RewardServer(settings, functions=functions), (PROMPTS, RESPONSES))
    assert answer["rewards"] == [0.0, 1.0, 2.0, 3.0]


def test_http_endpoint_retries_then_answers() -> None:
    endpoint = Endpoint(the_count, fail_first=1)
    try:
        source = HttpSource("remote", endpoint.url, timeout_s=10, retries=1, backoff_s=0.01)
        assert source.score(PROMPTS, RESPONSES) == the_count(PROMPTS, RESPONSES)
        assert endpoint.requests == 2
    finally:
        endpoint.close()


def test_http_endpoint_that_is_down_is_one_line_after_bounded_retries() -> None:
    endpoint = Endpoint(the_count)
    url = endpoint.url
    endpoint.close()  # nothing listens there now: connection refused
    settings = RewardSettings(url=url, retries=2, max_wait_ms=50)
    server = RewardServer(settings)
    for source in server.mix.sources:
        source.backoff_s = 0.01
    (error,) = serve(server, (PROMPTS, RESPONSES))
    assert isinstance(error, RewardSourceError)
    assert str(error).startswith(f"reward source 'url' ({url}) did not answer after 3 tries")
    assert "\n" not in str(error)


@pytest.mark.parametrize("answer, says", [
    (lambda p, r: "1.0", "returned a str"),
    (lambda p, r: [1.0] * (len(p) - 1), "returned 3 values for 4 texts"),
])
def test_http_endpoint_answering_wrongly_is_one_line(answer, says) -> None:
    endpoint = Endpoint(answer)
    try:
        (got,) = serve(RewardServer(RewardSettings(url=endpoint.url, max_wait_ms=50)), (PROMPTS, RESPONSES))
    finally:
        endpoint.close()
    assert isinstance(got, RewardSourceError) and str(got).startswith("reward source 'url' ") and says in str(got)


@pytest.mark.parametrize("spec, says", [
    ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("reward_functions:missing", "has no 'missing'"),
    ("reward_functions:BATCH", "is a int, not a function"),
    ("math:pi", "is a float, not a function"),
    ("json:dumps", None),  # dumps(obj, *, ...) takes one positional argument only
    (f"{PYTHON_OBJECT}:gone", "pass it again there"),
])
def test_function_checks(spec: str, says: str | None) -> None:
    with pytest.raises(ValueError) as raised:
        load_function(spec)
    assert (says or "must take two positional arguments") in str(raised.value)
    assert "\n" not in str(raised.value)
    assert load_function("reward_functions:the_count") is the_count


def test_bad_function_stops_the_command_line_before_ray(tmp_path: Path) -> None:
    """A reward function that cannot be imported: one line, exit 2, before Ray or any actor."""
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", "--config", "configs/stand-in-quick.yaml",
         "--reward.function", "tests.reward_functions:no_such_function", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: reward.function: module 'tests.reward_functions' has no 'no_such_function'"]
    assert "Ray dashboard" not in proc.stdout and not list(tmp_path.iterdir())


@pytest.mark.parametrize("field, value", [
    ("max_batch_size", 0), ("max_batch_size", 10**9), ("max_length", 0), ("max_wait_ms", -1.0),
    ("max_wait_ms", 1e12), ("timeout_s", 0.0), ("timeout_s", math.inf), ("retries", -1), ("retries", 1000),
    ("torch_threads", 0), ("function", "no_colon"), ("url", "file:///etc/passwd"),
])
def test_settings_are_bounded_where_declared(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as raised:
        RewardSettings(**{field: value})
    assert "\n" not in str(raised.value)


def test_sources_need_one_kind_and_distinct_names() -> None:
    with pytest.raises(ValueError, match="exactly one of model, function, url"):
        SourceSpec(name="a", model="m", url="http://x")
    with pytest.raises(ValueError, match="names must differ"):
        RewardSettings(sources=[SourceSpec(name="a", url="http://x"), SourceSpec(name="a", url="http://y")])
    with pytest.raises(ValueError, match="give one of function, url, sources"):
        RewardSettings(function="m:f", sources=[SourceSpec(name="a", url="http://x")])


def test_http_timeouts_stay_below_the_call_timeout() -> None:
    """An endpoint that is down must be reported as such, before the rollout call's own timeout."""
    from learner.config import ConfigError, from_overrides

    with pytest.raises(ConfigError, match=r"reward.timeout_s \(300\) x \(reward.retries \(2\) \+ 1\) = 900s"):
        from_overrides({"reward.url": "http://x", "reward.timeout_s": 300.0})
    assert from_overrides({"reward.timeout_s": 300.0}).reward.timeout_s == 300  # no endpoint: no bound


def readme_mix(tmp_path: Path) -> Path:
    """The README's mix YAML (section Rewards), as a file."""
    section = (REPO / "README.md").read_text().split("### Rewards", 1)[1].split("### From Python", 1)[0]
    path = tmp_path / "mix.yaml"
    path.write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    return path


def test_readme_mix_is_read_from_yaml(tmp_path: Path) -> None:
    from learner.config import parse_args

    cwd = os.getcwd()
    os.chdir(REPO)  # its model path is relative to the checkout, as the README's commands run
    try:
        cfg = parse_args(["--config", str(readme_mix(tmp_path))])
    finally:
        os.chdir(cwd)
    assert [(s.name, s.weight, s.kind) for s in cfg.reward.sources] == [("sentiment", 1.0, "model"),
                                                                         ("brevity", 0.5, "function")]


@pytest.mark.parametrize("sources, says", [
    ([{"name": "a"}], "reward.sources 'a' needs exactly one of model, function, url (got none)"),
    ([{"name": "a", "weight": "heavy", "url": "http://y"}], "reward.sources[0].weight: 'heavy' is not a valid float"),
    ([{"nam": "a", "url": "http://y"}], "reward.sources[0]: unknown key 'nam'"),
    ({"name": "a"}, "reward.sources must be a list"),
    (["a"], "reward.sources[0] must be a mapping"),
    ([{"name": "a b", "url": "http://y"}], "each source needs a name of letters"),
    ([{"name": "a", "url": "http://y"}, {"name": "a", "url": "http://z"}], "names must differ"),
    ([{"name": "a", "function": "nocolon"}], "must be MODULE:NAME"),
])
def test_bad_mix_in_yaml_is_one_line(tmp_path: Path, sources, says: str) -> None:
    import yaml

    from learner.config import ConfigError, parse_args

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"reward": {"sources": sources}}))
    with pytest.raises(ConfigError) as raised:
        parse_args(["--config", str(path)])
    assert says in str(raised.value) and "\n" not in str(raised.value)
