"""A language to model: a seeded probabilistic automaton whose true next-token distributions are known.

Task-world answers have one correct string, so a teacher's distribution there is nearly one-hot. Real
LLM next-token distributions are spread, and that spread is what logit distillation transfers. This
generator gives the tiny world such a language.

A ``Language`` has ``states`` states. Each state emits one character: the end marker with
probability ``end_prob``, otherwise one of ``branching`` characters of its own (drawn from the
letters and the space), with probabilities drawn from a Dirichlet(``alpha``). A smaller ``alpha``
gives peakier distributions. The next state is a fixed function of (state, character). A text has
at most ``max_len`` characters: at that position the end marker has probability 1 (part of the
language, so exact entropies stay exact).

Because the automaton is deterministic, the state after any prefix is known, and so is the exact
next-token distribution at every position. So a text's exact log-likelihood, the entropy of each of
its positions, and the entropy rate of the language (per character, the end marker included) are all
computable. A model's expected per-token NLL on the language cannot go below the entropy rate: it is
the floor to report NLL against.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.data.alphabet import END, LANG, LETTERS

CHARS = LETTERS + " "


@dataclass
class Language:
    """Emission probabilities ``probs[s]`` ({char: p}) and transitions ``next_state[s]`` ({char: s'})."""

    probs: list[dict[str, float]]
    next_state: list[dict[str, int]]
    max_len: int = 200

    @classmethod
    def make(
        cls,
        seed: int = 0,
        states: int = 16,
        branching: int = 6,
        alpha: float = 1.0,
        end_prob: float = 0.05,
        max_len: int = 200,
    ) -> Language:
        """A seeded language; the same arguments always give the same one."""
        if not 0 < end_prob < 1:
            raise ValueError("end_prob must be in (0, 1)")
        if not 1 <= branching <= len(CHARS):
            raise ValueError(f"branching must be in 1..{len(CHARS)}")
        rng = np.random.default_rng(seed)
        probs, next_state = [], []
        for _ in range(states):
            chars = rng.choice(list(CHARS), size=branching, replace=False)
            weights = rng.dirichlet(np.full(branching, alpha)) * (1.0 - end_prob)
            probs.append({str(c): float(w) for c, w in zip(chars, weights, strict=True)} | {END: end_prob})
            next_state.append({str(c): int(rng.integers(states)) for c in chars})
        return cls(probs, next_state, max_len)

    def sample(self, rng: random.Random) -> str:
        """One text, ending with the end marker (forced at ``max_len`` characters)."""
        state, out = 0, []
        while True:
            if len(out) == self.max_len - 1:
                out.append(END)
                break
            chars, weights = zip(*self.probs[state].items(), strict=True)
            c = rng.choices(chars, weights)[0]
            out.append(c)
            if c == END:
                break
            state = self.next_state[state][c]
        return "".join(out)

    def token_log_probs(self, text: str) -> list[float]:
        """log p(x_t | x_<t) of every character of ``text`` under the language (-inf where impossible)."""
        state, out = 0, []
        for i, c in enumerate(text):
            p = self._dist(state, i).get(c, 0.0)
            out.append(math.log(p) if p > 0 else -math.inf)
            state = 0 if c == END or p == 0 else self.next_state[state][c]
        return out

    def position_entropies(self, text: str) -> list[float]:
        """The entropy of the true next-character distribution at every position of ``text`` (nats)."""
        state, out = 0, []
        for i, c in enumerate(text):
            out.append(0.0 if i == self.max_len - 1 else self.state_entropy(state))
            state = 0 if c == END or c not in self.next_state[state] else self.next_state[state][c]
        return out

    def _dist(self, state: int, position: int) -> dict[str, float]:
        """The next-character distribution in ``state`` at ``position`` (the end forced at the cap)."""
        if position >= self.max_len:
            return {}
        return {END: 1.0} if position == self.max_len - 1 else self.probs[state]

    def state_entropy(self, state: int) -> float:
        """Entropy (nats) of one state's emission distribution."""
        return -sum(p * math.log(p) for p in self.probs[state].values() if p > 0)

    def entropy_rate(self) -> float:
        """Nats per character in the long run (texts one after another; the end marker restarts at state 0),
        ignoring the ``max_len`` cap (texts that reach it are rare with the defaults).

        The state chain's stationary distribution pi, by solving pi T = pi; then sum_s pi_s H(s).
        """
        n = len(self.probs)
        chain = np.zeros((n, n))
        for s in range(n):
            for c, p in self.probs[s].items():
                chain[s, 0 if c == END else self.next_state[s][c]] += p
        # pi (T - I) = 0 with sum(pi) = 1, as a least-squares system.
        a = np.vstack([(chain - np.eye(n)).T, np.ones(n)])
        b = np.zeros(n + 1)
        b[-1] = 1.0
        pi = np.linalg.lstsq(a, b, rcond=None)[0]
        return float(sum(pi[s] * self.state_entropy(s) for s in range(n)))


def language_of(world: Any) -> Language | None:
    """The language of a ``TaskWorldConfig`` whose tasks include ``lang``, else None."""
    if LANG not in world.tasks:
        return None
    c = world.language
    return Language.make(c.seed, c.states, c.branching, c.alpha, c.end_prob, c.max_len)


def floor(language: Language, texts: list[str]) -> dict[str, float]:
    """The floor of per-character NLL on ``texts`` (each ending with the end marker), in nats.

    ``entropy``: the mean exact entropy of the true next-character distribution over every position
    (a model's expected NLL there cannot be lower); ``nll``: the true language's own NLL on these
    texts (the Bayes-optimal predictor's score on this very sample).
    """
    n = sum(len(t) for t in texts)
    entropy = sum(sum(language.position_entropies(t)) for t in texts)
    nll = -sum(sum(language.token_log_probs(t)) for t in texts)
    return {"entropy": entropy / n, "nll": nll / n, "chars": n, "texts": len(texts)}
