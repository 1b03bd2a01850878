"""Chunk execution helpers: turn (H, D_a) action chunks into one action per control step (numpy only).

`ActionChunkBroker` does receding-horizon execution (openpi's broker); `TemporalEnsembler` averages
overlapping chunks with exponential weights (ACT's temporal ensembling). Both wrap the same `infer`
interface as the policy, a server client or a `PolicyRunner`, and import no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["ActionChunkBroker", "TemporalEnsembler"]


def _as_infer(policy: Any) -> Callable[[Any], Any]:
    fn = getattr(policy, "infer", policy)
    if not callable(fn):
        raise TypeError(f"expected a callable obs -> chunk or an object with .infer(obs), got {type(policy).__name__}")
    return fn


def _policy_reset(policy: Any) -> Callable[[], Any] | None:
    """The wrapped object's `reset` (a PolicyClient's resets the server session), None for plain callables."""
    reset = None if policy is None or not hasattr(policy, "infer") else getattr(policy, "reset", None)
    return reset if callable(reset) else None


def _split(result: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """infer result -> (chunk (H, D_a), the result dict). Accepts a dict with "actions" or a bare array."""
    info = dict(result) if isinstance(result, dict) else {}
    actions = result.get("actions") if isinstance(result, dict) else result
    if actions is None:
        raise ValueError("the policy's result has no 'actions'; return {'actions': (H, D_a), ...} or an array")
    chunk = np.asarray(actions)
    if chunk.ndim != 2 or chunk.shape[0] == 0:
        raise ValueError(f"expected an action chunk of shape (H, D_a) with H >= 1, got {chunk.shape}")
    return chunk, info


class ActionChunkBroker:
    """Execute the first `execute_steps` actions of each chunk, then ask the policy for a new chunk.

    Step k (from 0 after `reset()`) returns `chunk_j[k - j * n]` where chunk j was requested at step
    `j * n` with that step's observation and `n = execute_steps`.

    Args:
        policy: callable `obs -> {"actions": (H, D_a), ...}` (or a bare (H, D_a) array), or an object with
            such an `infer` method (a `PolicyClient`, a `PolicyRunner`).
        execute_steps: actions to execute per chunk (n <= H); None = the whole chunk.
    """

    def __init__(self, policy: Any, execute_steps: int | None = None):
        if execute_steps is not None and execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1 (or None for the whole chunk), got {execute_steps}")
        self._infer = _as_infer(policy)
        self._reset_policy = _policy_reset(policy)
        self.execute_steps = execute_steps
        self._chunk: np.ndarray | None = None
        self._info: dict[str, Any] = {}
        self._index = 0  # next row of the current chunk
        self._limit = 0  # rows of the current chunk to execute

    def reset(self) -> None:
        """Drop the current chunk (new episode); the next step queries the policy. A wrapped object with
        `reset()` (a `PolicyClient`, a `PolicyRunner`) is reset too, so its episode state starts fresh."""
        self._chunk, self._info, self._index, self._limit = None, {}, 0, 0
        if self._reset_policy is not None:
            self._reset_policy()

    @property
    def remaining(self) -> int:
        """Actions left to execute before the next query."""
        return self._limit - self._index if self._chunk is not None else 0

    def step(self, obs: Any) -> np.ndarray:
        """This control step's action (D_a,); queries the policy with `obs` when the chunk is spent."""
        return self.infer(obs)["actions"]

    def infer(self, obs: Any) -> dict[str, Any]:
        """Policy-shaped wrapper: the chunk's result with `"actions"` (D_a,) for this step.

        Also sets `"chunk_index"` (row of the chunk) and `"new_chunk"` (True when the policy was queried).
        """
        new_chunk = self.remaining == 0
        if new_chunk:
            chunk, info = _split(self._infer(obs))
            n = chunk.shape[0] if self.execute_steps is None else self.execute_steps
            if n > chunk.shape[0]:
                raise ValueError(f"execute_steps={n} exceeds the chunk length H={chunk.shape[0]}; lower execute_steps")
            self._chunk, self._info, self._index, self._limit = chunk, info, 0, n
        assert self._chunk is not None
        out = dict(self._info)
        out.update(actions=self._chunk[self._index].copy(), chunk_index=self._index, new_chunk=new_chunk)
        self._index += 1
        return out


