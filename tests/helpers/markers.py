"""Markers and constants the tests share."""

import pytest
import torch

GiB = 2**30

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
