"""Shared fixtures: seeding, and tiny transformers checkpoints made locally (no network)."""
import random

import numpy as np
import pytest
import torch

from hf_oracle import make_hf_model
from maskformer.synthetic import make_sample


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


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory):
    """A small perturbed checkpoint for the engine and export tests: window 7, so the default
    verification sizes pad every stage; one block per stage, to keep each export short."""
    folder = tmp_path_factory.mktemp("engine_ckpt")
    make_hf_model(window_size=7, depths=(1, 1, 1, 1), num_queries=6).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory):
    """One engine cache for the session: each engine is built once per checkpoint."""
    return str(tmp_path_factory.mktemp("engine_cache"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Images of mixed sizes, some sharing a size (so groups of several images form), with truth."""
    folder = tmp_path_factory.mktemp("mixed")
    sizes = [(150, 200), (101, 333), (150, 200), (96, 96), (213, 160), (150, 200), (64, 300), (96, 96)]
    truths = {}
    for i, (h, w) in enumerate(sizes):
        image, truth = make_sample(100 + i, height=h, width=w)
        image.save(folder / f"img{i}.png")
        truths[f"img{i}.png"] = truth
    return folder, truths
