"""study/gr_dpo.py: GR-DPO (Ramesh et al. 2024, "Group Robust Preference Optimization in Reward-free
RLHF"), dpo.py with group weights: the loss is Σ_g α_g·L_g, L_g group g's mean DPO loss in the global
batch, and α moves by exponentiated gradient towards the groups whose loss is higher (docs/METHOD.md,
"Variants for the study"). α steps after each update on that batch's losses, the same on every rank,
and is kept in checkpoints. With one group it is DPO exactly. Every other flag is dpo.py's:

    python study/gr_dpo.py --sft runs/sft --out runs/gr_dpo --robust_step 0.1
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import dpo  # noqa: E402
import plumbing  # noqa: E402

parser = copy.deepcopy(dpo.parser)  # dpo.py's flags, its own parser left as it is
parser.prog, parser.description = "gr_dpo.py", __doc__.split("\n")[0]
parser.add_argument("--group_by", choices=["harm"], default=None, help="HH-RLHF: fold the four subsets into harmless / helpful")
parser.add_argument("--robust_step", type=plumbing.at_least(0.0, float), default=0.1, help="η_α: the step of the group weights α")
parser.set_defaults(out="runs/gr_dpo")


def group_weights_step(alpha, group_losses, present, step_size):
    """GR-DPO's step on the group weights: exponentiated gradient ascent of Σ_g α_g·L_g on the simplex,
    so weight moves to the groups whose loss is higher. Only the groups in the batch (present 1) have
    a loss: they share the weight they held, and a group absent from the batch keeps its own (with
    all present this is the plain step). Equal losses leave α where it was, whatever the group sizes."""
    # for g in the batch B: α_g ← α_g·exp(η_α·L_g) / Σ_{g'∈B} α_g'·exp(η_α·L_g') · (1 − Σ_{g'∉B} α_g');  else α_g stays
    moved = alpha * torch.exp(step_size * group_losses * present)
    held = 1 - (alpha * (1 - present)).sum()
    return torch.where(present > 0, moved / (moved * present).sum() * held, alpha)


class GroupWeights:
    """dpo.main's group_weights: α over the data's groups, each pair weighed α_g·N/n_g in its global batch."""

    def __init__(self, args):
        self.args, self.load_kw = args, {"group_by": args.group_by, "need_group": True}

    def start(self, train, state):
        self.names = data.group_names(train)
        self.group_of = torch.tensor([self.names.index(x["group"]) for x in train])
        self.alpha = torch.tensor(state.get("alpha", [1 / len(self.names)] * len(self.names)), dtype=torch.float64)
        if os.environ.get("RANK", "0") == "0":
            print(f"gr_dpo: GR-DPO over {len(self.names)} groups ({', '.join(self.names)}), η_α {self.args.robust_step}")

    def counts(self, batch):
        return torch.bincount(self.group_of[batch], minlength=len(self.names)).double()

    def weights(self, micro, batch):
        # Σ_g α_g·L_g, L_g the mean loss of group g's pairs in the global batch: pair i weighs α_g·N/n_g (the loop divides by N)
        counts, g = self.counts(batch), self.group_of[micro]
        return (self.alpha[g] * counts.sum() / counts[g]).float()

    def group_sums(self, micro, losses):
        sums = torch.zeros(len(self.names), device=losses.device).index_add_(0, self.group_of[micro].to(losses.device), losses)
        return {f"robust/loss_sum_{g}": sums[g] for g in range(len(self.names))}

    def after_step(self, metrics, batch):
        """α steps on this batch's group losses, for the next update."""
        counts = self.counts(batch)
        sums = torch.tensor([metrics.pop(f"robust/loss_sum_{g}") for g in range(len(self.names))], dtype=torch.float64)
        losses = sums * counts.sum() / counts.clamp(min=1)  # the loop divided the sums by N
        self.alpha = group_weights_step(self.alpha, losses, (counts > 0).double(), self.args.robust_step)
        return {**{f"robust/alpha/{n}": a for n, a in zip(self.names, self.alpha.tolist())},
                **{f"robust/loss/{n}": v for n, v, c in zip(self.names, losses.tolist(), counts.tolist()) if c}}

    def state(self):
        return {"alpha": self.alpha.tolist()}


def main(args):
    dpo.main(args, group_weights=GroupWeights(args))


if __name__ == "__main__":
    plumbing.run_main(main, parser)
