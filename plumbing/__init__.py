"""The plumbing every stage shares, kept out of the stage files so they read as algorithms. Nothing
here is the method's. Stages call `plumbing.X`; each X lives in the module named here:

    processes   one process or torchrun (FSDP2), seeds, the global batch of a step, autocast,
                gradient checkpointing, sums and gathers over ranks
    models      model and tokenizer loading (the from-scratch `tiny` model, hub ids, .gguf files),
                the checks on model directories, the optimizer and its step
    generation  an HH prompt in a chat format, prompt + response tokens, padded batches, log-probs,
                the sampling loop
    runs        flag types, the output lock and checks, model folders, checkpoints, metrics.jsonl,
                bad input (DataError) and a stage's entry point
    training    the supervised loop of SFT, reward modelling and DPO, its flags and learning-rate
                schedule; the running std PPO scales scores by
    ppo         PPO's machinery that is not the method: the response mask, score shaping, whitening,
                a minibatch back-propagated in parts, the per-iteration metrics
    web         the LLM judge's HTTP request (no redirect followed: the key goes nowhere else)

Under `python X.py` everything runs in one process with no process group and no sharding; under
`torchrun --nproc_per_node N X.py` each decoder block is wrapped with FSDP2 `fully_shard`, then the
root (gloo on CPU, NCCL and bf16 compute on CUDA).
"""
from plumbing.processes import (Dist, all_reduce_sum, autocast_forward, batch_indices, checkpoint_blocks,  # noqa: F401
                                close_distributed, decoder_blocks, equal_chunks, frozen_dtype, global_min,
                                group_means, in_chunks, init_distributed, rank_chunks, rng_state, scores_in_order,
                                seed_everything, set_rng_state, shard, sum_over_ranks, unsharded)
from plumbing.models import (TINY, build_tiny_model, check_model_dir, check_reward_dir, check_same_tokenizer,  # noqa: F401
                             fused_gelu, gguf_location, gradient_cosine, hub_cached, hub_reachable, load_model,
                             load_tokenizer, model_kind, optimizer, optimizer_step, train_tiny_tokenizer)
from plumbing.generation import (CACHE_KINDS, GENERATE_CACHE, GENERATE_IMPL, GENERATE_IMPLS, _STATIC_CACHE,  # noqa: F401
                                 chat_prompt, compiled_forward_step, decode, encode, encode_pairs, exponential, forward_step, generate,
                                 hf_generate, logprob_of, pad_batch, pick_token, position_ids, report_truncation,
                                 response_logprobs, sample, static_cache)
from plumbing.runs import (SAVING, DataError, MetricsLog, _full_model_state, at_least, check_output,  # noqa: F401
                           checkpoint_state, checkpoints, earlier_run, fail_if_mostly_skipped, find_checkpoint,
                           fingerprint, fraction, load_optimizer_state, lock_output, perf_metrics, peak_rss_mb, progress,
                           run_main, save_checkpoint, save_model, start_run, verify_checkpoint, write_atomic, write_jsonl)
from plumbing.ppo import (backward_in_parts, critic_stats, iteration_metrics, log_update, masked_whiten, pick,  # noqa: F401
                          policy_stats, response_mask, shape_scores)
from plumbing.training import (MAY_CHANGE_ON_RESUME, RunningStd, adamw, add_training_flags, lr_at, resumed_state,  # noqa: F401
                               start_training, supervised_loop)
from plumbing.web import RedirectRefused, chat_completion, post_json  # noqa: F401
