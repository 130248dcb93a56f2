import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device")
