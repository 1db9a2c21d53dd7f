"""The shipped demo models (trained on the synthetic world) and sample images."""
