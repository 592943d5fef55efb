"""A user's own scoring function, as `soup cook --eval tests/digits_scoring.py:accuracy` loads it."""

import torch
from safetensors.torch import load_file

from modelsoup.demo.digits import make_net


def accuracy(state, data):
    split = load_file(data)
    net = make_net()
    net.load_state_dict(state)
    with torch.no_grad():
        logits = net(split["x"])
    return {"score": float((logits.argmax(1) == split["y"]).float().mean()), "metric": "accuracy",
            "loss": float(torch.nn.functional.cross_entropy(logits, split["y"]))}
