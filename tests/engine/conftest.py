"""Engine tests run tiny models on a shared CPU: one intra-op thread is far faster than
contended multi-threading for these shapes (and keeps timings stable)."""

import torch

torch.set_num_threads(1)
