"""Processes and where a model computes: one process with no process group, or torchrun with a
device mesh and FSDP2 (`fully_shard` of each decoder block, then the root; gloo on CPU, NCCL on
CUDA); seeds and the global batch of each step; bf16 autocast and gradient checkpointing."""
import contextlib
import dataclasses
import functools
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def main(self):
        return self.rank == 0

    @property
    def sharded(self):
        return self.world > 1


def init_distributed():
    """One process: nothing to set up. Under torchrun: a process group and a 1-D device mesh."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), device, mesh)


def close_distributed(d):
    if d.sharded:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(x, d):
    """Sum a tensor over ranks (a no-op in one process)."""
    if d.sharded:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_min(x, d):
    """The smallest element over all ranks, as a float."""
    x = x.min().detach().clone()
    if d.sharded:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x.item()


def sum_over_ranks(x, d):
    """The sum of x over ranks, differentiable in this rank's share only: the other ranks' shares enter
    as constants. A loss built on it back-propagates each rank's own part, and the parts add up over
    ranks (FSDP2's average, undone by × world, sums them): the gradient of the whole."""
    if not d.sharded:
        return x
    return x + (all_reduce_sum(x.detach().clone(), d) - x.detach())


def group_means(prefix, values, names, all_names, d):
    """{prefix/group/<name>: the mean of `values` over the samples of each group, prefix/mean: over all},
    all ranks together; `all_names` (the same on every rank) orders the groups. The groups have a
    namespace of their own, so a group named `mean` cannot overwrite the overall mean."""
    sums = torch.zeros(len(all_names) + 1, 2, device=d.device)  # the last row: samples with no group
    for value, name in zip(values, names):
        sums[all_names.index(name) if name in all_names else -1] += torch.tensor([value, 1.0], device=d.device)
    sums = all_reduce_sum(sums, d)
    out = {f"{prefix}/group/{g}": (sums[i, 0] / sums[i, 1]).item() for i, g in enumerate(all_names) if sums[i, 1] > 0}
    out[f"{prefix}/mean"] = (sums[:, 0].sum() / sums[:, 1].sum()).item()
    return out


def in_chunks(fn, size, *rows):
    """fn(*rows) in chunks of `size` rows (0: all at once; every rank runs as many, as FSDP needs),
    its tensor outputs concatenated. Rows may be tensors, lists or None."""
    n = len(rows[0])
    if not size or size >= n:
        return fn(*rows)
    outs = [fn(*(r if r is None else r[i:i + size] for r in rows)) for i in range(0, n, size)]
    return tuple(map(torch.cat, zip(*outs))) if isinstance(outs[0], tuple) else torch.cat(outs)


@torch.no_grad()
def scores_in_order(score_chunk, examples, d, batch_size=64):
    """[n, 2]: score_chunk(chunk of examples) -> the scores of the chunk's first sequences, then of its
    second ones (a pair's chosen and rejected), for every example, computed on this rank's share and
    gathered from all ranks in the original order. Every rank runs as many forwards (FSDP)."""
    n = len(examples)
    per_rank = math.ceil(n / d.world)
    mine = examples[d.rank * per_rank:(d.rank + 1) * per_rank]
    out = torch.zeros(d.world * per_rank, 2)
    for j, chunk in enumerate(equal_chunks(mine, math.ceil(per_rank / batch_size), batch_size)):
        r = score_chunk(chunk or examples[:1]).float().cpu()
        if chunk:
            start = d.rank * per_rank + j * batch_size
            out[start:start + len(chunk)] = torch.stack([r[:len(chunk)], r[len(chunk):]], -1)
    return all_reduce_sum(out.to(d.device), d).cpu()[:n]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Python's and numpy's generator states as JSON-able lists (torch's is a tensor: saved apart)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(state, torch_state):
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def batch_indices(step, batch_size, n, seed):
    """The global batch of optimizer step `step`: the same on every rank, a fresh seeded
    permutation each epoch, a pure function of the step (so resuming needs no data state)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if i == 0 or not out:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[i]))
    return out


def equal_chunks(items, n_chunks, size=None):
    """Split `items` into n_chunks lists (of `size` each if given); some may be empty."""
    size = size or math.ceil(len(items) / n_chunks)
    return [items[i * size:(i + 1) * size] for i in range(n_chunks)]


def rank_chunks(items, d, batch_size):
    """This rank's share of `items` (every world-th) in chunks of `batch_size`. Every rank gets the
    same number of chunks, some possibly empty, because FSDP forwards are collective."""
    n_chunks = math.ceil(math.ceil(len(items) / d.world) / batch_size)
    return equal_chunks(items[d.rank::d.world], n_chunks, batch_size)


def frozen_dtype(d):
    """The dtype of a model that only runs forward (the reference, a reward model): bf16 on CUDA,
    half the memory of fp32 weights that autocast would cast to bf16 anyway; fp32 on CPU."""
    return torch.bfloat16 if d.device.type == "cuda" else torch.float32


def checkpoint_blocks(model):
    """Gradient checkpointing: each decoder block keeps only its input and recomputes its activations
    in the backward pass (memory for time), in train and eval mode alike (PPO keeps eval mode for
    dropout off, where transformers' own switch does nothing). Without gradients it runs as before."""
    for block in decoder_blocks(model):
        def checkpointed(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(functools.partial(_forward, **kwargs), *args, use_reentrant=False)
        block.forward = checkpointed
    return model


def shard(model, d, bf16=False, compile_blocks=False, checkpointing=False):
    """Put `model` on the device, the same way for 1 and N processes. N processes: FSDP2
    `fully_shard` of each decoder block (the classes in `_no_split_modules`), then the root.
    bf16: the forward runs under bf16 autocast in every case (fp32 master weights, optimizer and
    gradients; under FSDP the gathered parameters are bf16 too). compile_blocks: torch.compile each
    decoder block (one compiled graph, reused by every block of the same class). Not the whole
    model: its graph would also hold the LM head over the kept positions, whose number changes
    from batch to batch (`logits_to_keep`): a new shape for the compiler each time."""
    if checkpointing:
        checkpoint_blocks(model)
    blocks = decoder_blocks(model) if (d.sharded or compile_blocks) else []
    if d.sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mesh=d.mesh, mp_policy=policy)
        fully_shard(model, mesh=d.mesh, mp_policy=policy)
    else:
        model.to(d.device)
    if compile_blocks:
        for block in blocks:
            block.compile()
    if bf16:
        autocast_forward(model, d.device.type)
    return model


def decoder_blocks(model):
    """The modules whose class `_no_split_modules` names (the transformer's decoder blocks)."""
    block_names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"shard: {type(model).__name__} names no decoder block class in _no_split_modules")
    return blocks


def autocast_forward(model, device_type):
    """Run `model.forward` (and so generate(), which calls it) under bf16 autocast: matrix products
    in bf16, reductions and the fp32 parameters as autocast keeps them. Callers take log-probs of
    `.float()` logits. Idempotent."""
    if getattr(model.forward, "bf16_autocast", False):
        return model
    forward = model.forward

    @functools.wraps(forward)
    def bf16_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    bf16_forward.bf16_autocast = True
    model.forward = bf16_forward
    return model


@contextlib.contextmanager
def unsharded(model):
    """Gather the full parameters once (e.g. for a whole generate() call), reshard at the end.
    Without it FSDP2 re-gathers every block for every generated token (PPO_DETAILS 16)."""
    from torch.distributed.fsdp import FSDPModule
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        yield model
        return
    model.set_reshard_after_forward(False)
    for m in fsdp:
        m.unshard()
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        for m in fsdp:
            m.reshard()
