"""sensorvla: train, evaluate and serve sensor-augmented vision-language-action policies (docs/architecture.md)."""
