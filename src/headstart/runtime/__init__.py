"""Where and how computation runs: device choice, seeding, precision, micro-batches and distributed training.

The lowest layer above the foundations: it knows torch, not models or data.
"""

from headstart.runtime.device import pick_device, seed_everything

__all__ = ["pick_device", "seed_everything"]
