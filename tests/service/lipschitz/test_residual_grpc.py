"""Residual, max-pool and unbounded networks through the gRPC service: the analysis answers with
the bounds that are sound and the reasons for the rest, and the server keeps serving."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from curvscope import CurvscopeError


class ResidualPool(nn.Module):
    """conv, ReLU, 2x2 max pool, an identity-skip conv block, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2)
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        z = self.pool(torch.relu(self.stem(x)))
        z = torch.relu(z + self.c2(torch.relu(self.c1(z))))
        return self.fc(z.flatten(1))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(1 * 6 * 6, 4), nn.Linear(1 * 6 * 6, 4)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) * self.b(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("residual")
    paths = {}
    for name, model in (("residual", ResidualPool()), ("gated", Gated())):
        program = torch.export.export(model.eval(), (torch.randn(2, 1, 6, 6),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, root / f"{name}.pt2")
        paths[name] = root / f"{name}.pt2"
        inputs = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            save_file({"inputs": inputs, "targets": torch.zeros_like(model(inputs))}, str(root / f"{name}.safetensors"))
        paths[f"{name}_data"] = root / f"{name}.safetensors"
    return paths


def lipschitz_of(client, model, data=None) -> dict:
    report = client.analyze(model, data, eigen=0, loss="mse", spec_fields={"lipschitz": {"ascent_steps": 10}})
    return report.to_dict()["results"]["lipschitz"]


def test_residual_net_with_max_pooling_over_grpc(client, files):
    lip = lipschitz_of(client, files["residual"], files["residual_data"])
    details = {d["method"]: d for d in lip["details"]}
    assert details["naive"]["status"] == "ok" and "identity skip 1 + L(block)" in details["naive"]["note"]
    assert "max pooling" in details["naive"]["note"]
    assert details["eclipse_fast"]["status"] == "ok" and "ECLipsE-Fast on each" in details["eclipse_fast"]["note"]
    for method in ("lipsdp_neuron", "lipsdp_layer"):
        assert details[method]["status"] == "ok" and "each certified" in details[method]["note"]
    assert details["lipsdp_neuron"]["value"] <= details["eclipse_fast"]["value"] * (1 + 2e-6) <= details["naive"]["value"] * (1 + 2e-6)
    assert 0 < lip["lower"] <= lip["upper"] == min(d["value"] for d in lip["details"] if d["method"] != "lower")
    assert lip["chain"]["found"] is False and "max pooling" in lip["chain"]["reason"]


def test_unbounded_net_over_grpc_and_the_server_stays_up(client, files):
    lip = lipschitz_of(client, files["gated"], files["gated_data"])
    assert math.isinf(lip["upper"]) and lip["lower"] > 0 and lip["method"] == ""
    assert "product of two data paths" in next(d for d in lip["details"] if d["method"] == "naive")["note"]
    with pytest.raises(CurvscopeError) as caught:  # no data, no sound bound: refused with the reason
        lipschitz_of(client, files["gated"])
    assert caught.value.code == "INVALID_ARGUMENT" and "product of two data paths" in caught.value.message
    # the server answers the next request
    assert lipschitz_of(client, files["residual"])["upper"] > 0
