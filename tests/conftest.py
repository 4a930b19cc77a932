"""Settings every test run shares: no model hub, small thread pools on the 2-core machines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
