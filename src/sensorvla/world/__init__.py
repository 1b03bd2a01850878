"""The embedded world: everything the demo and the tests need that a real robot run never touches.

- `world/tiny_qwen.py`: a tiny random Qwen-VL built offline and saved like a hub checkpoint;
- `world/synth.py`: the synthetic insertion task (simulator + LeRobot v3 dataset generator);
- `world/envs/`: the same simulator in closed loop as Gymnasium envs (`register_envs()`);
- `world/examples.py`: example HDF5 episode files drawn from the simulator.

The real path (`data/`, `models/`, `training/`, `inference/`, `serving/`, `eval/`, `plan/`) never imports this
package (tests/test_architecture.py); `demo.py`, the CLI, the tests and the benchmarks do.
"""
