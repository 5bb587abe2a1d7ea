"""Tokens, batches and generation: an HH prompt in a model's chat format, prompt + response
tokenization (and what --max_len cut), padded batches, log-probs of response tokens, and the
sampling loop PPO's rollouts and evaluation run (prefill, then one cached forward per token; on CUDA
a compiled decode step with a static KV cache)."""
import collections
import functools
import math
import os
import weakref

import torch

from plumbing.processes import unsharded


def chat_prompt(tokenizer, prompt):
    """An HH transcript prompt ("\\n\\nHuman: … \\n\\nAssistant:") in the model's own chat format, if its
    tokenizer has a template; (text, whether the tokenizer should add its special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt, True
    messages = []
    for turn in prompt.split("\n\nHuman: ")[1:]:
        human, _, assistant = turn.partition("\n\nAssistant:")
        messages.append({"role": "user", "content": human.strip()})
        if assistant.strip():
            messages.append({"role": "assistant", "content": assistant.strip()})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def encode(tokenizer, prompt, response=None, max_len=512, max_prompt_len=None, counts=None):
    """(prompt ids, response ids + EOS). The prompt is cut from the left to fit, the response from
    the right; tokenized separately so the boundary between them is exact. `counts` (a Counter), if
    given, counts what was cut: 'cut' (prompt or response), 'lost_eos' (the response's EOS)."""
    text, add_special = chat_prompt(tokenizer, prompt)
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


def encode_pairs(tokenizer, pairs, max_len, report=None):
    """(prompt ids, chosen ids + EOS, prompt ids, rejected ids + EOS) per preference pair, the
    prompt cut separately for each side so that both fit in max_len, and the pairs kept: a pair
    that the cut made identical on both sides teaches nothing and is dropped. `report` names the
    stage whose line on what --max_len cut is printed. Returns (examples, kept pairs)."""
    examples, kept, counts = [], [], collections.Counter()
    for x in pairs:
        sides = collections.Counter()
        p, c = encode(tokenizer, x["prompt"], x["chosen"], max_len=max_len, counts=sides)
        p2, r = encode(tokenizer, x["prompt"], x["rejected"], max_len=max_len, counts=sides)
        counts.update({k: 1 for k, v in sides.items() if v})  # a pair counts once, whichever side was cut
        if p + c == p2 + r:
            counts["identical"] += 1
            continue
        examples.append((p, c, p2, r))
        kept.append(x)
    if report:
        report_truncation(report, counts, len(pairs), max_len, "pairs")
    return examples, kept


def report_truncation(stage, counts, n, max_len, what="examples"):
    """One line on what --max_len cut (from encode's counts), and a warning when it is much."""
    shares = {k: counts[k] / max(n, 1) for k in ("cut", "lost_eos", "identical")}
    line = f"{stage}: at --max_len {max_len}, {100 * shares['cut']:.1f}% of {n} {what} cut"
    if what != "prompts":  # a prompt has no EOS to lose
        line += f", {100 * shares['lost_eos']:.1f}% lost their EOS"
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


# generate()'s KV cache per device type. dynamic: transformers' DynamicCache, grown per token.
# static: a StaticCache, allocated once and reused by calls of the same shape (prompts padded to
# max_prompt_len). compiled: a StaticCache and a torch.compile'd decode step, CUDA graphs in place of
# every kernel launch: the CUDA default, the fastest there (RESULTS.md, "GPUs"); eager on CPU.
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
    """q ~ Exp(1) like `torch.empty_like(like).exponential_(1)`: the same float64 uniforms in the same
    order, from one vectorized call instead of one scalar log1p per number (faster on CPU; the float32
    results match but for a last-bit rounding case, tests/test_generate.py; bench/README.md times it).
    CUDA and float64 keep exponential_."""
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
