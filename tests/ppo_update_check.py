"""One PPO update, run as `python` or under `torchrun`: the rollout is built before any process
group exists (identical on every rank), each rank updates on its share, rank 0 saves the result.
It also saves greedy generations from the (sharded) policy, and with `study`, the study's
diagnostics of the θ step (study/diagnostics.py). Used by tests to compare 2 processes with 1.

    python tests/ppo_update_check.py SFT_DIR OUT [known] [study] [ppo_gi.py flags…]
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import groups  # noqa: E402
import plumbing  # noqa: E402
import ppo_gi  # noqa: E402
import reward  # noqa: E402
from study import diagnostics, ppo_variants  # noqa: E402

sft_dir, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
known, study = "known" in rest, "study" in rest
args = ppo_gi.parser.parse_args(["--sft", sft_dir, "--reward", "gold", "--rollout_batch", "8", "--minibatch", "4",
                                 "--ppo_epochs", "1", "--max_new_tokens", "8", "--beta_policy", "1.0"] + [a for a in rest if a not in ("known", "study")])
tok = plumbing.load_tokenizer(sft_dir)
records = data.load_prompts("toy", "rl[:8]")
group_probs = groups.p_phi
if known:  # the study's known groups (study/ppo_variants.py): the data's labels as one-hot p(g|x)
    names = data.group_names(records)
    args.n_groups, group_probs = len(names), ppo_variants.known_group_probs(names)
policy, reference = plumbing.load_model(sft_dir, tok).eval(), plumbing.load_model(sft_dir, tok).eval()
critic = groups.load_critic(sft_dir, tok, args.n_groups, seed=0).eval()
scorer = reward.load_scorer("gold", tok, plumbing.Dist(), False)
batch = ppo_gi.rollout(args, plumbing.Dist(), policy, reference, critic, scorer, tok, [x["prompt"] for x in records], 0,
                       ppo_gi.RunningStd(), groups_of=[x["group"] for x in records], group_probs=group_probs)

d = plumbing.init_distributed()
for m in (policy, critic):
    plumbing.shard(m, d)
# greedy generation on the sharded model (PPO_DETAILS 16): compared with the unsharded run by the test
generated = plumbing.generate(policy, tok, [x["prompt"] for x in records[:6]], max_new_tokens=8)[3]
mine = torch.arange(8)[d.rank::d.world]
share = {k: (v[mine] if torch.is_tensor(v) and v.dim() > 0 else [v[i] for i in mine] if k == "groups" else v) for k, v in batch.items()}
stats = diagnostics.theta_gradients(args, d, policy, share) if study else {}
# SGD, not Adam: Adam's first step is lr·sign(g) and would hide a gradient off by a constant factor
opt_p = torch.optim.SGD(policy.parameters(), lr=0.1)
opt_c = torch.optim.SGD(critic.parameters(), lr=0.1)
ppo_gi.ppo_update(args, d, policy, critic, opt_p, opt_c, share, stats, group_probs=group_probs)
state = {f"policy.{k}": v for k, v in plumbing._full_model_state(policy, d).items()}
state.update({f"critic.{k}": v for k, v in plumbing._full_model_state(critic, d).items()})
if d.main:
    torch.save(state, os.path.join(out, "state.pt"))
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump({**stats, "generated": generated}, f)
plumbing.close_distributed(d)