class TemporalEnsembler:
    """ACT-style temporal ensembling: average every chunk's prediction for the current step.

    A chunk added at step s covers steps s .. s + H - 1. At step t the candidates are the predictions
    `chunk_i[t - s_i]` of all chunks covering t, ordered oldest first (i = 0), weighted
    `w_i = exp(-m * i)` and normalized (ACT: m = 0.01, so older predictions weigh slightly more;
    m < 0 favours the newest, m = 0 is a plain mean).

    Args:
        policy: as for `ActionChunkBroker`; only `step()` uses it (use `add_chunk`/`next_action` without).
        m: exponential weight rate.
        query_every: `step()` queries a new chunk every this many steps (1 = every step, as in ACT);
            must not exceed the chunk length H, so every step stays covered.
    """

    def __init__(self, policy: Any = None, m: float = 0.01, query_every: int = 1):
        if query_every < 1:
            raise ValueError(f"query_every must be >= 1, got {query_every}")
        self._infer = None if policy is None else _as_infer(policy)
        self._reset_policy = _policy_reset(policy)
        self.m = float(m)
        self.query_every = query_every
        self.t = 0  # the current control step
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start step, (H, D_a)), oldest first

    def reset(self) -> None:
        """Forget all chunks and restart at step 0 (new episode); resets a wrapped object with `reset()`."""
        self.t, self._chunks = 0, []
        if self._reset_policy is not None:
            self._reset_policy()

    def add_chunk(self, chunk: np.ndarray) -> None:
        """Register a chunk (H, D_a) predicted at the current step `t` (it covers t .. t + H - 1)."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[0] == 0:
            raise ValueError(f"expected an action chunk of shape (H, D_a) with H >= 1, got {chunk.shape}")
        if self._chunks and chunk.shape[1] != self._chunks[0][1].shape[1]:
            raise ValueError(f"action dim changed: {self._chunks[0][1].shape[1]} -> {chunk.shape[1]}")
        if chunk.shape[0] < self.query_every:
            raise ValueError(
                f"chunk length H={chunk.shape[0]} is shorter than query_every={self.query_every}; steps "
                "would be left without a prediction, lower query_every"
            )
        self._chunks.append((self.t, chunk))

    def next_action(self) -> np.ndarray:
        """The ensembled action (D_a,) for step `t`, then advance to t + 1."""
        t = self.t
        preds = [chunk[t - s] for s, chunk in self._chunks if s <= t < s + chunk.shape[0]]
        if not preds:
            raise RuntimeError(f"no chunk covers step {t}; call add_chunk() (or step(obs)) first")
        stacked = np.stack(preds)
        out_dtype = stacked.dtype if stacked.dtype.kind == "f" else np.float64
        weights = np.exp(-self.m * np.arange(len(preds)))
        action = ((weights[:, None] * stacked).sum(axis=0) / weights.sum()).astype(out_dtype)
        self.t += 1
        # Chunks that end before the new step can never contribute again.
        self._chunks = [(s, c) for s, c in self._chunks if s + c.shape[0] > self.t]
        return action

    def step(self, obs: Any) -> np.ndarray:
        """Query the policy when due (every `query_every` steps), then return the ensembled action (D_a,)."""
        if self.t % self.query_every == 0:
            if self._infer is None:
                raise RuntimeError("TemporalEnsembler(policy=None) cannot step(); pass a policy or use add_chunk")
            self.add_chunk(_split(self._infer(obs))[0])
        return self.next_action()

    def infer(self, obs: Any) -> dict[str, Any]:
        """Policy-shaped wrapper: `{"actions": (D_a,)}` for this step."""
        return {"actions": self.step(obs)}
