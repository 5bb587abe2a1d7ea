"""What a run leaves in its output directory and how it starts: flag types, the output lock,
save_pretrained model folders, resumable checkpoints (code never runs from them), metrics.jsonl
(and TensorBoard), and the rule that a run which trained nothing fails."""
import argparse
import atexit
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist

from plumbing.processes import rng_state, set_rng_state


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


class DataError(ValueError):
    """Bad input (data.py's readers raise it): the message names the file and line."""


def run_main(main, parser):
    """A stage's entry point: parse the flags and run `main`; bad input (DataError, whose message names
    the file and line) ends the run with that message and exit status 2, not a traceback."""
    try:
        main(parser.parse_args())
    except DataError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def fail_if_mostly_skipped(name, skipped, planned, max_skipped):
    """A run that trains nothing must not look finished: as soon as more than `max_skipped` of the
    `planned` updates were skipped as non-finite, it stops (exit status 1) before saving a model."""
    if skipped > max_skipped * planned:
        raise SystemExit(f"{name}: {skipped} updates skipped as non-finite, more than --max_skipped {max_skipped} of the "
                         f"{planned} planned; nothing saved. Lower the learning rate, or look for NaN in the data or the model")


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_output(out, d):
    """Claim the output directory for this run (rank 0 writes OUT/.lock with its process id): a second
    run on the same --out is refused while the first lives, instead of interleaving their logs and
    deleting each other's temporary checkpoints. A lock whose process is gone is taken over."""
    if not d.main:
        return
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".lock")
    for _ in range(2):  # create it atomically; an existing lock is refused if its process lives, else replaced
        try:
            with open(path, "x") as f:
                f.write(str(os.getpid()))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError, ValueError):
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                if pid and pid != os.getpid() and _alive(pid):
                    raise SystemExit(f"{out} is in use by another run (process {pid}, {path}); wait for it or choose another --out. "
                                     f"If no run is using it, the lock is stale (process {pid} is another program, or the lock "
                                     f"came from another machine): remove {path} and start again")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    atexit.register(lambda: os.path.exists(path) and open(path).read() == str(os.getpid()) and os.remove(path))


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
        tmp = os.path.join(out_dir, SAVING)  # inside the run's own folder: no other path is touched
        shutil.rmtree(tmp, ignore_errors=True)
        with _no_space_left(tmp, f"saving the model to {out_dir}"):
            hf.save_pretrained(tmp, state_dict=state)
            if rest:
                torch.save(rest, os.path.join(tmp, "extra_heads.pt"))
            tokenizer.save_pretrained(tmp)
            for name, obj in (extra or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=1)
        if os.path.exists(os.path.join(out_dir, "config.json")):
            os.remove(os.path.join(out_dir, "config.json"))
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        shutil.rmtree(tmp)
    if d.sharded:
        dist.barrier()


SAVING = ".saving"  # save_model's temporary folder inside the output folder


@contextlib.contextmanager
def _no_space_left(tmp, what):
    """A full disk while writing `tmp` is an error that says so, with the partial `tmp` removed."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"{what}: no space left on the device ({e.filename or tmp}); removed the partial {tmp}. "
                         "Free some space (or choose an --out on another disk) and run again (--resume where a checkpoint exists)") from None


def save_checkpoint(out, step, models, optimizers, tokenizer, state, d, keep=1):
    """A resumable checkpoint in OUT/checkpoints/step-NNNNNN: each model in `models` ({name: module})
    as a save_pretrained folder (from_pretrained loads it with no code from here), the optimizers'
    full state, the RNG state and `state` (step, flags, …). Written under a temporary name and
    renamed into place; then all but the newest `keep` checkpoints are deleted."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    tmp = final + ".tmp"
    # what the run's inputs were, by content, so that a resume from a moved copy is told from another input
    state = {**state, "inputs": {k: fingerprint(v) for k, v in state.get("args", {}).items()
                                 if k != "out" and isinstance(v, str) and os.path.exists(v)}}
    opt_states = {}
    for name, model in models.items():
        hf, full, rest = _transformers_part(model, _full_model_state(model, d))
        # keyed by parameter name (not id), so a checkpoint resumes under any number of ranks
        opt_states[name] = get_optimizer_state_dict(model, optimizers[name],
                                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.main:
            with _no_space_left(tmp, f"checkpoint {final}"):
                if name == next(iter(models)):
                    shutil.rmtree(tmp, ignore_errors=True)
                hf.save_pretrained(os.path.join(tmp, name), state_dict=full)
                tokenizer.save_pretrained(os.path.join(tmp, name))
                if rest:
                    torch.save(rest, os.path.join(tmp, name, "extra_heads.pt"))
    if d.main:
        with _no_space_left(tmp, f"checkpoint {final}"):
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


def fingerprint(path):
    """What a file or folder holds, cheaply: the sha256 of each file's relative path, size and first and
    last MiB (checkpoints/ and hidden files aside). The same after a move or copy; another model differs."""
    files = [path] if os.path.isfile(path) else []
    for where, dirs, names in os.walk(path):
        dirs[:] = sorted(x for x in dirs if x != "checkpoints" and not x.startswith("."))
        files += [os.path.join(where, f) for f in sorted(names) if not f.startswith(".")]
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.relpath(f, path)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()


def earlier_run(out, markers=("config.json", "metrics.jsonl")):
    """What of an earlier run `out` holds (its `markers`, its checkpoints), as words; None if nothing."""
    found = [m for m in markers if os.path.exists(os.path.join(out, m))]
    ckpt = find_checkpoint(out)
    if ckpt:
        found.append(f"checkpoints up to step {checkpoint_state(ckpt).get('step')}")
    return ", ".join(found) or None


def check_output(out, inputs, flag_error, markers=("config.json", "metrics.jsonl")):
    """A new run's --out must be neither one of its inputs ({flag: path}) nor a folder that holds an
    earlier run's outputs (a finished model, a log, checkpoints): a run never overwrites either."""
    for flag, path in inputs.items():
        if path and os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out):
            flag_error(f"--out {out} is {flag} {path}, an input of this run: it would be overwritten; choose another --out")
    held = earlier_run(out, markers) if os.path.isdir(out) else None
    if held:
        flag_error(f"--out {out} holds an earlier run ({held}): a new run does not overwrite it. "
                   + ("--resume continues it; " if "checkpoints" in held else "")
                   + "choose another --out, or move that one away")


