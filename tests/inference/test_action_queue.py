"""ActionChunkBroker and TemporalEnsembler: exact action sequences on hand-built chunks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sensorvla.inference.action_queue import ActionChunkBroker, TemporalEnsembler


class CountingPolicy:
    """Query k returns the chunk [[10k], [10k + 1], ..., [10k + H - 1]] and records the obs it saw."""

    def __init__(self, horizon: int = 4, as_dict: bool = True):
        self.horizon, self.as_dict = horizon, as_dict
        self.seen: list = []

    def infer(self, obs):
        k = len(self.seen)
        self.seen.append(obs)
        chunk = (10.0 * k + np.arange(self.horizon, dtype=np.float32))[:, None]
        return {"actions": chunk, "timing": {"k": k}} if self.as_dict else chunk


def run(stepper, steps):
    return [float(stepper.step(t)[0]) for t in range(steps)]


def test_broker_executes_first_n_then_requeries():
    policy = CountingPolicy(horizon=4)
    broker = ActionChunkBroker(policy, execute_steps=3)
    assert run(broker, 8) == [0, 1, 2, 10, 11, 12, 20, 21]
    assert policy.seen == [0, 3, 6]  # queried with the observation of the step that needed a chunk
    assert broker.remaining == 1


def test_broker_whole_chunk_bare_array_and_callable():
    policy = CountingPolicy(horizon=3, as_dict=False)
    broker = ActionChunkBroker(policy.infer)  # a plain callable returning (H, D_a)
    assert run(broker, 7) == [0, 1, 2, 10, 11, 12, 20]


def test_broker_infer_wrapper_and_reset():
    policy = CountingPolicy(horizon=4)
    broker = ActionChunkBroker(policy, execute_steps=2)
    first, second, third = broker.infer("o0"), broker.infer("o1"), broker.infer("o2")
    assert first["new_chunk"] and not second["new_chunk"] and third["new_chunk"]
    assert (first["chunk_index"], second["chunk_index"], third["chunk_index"]) == (0, 1, 0)
    assert first["timing"] == {"k": 0} and third["timing"] == {"k": 1}
    assert first["actions"].shape == (1,) and first["actions"].dtype == np.float32
    broker.reset()
    assert broker.remaining == 0 and float(broker.step("o3")[0]) == 20.0  # new episode -> new chunk


def test_broker_actions_are_copies():
    chunk = np.arange(6, dtype=np.float32).reshape(3, 2)
    broker = ActionChunkBroker(lambda obs: chunk)
    broker.step(None)[0] = 99.0
    assert chunk[0, 0] == 0.0


def test_broker_rejects_bad_config_and_chunks():
    with pytest.raises(ValueError, match="execute_steps must be >= 1"):
        ActionChunkBroker(CountingPolicy(), execute_steps=0)
    with pytest.raises(ValueError, match="execute_steps=5 exceeds the chunk length H=4"):
        ActionChunkBroker(CountingPolicy(horizon=4), execute_steps=5).step(None)
    with pytest.raises(ValueError, match=r"shape \(H, D_a\)"):
        ActionChunkBroker(lambda obs: np.zeros(4)).step(None)
    with pytest.raises(ValueError, match="no 'actions'"):
        ActionChunkBroker(lambda obs: {"act": np.zeros((2, 2))}).step(None)
    with pytest.raises(TypeError, match="callable"):
        ActionChunkBroker(42)


def test_ensembler_plain_mean_every_step():
    # H = 3, chunk at step s = 10 s + [0, 1, 2]. Step t averages 10 s + (t - s) over s in [t - 2, t].
    ens = TemporalEnsembler(CountingPolicy(horizon=3), m=0.0)
    np.testing.assert_allclose(run(ens, 5), [0.0, 5.5, 11.0, 21.0, 31.0])


def test_ensembler_exponential_weights_favour_oldest():
    # m = ln 2: weights 1, 1/2, 1/4 (oldest first). Step 1: (1 + 10/2) / 1.5 = 4.
    # Step t >= 2: (4 (10t - 18) + 2 (10t - 9) + 10t) / 7 = (70t - 90) / 7.
    ens = TemporalEnsembler(CountingPolicy(horizon=3), m=math.log(2))
    np.testing.assert_allclose(run(ens, 5), [0.0, 4.0, 50 / 7, 120 / 7, 190 / 7], rtol=1e-6)


def test_ensembler_query_every_two():
    policy = CountingPolicy(horizon=3)
    ens = TemporalEnsembler(policy, m=0.0, query_every=2)
    # chunks at steps 0, 2, 4 (values 0.., 10.., 20..): step 2 = mean(c0[2], c1[0]) = mean(2, 10) = 6
    np.testing.assert_allclose(run(ens, 6), [0.0, 1.0, 6.0, 11.0, 16.0, 21.0])
    assert policy.seen == [0, 2, 4]


def test_ensembler_manual_chunks_multi_dim_and_reset():
    ens = TemporalEnsembler(m=0.0)
    ens.add_chunk(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32))
    np.testing.assert_array_equal(ens.next_action(), [0.0, 1.0])
    ens.add_chunk(np.array([[4.0, 5.0], [6.0, 7.0]], np.float32))
    out = ens.next_action()
    np.testing.assert_array_equal(out, [3.0, 4.0])  # mean of [2, 3] and [4, 5]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(ens.next_action(), [6.0, 7.0])
    with pytest.raises(RuntimeError, match="no chunk covers step 3"):
        ens.next_action()
    ens.reset()
    assert ens.t == 0
    with pytest.raises(RuntimeError, match="no chunk covers step 0"):
        ens.next_action()


def test_ensembler_rejects_bad_chunks():
    ens = TemporalEnsembler(m=0.0, query_every=3)
    with pytest.raises(ValueError, match="shorter than query_every=3"):
        ens.add_chunk(np.zeros((2, 1)))
    ens.add_chunk(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="action dim changed: 2 -> 3"):
        ens.add_chunk(np.zeros((4, 3)))
    with pytest.raises(RuntimeError, match="pass a policy"):
        ens.step(None)
    with pytest.raises(ValueError, match="query_every must be >= 1"):
        TemporalEnsembler(query_every=0)


def test_ensembler_infer_wrapper_shape():
    ens = TemporalEnsembler(CountingPolicy(horizon=4))
    assert ens.infer("o")["actions"].shape == (1,)


def test_reset_also_resets_a_wrapped_policy_object_but_not_a_plain_callable():
    class Resettable:
        def __init__(self):
            self.resets = 0

        def infer(self, obs):
            return {"actions": np.zeros((4, 1), np.float32)}

        def reset(self):
            self.resets += 1

    policy = Resettable()
    broker, ens = ActionChunkBroker(policy, execute_steps=2), TemporalEnsembler(policy)
    broker.step("o")
    broker.reset()
    ens.reset()
    assert policy.resets == 2  # e.g. a PolicyClient: the server session starts a new episode too
    bare = ActionChunkBroker(policy.infer)  # a bound method has no reset of its own: nothing to call
    bare.reset()
    assert policy.resets == 2
