"""What a finished run shows (``python -m learner.report RUN_DIR`` is its command line).

Writes into the run directory what the reference notebook reported (docs/recipe.md):

- ``reward.png``: the reward mean per step with a +-std band, and the distribution of each
  step's rewards as a heat map (one histogram per step over shared bins; colour = share of
  the batch). From ``rollouts.jsonl``; the mean panel falls back to ``stats.jsonl``.
- ``before_after.md`` and ``before_after.csv``: a fixed set of held-out queries (data.eval_split: the test split)
  (the training recipe: reviews longer than data.min_review_chars, query = first k policy
  tokens, k uniform in [data.query_min_tokens, data.query_max_tokens], reviews and k drawn
  with a numpy Generator seeded by --seed), continued by the initial and by the tuned policy
  with the same sampling seed (so both draw the same response lengths), each scored by the
  run's reward model on decode(query + response) exactly as in training.

The CSV keeps the texts raw, so ``query + response`` rebuilds the scored text exactly; the
markdown strips IMDB's ``<br />`` and escapes ``|`` and newlines for display only.

``make_report(run_dir)`` does all of it (warnings go to ``logging``; only the command line
prints); ``before_after_rows(cfg, tuned_policy)``
gives the table's rows (with the full scored texts) for other checks.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from learner.records.checkpoint import ROLLOUTS, STATS

if TYPE_CHECKING:  # the heavy imports (torch, transformers) wait until they are needed
    from learner.config import Config

log = logging.getLogger(__name__)

FIGURE = "reward.png"
TABLE_MD = "before_after.md"
TABLE_CSV = "before_after.csv"
COLUMNS = ["query", "response before", "reward before", "response after", "reward after"]
# Row keys, in COLUMNS order.
KEYS = ["query", "response_before", "reward_before", "response_after", "reward_after"]


class ReportError(ValueError):
    """A run directory the report cannot use; the message says what is missing."""


# ----------------------------------------------------------------------------- run directory

def read_jsonl(path: Path) -> list[dict]:
    """One dict per line; a cut-off last line (a run killed mid-write) is skipped with a warning."""
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON; skipped", path.name, i + 1)
    return records


def load_run_config(run_dir: Path) -> "Config":
    """The run's Config, rebuilt from config.yaml through the same validation as a new run."""
    from learner.config import ConfigError, from_overrides, saved_settings

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no config.yaml: is it a run directory of python -m learner.main?")
    try:
        return from_overrides(saved_settings(path))
    except ConfigError as err:
        message = str(err).replace("--config: ", "")
        raise ReportError(message if str(path) in message else f"{path}: {message}") from err


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ReportError(f"{run_dir} has no config.yaml: is it a run directory of python -m learner.main?")
    if not (run_dir / "policy").is_dir():
        raise ReportError(f"{run_dir} has no policy/ folder: the run did not finish (the tuned policy is saved "
                          "at the end)")


# ----------------------------------------------------------------------------- figure

def reward_series(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray] | None, str]:
    """steps, mean, std per step and each step's scores (None without rollouts.jsonl), and the source.

    Steps are sorted; a step logged twice keeps its last record (a resumed run).
    """
    rollouts, stats = run_dir / ROLLOUTS, run_dir / STATS
    if rollouts.is_file():
        by_step = {}
        for r in read_jsonl(rollouts):
            scores = np.asarray(r.get("scores") or [], dtype=float)
            scores = scores[np.isfinite(scores)]  # a NaN reward stops a run; it has no place in a histogram
            if "step" in r and scores.size:
                by_step[int(r["step"])] = scores
        if by_step:
            steps = np.array(sorted(by_step))
            scores = [by_step[s] for s in steps]
            mean = np.array([s.mean() for s in scores])
            # Unbiased, as env/reward_std.
            std = np.array([s.std(ddof=1) if len(s) > 1 else 0.0 for s in scores])
            return steps, mean, std, scores, rollouts.name
    if stats.is_file():
        by_step = {int(r["step"]): r for r in read_jsonl(stats)
                   if "step" in r and np.isfinite(float(r.get("env/reward_mean", np.nan)))}
        if by_step:
            steps = np.array(sorted(by_step))
            mean = np.array([float(by_step[s]["env/reward_mean"]) for s in steps])
            std = np.array([float(by_step[s].get("env/reward_std", 0.0)) for s in steps])
            return steps, mean, std, None, stats.name
    raise ReportError(f"{run_dir} has neither rollouts.jsonl nor stats.jsonl with rewards")


