"""The embedded default: a synthetic interaction log with structure a sequence model can learn.

Three ingredients, each present in real logs:
- power-law item popularity (Zipf weights over a random permutation of the catalogue);
- users with latent tastes: items belong to topics, each user draws a sparse topic mixture;
- sequential structure: every item has a few successor items (same topic, popularity-weighted)
  and with probability `follow_prob` the next event follows a successor of the previous item.

Popularity alone explains part of the log, tastes more, and the transitions the rest, so a
sequence model clearly beats a popularity baseline. Generation is vectorised over users and
streamed in blocks of users, so 20M events need about a hundred MB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recdistill.trainer.data.formats import EVENT_SCHEMA


@dataclass
class SyntheticConfig:
    users: int = 2000
    items: int = 500
    events: int = 60_000
    seed: int = 0
    zipf_exponent: float = 0.8
    taste_concentration: float = 0.3  # Dirichlet alpha: small = each user likes few topics
    follow_prob: float = 0.6  # chance the next item is a successor of the previous one
    successors: int = 3
    min_length: int = 5
    block_users: int = 20_000


def _sequence_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Lognormal lengths (>= min_length) that add up to exactly `cfg.events`."""
    if cfg.events < cfg.users * cfg.min_length:
        raise ValueError(
            f"synthetic: {cfg.events} events cannot give {cfg.users} users {cfg.min_length} events each"
        )
    raw = rng.lognormal(mean=0.0, sigma=0.8, size=cfg.users)
    spare = cfg.events - cfg.users * cfg.min_length
    extra = np.floor(raw / raw.sum() * spare).astype(np.int64)
    remainder = spare - int(extra.sum())
    extra[rng.choice(cfg.users, size=remainder, replace=remainder > cfg.users)] += 1
    if remainder > cfg.users:  # only for tiny user counts; keep the exact total
        extra[0] += spare - int(extra.sum())
    return extra + cfg.min_length


def generate_synthetic(cfg: SyntheticConfig) -> Iterator[pa.Table]:
    """Yield `EVENT_SCHEMA` tables, user ids 1..users and item ids 1..items (as strings)."""
    if cfg.users < 1 or cfg.items < 2:
        raise ValueError("synthetic: need at least 1 user and 2 items")
    rng = np.random.default_rng(cfg.seed)
    n_topics = int(np.clip(cfg.items // 40, 2, 64))
    item_topic = rng.integers(n_topics, size=cfg.items)
    popularity = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf_exponent
    popularity = popularity[rng.permutation(cfg.items)]

    # Items grouped by topic, with one cumulative popularity array: an item of topic t is drawn
    # by one searchsorted into that topic's slice of the cumulative sum.
    by_topic = np.argsort(item_topic, kind="stable")
    cumulative = np.cumsum(popularity[by_topic])
    topic_end = np.searchsorted(item_topic[by_topic], np.arange(n_topics), side="right")
    topic_start = np.concatenate([[0], topic_end[:-1]])
    cum_before = np.concatenate([[0.0], cumulative])[topic_start]
    cum_total = np.concatenate([[0.0], cumulative])[topic_end] - cum_before
    # Topics with no items fall back to the first non-empty topic.
    empty = cum_total == 0
    if empty.any():
        fallback = int(np.flatnonzero(~empty)[0])
        cum_before[empty], cum_total[empty] = cum_before[fallback], cum_total[fallback]

    def draw_in_topics(topics: np.ndarray) -> np.ndarray:
        target = cum_before[topics] + rng.random(topics.size) * cum_total[topics]
        position = np.minimum(np.searchsorted(cumulative, target, side="right"), cfg.items - 1)
        return by_topic[position]

    successors = np.stack([draw_in_topics(item_topic) for _ in range(cfg.successors)], axis=1)
    lengths = _sequence_lengths(cfg, rng)

    order = 0
    for first in range(0, cfg.users, cfg.block_users):
        block_lengths = lengths[first : first + cfg.block_users]
        n = block_lengths.size
        taste = rng.dirichlet(np.full(n_topics, cfg.taste_concentration), size=n).cumsum(axis=1)
        sequence = np.zeros((n, int(block_lengths.max())), dtype=np.int64)
        previous = np.zeros(n, dtype=np.int64)
        for step in range(sequence.shape[1]):
            active = np.flatnonzero(block_lengths > step)
            topics = np.minimum(
                (taste[active] < rng.random(active.size)[:, None]).sum(axis=1), n_topics - 1
            )
            chosen = draw_in_topics(topics)
            if step > 0:
                follow = rng.random(active.size) < cfg.follow_prob
                picks = successors[previous[active], rng.integers(cfg.successors, size=active.size)]
                chosen = np.where(follow, picks, chosen)
            sequence[active, step] = chosen
            previous[active] = chosen
        mask = np.arange(sequence.shape[1])[None, :] < block_lengths[:, None]
        user_ids = np.repeat(np.arange(first + 1, first + n + 1), block_lengths)
        item_ids = sequence[mask] + 1
        steps = np.nonzero(mask)[1].astype(np.float64)
        total = item_ids.size
        yield pa.table(
            {
                "user": pa.array(user_ids.astype(str)),
                "item": pa.array(item_ids.astype(str)),
                "time": pa.array(steps),
                "order": pa.array(np.arange(order, order + total, dtype=np.int64)),
            },
            schema=EVENT_SCHEMA,
        )
        order += total
