"""Shared fixtures: seeding, and tiny transformers checkpoints made locally (no network)."""
import random

import numpy as np
import pytest
import torch

from hf_oracle import make_hf_model


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def hf_tiny_checkpoint(tmp_path_factory):
    """(folder, transformers model): a tiny checkpoint written by transformers' save_pretrained."""
    model = make_hf_model()
    folder = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(folder)
    return str(folder), model
