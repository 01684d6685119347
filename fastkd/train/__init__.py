"""Training: checkpoints (and, with issue 4, the engine, AMP, CUDA graphs, logging)."""
from fastkd.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]