def eval_series(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and eval/reward_mean of the steps that scored the held-out prompts (run.eval_every),
    from stats.jsonl; empty without any. A step logged twice keeps its last record."""
    stats = run_dir / STATS
    by_step = {int(r["step"]): float(r["eval/reward_mean"]) for r in (read_jsonl(stats) if stats.is_file() else [])
               if "step" in r and np.isfinite(float(r.get("eval/reward_mean", np.nan)))}
    steps = np.array(sorted(by_step), dtype=int)
    return steps, np.array([by_step[s] for s in steps], dtype=float)


def _plot_eval(ax: Any, run_dir: Path) -> None:
    """The held-out reward (eval/reward_mean) as its own line on the mean panel, where the run has it."""
    steps, mean = eval_series(run_dir)
    if len(steps):
        ax.plot(steps, mean, color="tab:orange", marker="D", markersize=4, linewidth=1.2,
                label="held-out prompts (eval/reward_mean)")


def histogram_grid(steps: np.ndarray, scores: list[np.ndarray], bins: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step edges (S+1,), reward bin edges (bins+1,) and shares (bins, S) over the full step range.

    Every step's histogram uses the same bins (spanning all rewards); a column sums to 1, and a
    step missing from the log is a NaN column rather than a squeezed-out gap. Without `bins`,
    about 3 sqrt(batch) bins, 10 to 40 (34 for the recipe's batch of 128).
    """
    if bins is None:
        bins = int(np.clip(round(3 * math.sqrt(np.median([len(s) for s in scores]))), 10, 40))
    all_scores = np.concatenate(scores)
    lo, hi = float(all_scores.min()), float(all_scores.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    first, last = int(steps.min()), int(steps.max())
    share = np.full((bins, last - first + 1), np.nan)
    for step, s in zip(steps, scores):
        counts, _ = np.histogram(s, bins=edges)
        share[:, int(step) - first] = counts / len(s)
    step_edges = np.arange(first, last + 2) - 0.5
    return step_edges, edges, share


def plot_rewards(run_dir: Path, out: Path | None = None, title: str | None = None,
                 ylabel: str = "reward") -> Path:
    """reward.png: mean +- std per step (top) and the per-step reward distribution (bottom).
    ``ylabel`` names the reward on both axes (``reward_axis`` of the run's config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or run_dir / FIGURE
    steps, mean, std, scores, source = reward_series(run_dir)
    fig, (ax_mean, ax_dist) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, constrained_layout=True,
                                           gridspec_kw={"height_ratios": [1, 1.3]})
    fig.suptitle(title or f"Reward over PPO steps: {run_dir.name}", fontsize=13)

    ax_mean.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.25, linewidth=0,
                         label="± std")
    ax_mean.plot(steps, mean, color="tab:blue", marker="o" if len(steps) <= 40 else None, markersize=3,
                 label="mean")
    ax_mean.axhline(0.0, color="grey", linewidth=0.6, linestyle=":")
    _plot_eval(ax_mean, run_dir)
    ax_mean.set_ylabel(ylabel)
    ax_mean.set_title(f"batch reward: mean ± std per step (from {source})", fontsize=10)
    ax_mean.legend(loc="best", fontsize=8)
    ax_mean.grid(alpha=0.3)

    if scores is not None:
        step_edges, edges, share = histogram_grid(steps, scores)
        mesh = ax_dist.pcolormesh(step_edges, edges, np.ma.masked_invalid(share), cmap="viridis", shading="flat",
                                  vmin=0.0)
        fig.colorbar(mesh, ax=ax_dist, label="share of the batch", pad=0.01)
        ax_dist.plot(steps, mean, color="white", linewidth=1.2, alpha=0.9, label="mean")
        ax_dist.legend(loc="upper left", fontsize=8, facecolor="0.3", labelcolor="white", framealpha=0.6)
        ax_dist.set_title(f"reward distribution per step ({len(edges) - 1} bins, "
                          f"{int(np.median([len(s) for s in scores]))} rollouts per step)", fontsize=10)
        ax_dist.set_ylim(edges[0], edges[-1])
    else:
        ax_dist.text(0.5, 0.5, "no rollouts.jsonl in the run directory:\nper-step distributions not available",
                     ha="center", va="center", transform=ax_dist.transAxes, color="grey")
        ax_dist.set_title("reward distribution per step", fontsize=10)
    ax_dist.set_xlabel("PPO step")
    ax_dist.set_ylabel(ylabel)
    ax_mean.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
    ax_mean.tick_params(labelbottom=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- before / after

def held_out_queries(cfg: "Config", tokenizer: Any, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """n fixed held-out queries (data.eval_split, the test split by default) as token ids, and the
    index of each one's text.

    Made as in training (learner.orchestration.data): texts longer than data.min_review_chars
    characters, queries as data.prompt_mode and data.chat_template say (the recipe: the first k
    policy tokens, k uniform in [query_min_tokens, query_max_tokens]). Texts (without
    replacement) and k come from numpy's default_rng(seed).
    """
    from learner.orchestration.data import Prompts, held_out_prompts, load_texts

    d = cfg.data
    texts = load_texts(d.dataset, d.eval_split, d.text_column)
    queries, picked = held_out_prompts(texts, Prompts(tokenizer, d), n, seed)
    if len(queries) < n:
        raise ReportError(f"the held-out split has {len(queries)} texts longer than {d.min_chars} characters, "
                          f"fewer than --queries {n}")
    return queries, picked


def _threads(torch_threads: int | None) -> int:
    import torch

    return max(1, int(torch_threads or torch.get_num_threads() or os.cpu_count() or 1))


def generate_responses(cfg: "Config", policy: str, queries: list[list[int]], seed: int,
                       torch_threads: int | None = None):
    """One Rollout of `policy` on `queries`: the run's sampling settings, seeded by (seed, 0, 0)."""
    import dataclasses

    from actors.rollout import RolloutWorker

    settings = dataclasses.replace(cfg.rollout, policy=str(policy), seed=seed, torch_threads=_threads(torch_threads))
    return RolloutWorker(settings).generate(queries, step=0, shard=0)


def _split(text: str, prefix: str) -> tuple[str, str]:
    """(query, response) display parts whose concatenation is exactly `text`."""
    if text.startswith(prefix):
        return prefix, text[len(prefix):]
    return "", text


def before_after_rows(cfg: "Config", tuned_policy: str | Path, n_queries: int = 16, seed: int = 0,
                      initial_policy: str | Path | None = None, torch_threads: int | None = None,
                      scorer: Any = None, functions: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The before/after table: one dict per held-out query.

    Keys: query, response_before, reward_before, response_after, reward_after (the table), plus
    text_before / text_after (exactly what the reward model read: decode(query + response),
    special tokens skipped), query_ids, response_ids_before / _after and review_index.
    ``query + response_before == text_before`` (and likewise after) holds for every row, so
    the rewards can be checked by re-scoring ``query + response``. The reward is the run's
    (``rewards.sources.RewardMix``; ``functions``: its Python functions given as objects), or
    ``scorer.score(texts)`` when a scorer is given.
    """
    from learner.core.models import load_tokenizer
    from rewards.sources import RewardMix

    initial = str(initial_policy or cfg.rollout.policy)
    tokenizer = load_tokenizer(initial)
    queries, picked = held_out_queries(cfg, tokenizer, n_queries, seed)
    before = generate_responses(cfg, initial, queries, seed, torch_threads)
    after = generate_responses(cfg, str(tuned_policy), queries, seed, torch_threads)
    if scorer is None:
        import dataclasses

        mix = RewardMix(dataclasses.replace(cfg.reward, torch_threads=_threads(torch_threads)), functions)
        scores, _ = mix.score(before.prompts + after.prompts, before.response_texts + after.response_texts)
    else:
        scores = scorer.score(list(before.texts) + list(after.texts))
    rewards_before, rewards_after = scores[:n_queries], scores[n_queries:]

    rows = []
    for i, q in enumerate(queries):
        tb, ta = before.texts[i], after.texts[i]
        # The query's display text: its own decode when both texts start with it (nearly always);
        # otherwise (a character split across the query/response boundary) their common prefix.
        prefix = tokenizer.decode(q, skip_special_tokens=True)
        if not (tb.startswith(prefix) and ta.startswith(prefix)):
            prefix = os.path.commonprefix([tb, ta, prefix])
        query_text, response_before = _split(tb, prefix)
        _, response_after = _split(ta, prefix)
        rows.append({
            "query": query_text, "response_before": response_before, "reward_before": float(rewards_before[i]),
            "response_after": response_after, "reward_after": float(rewards_after[i]),
            "text_before": tb, "text_after": ta, "query_ids": list(q),
            "response_ids_before": list(before.responses[i]), "response_ids_after": list(after.responses[i]),
            "review_index": int(picked[i]),
        })
    return rows


def summary(rows: list[dict]) -> dict[str, float]:
    before = np.array([r["reward_before"] for r in rows], dtype=float)
    after = np.array([r["reward_after"] for r in rows], dtype=float)
    return {"mean_before": float(before.mean()), "mean_after": float(after.mean()),
            "median_before": float(np.median(before)), "median_after": float(np.median(after))}


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def md_cell(text: str) -> str:
    """Display text for a markdown table cell: no <br />, | and newlines escaped."""
    text = _BR.sub(" ", text)
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    text = re.sub(r"\r\n|\r|\n", "<br>", text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return text or " "


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([repr(row[k]) if isinstance(row[k], float) else row[k] for k in KEYS])
    return path


def write_markdown(rows: list[dict], path: Path, title: str, note: str) -> Path:
    s = summary(rows)
    lines = [f"# Before and after PPO: {title}", "", note, "",
             "| " + " | ".join(COLUMNS) + " |", "| --- | --- | ---: | --- | ---: |"]
    for row in rows:
        lines.append(f"| {md_cell(row['query'])} | {md_cell(row['response_before'])} | {row['reward_before']:+.3f} "
                     f"| {md_cell(row['response_after'])} | {row['reward_after']:+.3f} |")
    lines += ["", f"**mean** reward before {s['mean_before']:+.3f}, after {s['mean_after']:+.3f}; "
                  f"**median** reward before {s['median_before']:+.3f}, after {s['median_after']:+.3f} "
                  f"({len(rows)} queries)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- all of it

def reward_words(cfg: "Config", sources: bool = True) -> str:
    """The run's reward in words: the classifier's label logit, or the weighted sum of its
    sources. ``sources`` names each one's model, function or URL (the table's note); the
    figure's axis (``reward_axis``) goes without."""
    r = cfg.reward
    if not (r.function or r.url or r.sources):
        return f"{r.positive_label} logit" + (f" of `{r.model}` on query + response" if sources else "")
    return " + ".join(f"{s.weight:g} * {s.name}" + (f" (`{s.model or s.function or s.url}`)" if sources else "")
                      for s in r.source_specs())


def reward_axis(cfg: "Config") -> str:
    """The figure's axis label."""
    return f"reward ({reward_words(cfg, sources=False)})"


def make_report(run_dir: Path, n_queries: int = 16, seed: int = 0,
                torch_threads: int | None = None, functions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes reward.png, before_after.md and before_after.csv into run_dir.

    Returns their paths ("figure" is None when the run logged no rewards yet), the table's
    means and medians ("mean_before", ...) and its rows.
    """
    run_dir = Path(run_dir)
    if n_queries < 1:
        raise ReportError(f"--queries must be at least 1, got {n_queries}")
    _check_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    try:
        figure: Path | None = plot_rewards(run_dir, title=f"Reward over PPO steps: {cfg.run.name or run_dir.name}",
                                           ylabel=reward_axis(cfg))
    except ReportError as err:
        log.warning("%s; %s not written", err, FIGURE)
        figure = None

    rows = before_after_rows(cfg, run_dir / "policy", n_queries, seed, torch_threads=torch_threads,
                             functions=functions)
    note = (f"{n_queries} held-out queries from the `{cfg.data.eval_split}` split of `{cfg.data.dataset}` "
            f"(seed {seed}), "
            f"continued by the initial policy `{cfg.rollout.policy}` (before) and the tuned `{run_dir / 'policy'}` "
            f"(after), with the same sampling seed; reward = {reward_words(cfg)}.")
    md = write_markdown(rows, run_dir / TABLE_MD, cfg.run.name or run_dir.name, note)
    table = write_csv(rows, run_dir / TABLE_CSV)
    return {"figure": figure, "markdown": md, "csv": table, **summary(rows), "rows": rows}
