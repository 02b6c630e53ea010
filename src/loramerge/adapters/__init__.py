"""The adapter pipeline: the in-memory LoRA adapter, its PEFT files, the per-module planner and executor,
and the live-model integration (``add_weighted_adapter``)."""