def start_run(args, parser, d, may_change, inputs):
    """Claim --out for this run (the lock) and check it: a fresh run refuses an --out that is one of
    its `inputs` ({flag: path}) or holds an earlier run; --resume returns the newest checkpoint
    (None for a fresh run), which must be readable and whose saved flags must equal this run's but
    for `may_change` (steps, logging, …) and --out (the checkpoint is OUT's own). An input given by
    another path is the same input when its content is (`fingerprint`): a run moved to another disk
    resumes. --steps may not end before the checkpoint."""
    if not args.resume:
        check_output(args.out, inputs, parser.error)
    lock_output(args.out, d)
    if not args.resume:
        return None
    ckpt = find_checkpoint(args.out)
    if ckpt is None:
        parser.error(f"--resume: no checkpoint in {os.path.join(args.out, 'checkpoints')} (nothing to resume; drop --resume to start anew)")
    state = verify_checkpoint(ckpt)
    saved, saved_inputs, now = state.get("args", {}), state.get("inputs", {}), json.loads(json.dumps(vars(args)))

    def same(k):
        if saved.get(k) == now.get(k):
            return True
        value = now.get(k)  # another path to the same content
        return k in saved_inputs and isinstance(value, str) and os.path.exists(value) and fingerprint(value) == saved_inputs[k]
    differ = sorted(k for k in set(saved) | set(now) if k not in may_change and k != "out" and not same(k))
    if differ:
        parser.error("--resume: these flags differ from the run being resumed: "
                     + ", ".join(f"--{k} {now.get(k)!r} (was {saved.get(k)!r})" for k in differ))
    if args.steps < state["step"]:
        parser.error(f"--resume --steps {args.steps}: the checkpoint {ckpt} is at step {state['step']}, past it; "
                     f"resume with --steps ≥ {state['step']} (the model of step {args.steps} was not kept)")
    return ckpt


def verify_checkpoint(ckpt):
    """The checkpoint's saved state, once every file of it is found readable (a truncated or corrupt
    file, or a pickle that would run code, is an error naming it); no tensor is read into memory."""
    from safetensors import safe_open
    here = None
    try:
        here = os.path.join(ckpt, "trainer_state.json")
        with open(here) as f:
            state = json.load(f)["state"]
        for where, _, names in os.walk(ckpt):
            for name in names:
                here = os.path.join(where, name)
                if name.endswith(".safetensors"):
                    with safe_open(here, "pt") as f:
                        f.keys()
                elif name.endswith(".pt"):
                    torch.load(here, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  anything unreadable: say which file and what to do
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"--resume: {here} is truncated, corrupt or unsafe to load ({reason}). Remove {ckpt} to resume from "
                         "an earlier checkpoint, if any, or start anew without --resume") from None
    return state


def write_atomic(path, text):
    """`text` into `path`, whole or not at all (a temporary name, then a rename)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows):
    """{…} rows as JSON lines, whole or not at all."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsLog:
    """JSON lines, one per logged step, written by rank 0 only, and the same scalars to TensorBoard
    with report_to="tensorboard" (an optional package). `state`: the checkpoint's trainer state on
    resume (None for a new run). The file is then first cut back to its length when the checkpoint
    was saved (state["log_bytes"], from tell()): rows logged after the checkpoint, by the run that
    died, are logged again by the resumed run, not twice."""

    def __init__(self, path, d, state=None, report_to="none"):
        resume_at, resume_step = (state or {}).get("log_bytes"), (state or {}).get("step", 0)
        self.file, self.board = None, None
        if d.main:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if resume_at is not None and os.path.exists(path):
                os.truncate(path, min(resume_at, os.path.getsize(path)))
            self.file = open(path, "a" if resume_at is not None else "w")
            if report_to == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
                self.board = SummaryWriter(os.path.join(os.path.dirname(path) or ".", "tensorboard"),
                                           purge_step=resume_step + 1 if resume_at is not None else None)
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
