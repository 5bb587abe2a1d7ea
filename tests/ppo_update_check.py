"""One PPO update, run as `python` or under `torchrun`: the rollout is built before any process
group exists (identical on every rank), each rank updates on its share, rank 0 saves the result.
It also saves greedy generations from the (sharded) policy. Used by tests/test_ppo_gi.py to
compare 2 processes with 1."""
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

sft_dir, out = sys.argv[1], sys.argv[2]  # then any extra ppo_gi.py flags, e.g. --groups known
args = ppo_gi.parser.parse_args(["--sft", sft_dir, "--reward", "gold", "--rollout_batch", "8", "--minibatch", "4",
                                 "--ppo_epochs", "1", "--max_new_tokens", "8", "--beta_policy", "1.0", "--grad_cos", "1"] + sys.argv[3:])
tok = plumbing.load_tokenizer(sft_dir)
records = data.load_prompts("toy", "rl[:8]")
labels = None
if args.groups == "known":
    names = data.group_names(records)
    args.n_groups, labels = len(names), torch.tensor([names.index(x["group"]) for x in records])
policy, reference = plumbing.load_model(sft_dir, tok).eval(), plumbing.load_model(sft_dir, tok).eval()
critic = groups.load_critic(sft_dir, tok, args.n_groups, seed=0).eval()
scorer = reward.load_scorer("gold", tok, plumbing.Dist(), False)
batch = ppo_gi.rollout(args, plumbing.Dist(), policy, reference, critic, scorer, tok, [x["prompt"] for x in records], 0,
                       ppo_gi.RunningStd(), labels=labels)

d = plumbing.init_distributed()
for m in (policy, critic):
    plumbing.shard(m, d)
# greedy generation on the sharded model (PPO_DETAILS 16): compared with the unsharded run by the test
generated = plumbing.generate(policy, tok, [x["prompt"] for x in records[:6]], max_new_tokens=8)[3]
mine = torch.arange(8)[d.rank::d.world]
share = {k: (v[mine] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
# SGD, not Adam: Adam's first step is lr·sign(g) and would hide a gradient off by a constant factor
opt_p = torch.optim.SGD(policy.parameters(), lr=0.1)
opt_c = torch.optim.SGD(critic.parameters(), lr=0.1)
stats = {}
ppo_gi.ppo_update(args, d, policy, critic, opt_p, opt_c, share, stats)
state = {f"policy.{k}": v for k, v in plumbing._full_model_state(policy, d).items()}
state.update({f"critic.{k}": v for k, v in plumbing._full_model_state(critic, d).items()})
if d.main:
    torch.save(state, os.path.join(out, "state.pt"))
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump({**stats, "generated": generated}, f)
plumbing.close_distributed(d)
