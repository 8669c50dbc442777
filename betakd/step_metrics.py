"""What a training run logs between two logging steps: the objective's metrics, per
sample group, and the student-answered share (on-policy), averaged when logged.

`BetaKDTrainer` adds every micro-batch's output here and logs `drain()` at each logging
step; `means()` shows the running averages without resetting them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from betakd.labels import supervised


class StepMetrics:
    """Sums of the logged values since the last logging step, by key."""

    def __init__(self, channels: Sequence[str]) -> None:
        self.channels = list(channels)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._group_sums: dict[str, float] = defaultdict(float)
        self._group_counts: dict[str, int] = defaultdict(int)
        self._policy: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, float]) -> None:
        """One micro-batch's objective metrics (``loss`` is logged by transformers)."""
        for key, value in metrics.items():
            if key != "loss":
                self._sums[key] += value
        self._count += 1

    def add_groups(
        self,
        energies: Tensor,
        betas: Tensor,
        valid: Tensor,
        groups: Sequence[str | None],
        prefix: str = "group",
    ) -> None:
        """Per group of samples (``groups``: each row's, None for none): each channel's
        energy, beta and weighted term, logged as ``prefix/group/channel/...``."""
        for row, name in enumerate(groups):
            if name is None or not bool(valid[row]):
                continue
            group = f"{prefix}/{name}"
            self._group_counts[group] += 1
            for k, channel in enumerate(self.channels):
                energy, beta = float(energies[row, k]), float(betas[row, k])
                self._group_sums[f"{group}/{channel}/energy"] += energy
                self._group_sums[f"{group}/{channel}/beta_mean"] += beta
                self._group_sums[f"{group}/{channel}/weighted"] += beta * energy

    def add_policy(self, on_policy: Tensor, lengths: Tensor, ended: Tensor) -> None:
        """Which rows the student answered (``[B]`` bool), its answers' lengths and
        whether they ended (one entry per answered row)."""
        self._policy["samples"] += on_policy.numel()
        self._policy["on_policy"] += float(on_policy.sum())
        self._policy["generated_tokens"] += float(lengths.float().sum())
        self._policy["ended"] += float(torch.as_tensor(ended).float().sum())

    def add_policy_rows(self, out, generated, stop_ids: Collection[int]) -> None:
        """One micro-batch's student-answered rows (``generated``: an on-policy
        ``GeneratedRows``, or None), their answers' length and whether they ended at one
        of ``stop_ids``, and every channel's metrics on and off policy (``out``: the
        model's output)."""
        on = torch.zeros(out.valid.shape[0], dtype=torch.bool)
        lengths = ended = torch.zeros(0)
        if generated is not None:
            on[generated.rows.cpu()] = True
            labels = supervised(generated.batch["labels"])
            lengths = labels.sum(dim=1)
            last = generated.batch["input_ids"].gather(1, (labels.cumsum(1).argmax(1))[:, None])
            ended = torch.tensor([int(t) in stop_ids for t in last.squeeze(1).tolist()])
        self.add_policy(on, lengths, ended)
        groups = ["on_policy" if flag else "off_policy" for flag in on.tolist()]
        self.add_groups(out.energies, out.betas, out.valid, groups, prefix="policy")

    def means(self) -> dict[str, float]:
        """The averages ``drain`` would log now."""
        logs = {key: value / self._count for key, value in self._sums.items()} if self._count else {}  # fmt: skip
        for key, value in self._group_sums.items():
            logs[key] = value / self._group_counts["/".join(key.split("/")[:2])]
        policy = self._policy
        if policy:
            logs["on_policy/share"] = policy["on_policy"] / max(policy["samples"], 1.0)
            if policy["on_policy"]:
                logs["on_policy/mean_generated_tokens"] = policy["generated_tokens"] / policy["on_policy"]  # fmt: skip
                logs["on_policy/ended_share"] = policy["ended"] / policy["on_policy"]
        return logs

    def drain(self) -> dict[str, float]:
        """The averages since the last drain; starts the next window."""
        logs = self.means()
        self._sums.clear()
        self._count = 0
        self._group_sums.clear()
        self._group_counts.clear()
        self._policy.clear()
        return logs

    def __bool__(self) -> bool:
        return self._count > 0
