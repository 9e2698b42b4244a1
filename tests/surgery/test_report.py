import json

import torch
from torch import nn

from algos.surgery import apply_surgery
from algos.surgery.macs import count_macs


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2, bias=False)

    def forward(self, x):  # x: (B, 3, 4, 4) -> conv (B, 8, 4, 4) -> tokens (B, 8, 16)
        tokens = self.conv(x).flatten(2)
        return self.head(self.proj(tokens))


def low_rank(linear: nn.Linear, fqn: str):
    return nn.Sequential(nn.Linear(linear.in_features, 4, bias=False), nn.Linear(4, linear.out_features)), {"rank": 4}


def test_rows_and_totals_match_hand_counts():
    model = Net()
    report = apply_surgery(model, low_rank, algorithm="LowRank", classes=(nn.Linear,), target_modules=["proj"],
                           example_inputs=torch.randn(5, 3, 4, 4))
    (row,) = report.replaced
    assert (row.fqn, row.old_type, row.new_type, row.notes) == ("proj", "Linear", "Sequential", {"rank": 4})
    assert (row.params_before, row.params_after) == (16 * 16 + 16, 16 * 4 + 4 * 16 + 16)
    tokens_per_sample = 8  # MACs per sample, not per batch of 5
    assert (row.macs_before, row.macs_after) == (tokens_per_sample * 16 * 16, tokens_per_sample * (16 * 4 + 4 * 16))
    assert report.totals() == {"replaced": 1, "skipped": 0, "params_before": 272, "params_after": 144,
                               "macs_before": 2048, "macs_after": 1024}
    assert json.loads(report.to_json()) == report.to_dict()
    text = str(report)
    assert "proj" in text and "272 -> 144" in text and "2,048 -> 1,024" in text and "rank=4" in text


def test_macs_are_measured_on_request_and_nothing_stays_on_the_model():
    model = Net()
    report = apply_surgery(model, low_rank, algorithm="LowRank", classes=(nn.Linear,))
    assert not report.measured and report.totals()["macs_before"] is None and "-" in str(report)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook left behind
    model.train()
    model(torch.randn(2, 3, 4, 4)).sum().backward()  # training does not measure (nor break)
    assert not report.measured
    assert report.measure(model, torch.randn(2, 3, 4, 4)) is report and report.measured
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    rows = {row.fqn: row for row in report.replaced}
    assert (rows["head"].macs_before, rows["head"].macs_after) == (8 * 16 * 2, 8 * (16 * 4 + 4 * 2))
    report.measure(model, torch.randn(2, 3, 4, 4))
    assert rows["proj"].macs_after == 8 * 128  # measured once, not summed over calls


def test_count_macs_conv_against_formula():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    out_hw = 5 * 5  # 10x10 input, stride 2
    assert count_macs(conv, (torch.randn(1, 3, 10, 10),), {}) == 8 * out_hw * 3 * 3 * 3
