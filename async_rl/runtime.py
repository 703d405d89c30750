"""Process-wide settings that every process of a run applies before it computes.

    configure_torch(cfg.run.num_threads)

- torch's intra-op threads: a run's processes share the machine's cores (`run.num_threads`,
  1 by default), and idle OpenMP threads of several processes would spin against each other;
- transparent huge pages for torch's large CPU tensors (`THP_MEM_ALLOC_ENABLE`, which torch
  reads at its next large allocation): a vocabulary-sized chunk of logits (512 x 151,936
  float32 entries, 311 MB) is allocated and freed several times a step, and with 4 KiB pages
  each allocation costs 76,000 page faults. Measured on the learner's log-probs of 450
  positions over 151,936 tokens: 577,000 faults and 1.76 s a call without, 7,800 and 1.04 s
  with. A user's own setting of the variable is kept.
"""

from __future__ import annotations

import os


def configure_torch(num_threads: int) -> None:
    """Threads and huge pages for this process (module docstring). Imports torch."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    torch.set_num_threads(num_threads)
