"""Pusa V1 video generation: Wan2.1 components, VTA sampling, tasks, LoRA and presets (no Ray)."""
