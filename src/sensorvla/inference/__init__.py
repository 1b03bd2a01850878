"""Run-time inference: `PolicyRunner` (the training transform chain, sessions, request checks) and chunk brokers."""
