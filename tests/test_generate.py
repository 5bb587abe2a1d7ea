"""plumbing.generate's hand-written sampling loop: the same tokens as transformers' generate
(greedy, and sampled with the same seed), min_new_tokens, per-token log-probs that equal a
recomputation by plumbing.response_logprobs, and the static KV cache. A tiny random model whose EOS
logit is scaled up, so that rows finish at different steps."""
import pytest
import torch

import data
import plumbing


@pytest.fixture(scope="module")
def tok_model_prompts():
    demos = data.load_demos("toy", "train[:200]")
    tok = plumbing.train_tiny_tokenizer([x["prompt"] + x["response"] for x in demos])
    model = plumbing.build_tiny_model(tok, seed=0, tie_word_embeddings=False).eval()
    prompts = [x["prompt"] for x in demos[:8]]  # of different lengths: left padding
    # EOS takes the place of the token that the greedy rows first emit at the most different steps,
    # so that rows end early and at different steps (a random model rarely emits EOS by itself)
    greedy = plumbing.generate(model, tok, prompts, max_new_tokens=12, max_prompt_len=60, impl="hf")[2].tolist()
    first_steps = {x: {row.index(x) for row in greedy if x in row} for x in set(sum(greedy, []))}
    stand_in = max(first_steps, key=lambda x: len(first_steps[x]))
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.05 * model.lm_head.weight[stand_in]
    return tok, model, prompts


def both(tok, model, prompts, **kw):
    kw = dict(max_new_tokens=12, max_prompt_len=60, **kw)
    return [plumbing.generate(model, tok, prompts, impl=impl, return_logprobs=True, **kw) for impl in ("loop", "hf")]


def finish_steps(resp, eos_id):
    """The step at which each row emitted its first EOS (None: never)."""
    return [int((row == eos_id).nonzero()[0, 0]) if (row == eos_id).any() else None for row in resp]


def test_greedy_loop_equals_hf_generate_on_a_left_padded_batch(tok_model_prompts):
    tok, model, prompts = tok_model_prompts
    loop, hf = both(tok, model, prompts)
    assert (loop[1] == 0).any()  # left padding present
    assert torch.equal(loop[0], hf[0]) and torch.equal(loop[2], hf[2]) and loop[3] == hf[3]
    steps = finish_steps(loop[2], tok.eos_token_id)
    assert len({s for s in steps if s is not None}) > 1  # rows finished at different steps
    for row, s in zip(loop[2], steps):  # after the first EOS: pad, with log-prob 0 (PPO_DETAILS 4)
        if s is not None:
            assert (row[s + 1:] == tok.pad_token_id).all()
    assert (loop[4][loop[2] == tok.pad_token_id] == 0).all()


def test_sampling_with_the_same_seed_gives_hf_generates_tokens(tok_model_prompts):
    tok, model, prompts = tok_model_prompts
    loop, hf = both(tok, model, prompts, temperature=0.7, seed=5)
    assert torch.equal(loop[2], hf[2]) and loop[3] == hf[3]
    other = plumbing.generate(model, tok, prompts, max_new_tokens=12, max_prompt_len=60, temperature=0.7, seed=6)
    assert not torch.equal(other[2], loop[2])  # the seed matters: the equality above is not trivial
    greedy = plumbing.generate(model, tok, prompts, max_new_tokens=12, max_prompt_len=60)
    assert not torch.equal(greedy[2], loop[2])


def test_min_new_tokens_holds_eos_back(tok_model_prompts):
    tok, model, prompts = tok_model_prompts
    free = plumbing.generate(model, tok, prompts, max_new_tokens=12, max_prompt_len=60)[2]
    assert (free[:, :4] == tok.eos_token_id).any()  # without it some row ends within 4 tokens
    loop, hf = both(tok, model, prompts, min_new_tokens=4)
    assert not (loop[2][:, :4] == tok.eos_token_id).any() and (loop[2] == tok.eos_token_id).any()
    assert torch.equal(loop[2], hf[2])


