"""The memory planner (`sensorvla plan`): parameters, training state, activations, VL cache and per-GPU peaks
for a training config, computed on the meta device. Entry point: `plan.planner.plan`."""