@pytest.mark.parametrize("temperature, min_new_tokens", [(0.7, 0), (1.0, 3), (0.0, 0)])
def test_sampler_logprobs_equal_a_recomputation(tok_model_prompts, temperature, min_new_tokens):
    """PPO's old log-probs come from the sampler (ppo_gi.rollout step 3): they must be the policy's
    log π(a_t|s_t) at T (T = 1 when greedy; the unbanned distribution under min_new_tokens), as a
    full forward over prompt + response recomputes them."""
    tok, model, prompts = tok_model_prompts
    for q_ids, q_mask, resp, _, logp in both(tok, model, prompts, temperature=temperature, seed=1, min_new_tokens=min_new_tokens):
        r_mask = plumbing.response_mask(resp, tok.eos_token_id)
        ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1)
        with torch.no_grad():
            again, _ = plumbing.response_logprobs(model, ids, mask, q_ids.shape[1], temperature or 1.0)
        assert logp.dtype == torch.float32 and logp.shape == resp.shape
        assert (logp - again)[r_mask.bool()].abs().max() <= 1e-5
        assert (logp[~r_mask.bool()] == 0).all() and (logp[r_mask.bool()] < 0).all()


def test_static_cache_gives_the_dynamic_caches_tokens(tok_model_prompts):
    tok, model, prompts = tok_model_prompts
    out = {kind: plumbing.generate(model, tok, prompts, max_new_tokens=12, max_prompt_len=60, cache=kind, return_logprobs=True)
           for kind in ("dynamic", "static")}
    assert out["static"][0].shape[1] == 60 > out["dynamic"][0].shape[1]  # the static cache pads to max_prompt_len
    assert torch.equal(out["static"][2], out["dynamic"][2])
    assert torch.allclose(out["static"][4], out["dynamic"][4], atol=1e-5)
    # a second call of the same shape reuses the cache (the same tensors, for a compiled decode
    # step's CUDA graph), reset: other prompts get the dynamic cache's tokens, not stale keys
    others = [p + " and then" for p in reversed(prompts)]
    again = {kind: plumbing.generate(model, tok, others, max_new_tokens=12, max_prompt_len=60, cache=kind)[2] for kind in ("static", "dynamic")}
    assert torch.equal(again["static"], again["dynamic"])
    with torch.inference_mode():  # as generate() calls it
        kv = plumbing.static_cache(model, len(prompts), 72)
        assert plumbing.static_cache(model, len(prompts), 72) is kv and plumbing.static_cache(model, 1, 72) is not kv
    with pytest.raises(ValueError, match="impl 'vllm'"):
        plumbing.generate(model, tok, prompts, impl="vllm")


def test_static_cache_is_freed_with_its_model():
    import gc

    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with torch.inference_mode():
        kv = plumbing.static_cache(model, 2, 8)
    assert plumbing._STATIC_CACHE["kv"] is kv
    del model, kv
    gc.collect()
    assert not plumbing._STATIC_CACHE  # the cache's memory goes with its model


@pytest.mark.parametrize("like", [torch.empty(16, 4096), torch.empty(4096, 16).t(), torch.empty(7)], ids=["2d", "transposed", "odd"])
def test_the_exponential_draw_gives_exponential_s_numbers(like):
    """plumbing.exponential computes exponential_'s q = −log1p(−u) from one vectorized uniform_ call:
    the same float32 numbers, in the same layout, for the same seed (the last-bit exceptions are
    ~2e-10 of draws: none in these), and the generator left in the same state."""
    draws = []
    for seed in range(20):
        torch.manual_seed(seed)
        want, want_next = torch.empty_like(like).exponential_(1), torch.rand(3)
        torch.manual_seed(seed)
        got, got_next = plumbing.exponential(like), torch.rand(3)
        assert got.dtype == torch.float32 and got.stride() == want.stride()
        assert torch.equal(got, want) and torch.equal(got_next, want_next)
        draws.append(got)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], plumbing.exponential(like))
