"""Setting up a training run from its options: `configure` (the options, or a checkpoint's run to
continue) and `build` (everything the loop trains with: train.Parts).

In the order `build` makes them, each checked before anything is written (InputError, exit 2):
the device and the dtype; the process group (mpiexec); the model (--init, a checkpoint, or
--arch from scratch); LoRA adapters on it (--lora-rank, --lora-from, a checkpoint's); the
tokenizer and chat template final.apr will carry; a teacher (--teacher); the token data and the
windows held out for validation; the optimizer (and its ZeRO-1 shards, a checkpoint's state);
the preflight (memory.py); for DPO the reference's log-probabilities (reference.py: its model loaded
before the preflight, the values computed or read after it); then the run directory
(outputs.RunFiles) with run.json.
"""

import sys
import time
from collections import namedtuple
from dataclasses import asdict
from pathlib import Path

from minitrain import backend, chat, checkpoint, dist, lora, memory, reference, zero
from minitrain.config import ModelConfig, arch_name, preset
from minitrain.data import PairWindows, TokenWindows, TrainStream, manifest_of
from minitrain.errors import InputError
from minitrain.formats import gguf, peft, sources
from minitrain.formats.apr_meta import chat_metadata
from minitrain.gpu import attention as attention_kernels
from minitrain.model import Model
from minitrain.objectives import DPO, Distillation, NextToken
from minitrain.optim import SGD, AdamW
from minitrain.options import RESUMABLE, TrainConfig
from minitrain.outputs import RunFiles
from minitrain.train import Parts, Run

# The loop's data: the training stream, the validation source (None without one) and its window
# ids, the training windows' count (or pairs'), whether the loss weighs micro-batches by their
# targets (loss masks; not pairs, whose loss is a mean over them).
Data = namedtuple("Data", "stream val_source val_ids n_train masked")
FRESH = {"step": 0, "init_loss": None, "last_val_loss": None}  # the loop's state before its first step


def configure(options):
    """(TrainConfig, resumed) from the options given on the command line (name -> value).

    `resume` "auto": the newest complete checkpoint in `out`, or none (a fresh start).
    With `resume`, the configuration is the checkpoint's; only the options.RESUMABLE ones may be
    given anew (out defaults to the checkpoint's parent directory), and any other option given
    with a different value is an error: the run would not continue exactly. The number of ranks
    may change if the micro-batches per step do not: N ranks x grad-accum A must equal the
    checkpoint's (A follows from N when not given).
    `resumed` is checkpoint.load's (state, model, optimizer and adapter arrays), else None.
    """
    if options.get("resume") == "auto":  # the newest complete checkpoint in --out, or a fresh start
        if not options.get("out"):
            raise InputError("--resume auto continues from the newest checkpoint in --out DIR: give --out")
        found = checkpoint.newest(options["out"])
        options = {**options, "resume": str(found) if found else None}
    if not options.get("resume"):
        if not options.get("data"):
            raise InputError("pretrain needs --data (or no options at all, for the embedded demo)")
        options = {"out": time.strftime("runs/%Y%m%d-%H%M%S"), **options}
        return TrainConfig(**options).resolved(), None
    resumed = checkpoint.load(options["resume"])
    state_file = Path(options["resume"]) / "state.json"
    try:
        saved = TrainConfig(**resumed[0]["config"])
    except TypeError as e:  # a field this version does not know
        raise InputError(f"{state_file}: config: {e}") from None
    diffs = [f"--{k.replace('_', '-')} {v} (checkpoint: {getattr(saved, k)})" for k, v in options.items()
             if k not in RESUMABLE | {"grad_accum"} and v != getattr(saved, k)]
    if diffs:
        raise InputError(f"--resume {options['resume']}: options differ from the checkpoint's run: {'; '.join(diffs)}")
    ranks, was = dist.launch_size(), resumed[0].get("ranks", 1)
    micro = was * saved.grad_accum  # micro-batches per step: what makes the steps the same
    accum = options.get("grad_accum", max(1, micro // ranks))
    if ranks * accum != micro:
        raise InputError(f"--resume {options['resume']}: the run took {micro} micro-batches per step ({was} rank(s) x "
                         f"--grad-accum {saved.grad_accum}); {ranks} rank(s) x --grad-accum {accum} would take "
                         f"{ranks * accum}. Resume with mpiexec -n N and --grad-accum A where N x A = {micro}")
    saved.grad_accum = accum
    saved.out = str(Path(options["resume"]).parent)
    for k in RESUMABLE & options.keys():
        setattr(saved, k, options[k])
    try:
        return saved.resolved(), resumed
    except (InputError, TypeError, ValueError) as e:  # the checkpoint's own run cannot be what it says
        raise InputError(f"{state_file}: config: {e}") from None


def build(cfg, resumed=None, log=None):
    """The train.Run of a resolved TrainConfig (and a resumed checkpoint, from configure); lines go
    to `log` (None: sys.stderr as it is when a line is printed)."""
    try:
        return _build(cfg, resumed, log)
    except InputError as e:  # a resumed run's: the checkpoint's configuration, which the line must name
        if not cfg.resume or str(cfg.resume) in str(e):
            raise
        raise InputError(f"--resume {cfg.resume}: {e}") from None


def _build(cfg, resumed, log):
    start_time = time.perf_counter()
    cfg.device = use_device(cfg.device)
    group = dist.world(cfg.dist_timeout, cfg.device)

    def say(text):  # the lead rank writes every file and every line
        if group.rank == 0:
            print(text, file=log or sys.stderr, flush=True)

    check_dtype(cfg.dtype, cfg.device)
    backend.set_dtype(cfg.dtype)
    state, model_arrays, optimizer_arrays, adapter_arrays = resumed or (None, None, None, None)
    model = _model(cfg, state, model_arrays)
    adapters = _lora(cfg, model, adapter_arrays, say) if cfg.lora else None
    model.recompute = cfg.recompute
    check_fit(model, cfg.seq_len)
    tokenizer = sources.checked_tokenizer(cfg.tokenizer, model.config) if cfg.tokenizer else None
    chat_meta = _chat(cfg, tokenizer)  # what final.apr carries of a chat template
    teacher = _teacher(cfg, model.config, tokenizer, say) if cfg.teacher else None
    objective = _objective(cfg, model, teacher)
    data = _data(cfg, model.config.vocab_size)
    ref = reference.Reference(cfg, model, data, say) if cfg.objective == "dpo" else None
    trained = adapters.parameters() if adapters else model.parameters()
    shards = zero.Shards(group, trained) if cfg.zero else None
    optimizer = _optimizer(cfg, trained, shards, state, optimizer_arrays)
    state = {k: state[k] for k in FRESH} if state else dict(FRESH)
    estimate = None  # memory.Estimate, on the CPU
    gguf.close()  # --init's or --teacher's file and its parsed keys, if either was a GGUF
    if cfg.device == "cpu":  # what the run will hold, before anything is written
        held = sum(p.data.nbytes for m in (model, teacher) if m for p in m.parameters()) + (ref.held if ref else 0)
        estimate = memory.preflight(model.config, cfg, group, held, say, teacher and teacher.config,
                                    adapters and adapters.spec)
    if ref:
        ref.attach(group)
    files = RunFiles(cfg, group.rank == 0, say, tokenizer, chat_meta)
    files.start({"config": asdict(cfg), "arch": arch_name(model.config), "model_config": model.config.as_dict(),
                 "params": model.num_parameters(), "trained_params": sum(p.data.size for p in trained),
                 "train_windows": data.n_train, "val_windows": len(data.val_ids) if data.val_source else 0,
                 "ranks": group.size,
                 "tokens_per_step": group.size * cfg.grad_accum * cfg.batch_size * cfg.sequences * cfg.seq_len,
                 "memory_estimate": estimate and {**asdict(estimate), "peak": estimate.peak}}, state["step"])
    return Run(cfg, Parts(group, model, adapters, trained, objective, data, optimizer, shards, files, state,
                          start_time), say)


def _objective(cfg, model, teacher):
    """The step's objective (objectives.py): DPO on pairs, distillation with a teacher, else
    next-token cross-entropy."""
    if cfg.objective == "dpo":
        return DPO(model, cfg.beta, cfg.ref or cfg.init)
    if teacher:
        return Distillation(model, teacher, cfg.distill_weight, cfg.distill_temperature, cfg.teacher)
    return NextToken(model)


def use_device(name):
    """Switch the backend to --device `name` (auto: cuda where there is one); -> the device used."""
    if name == "auto":
        try:
            backend.use("cuda")
            return "cuda"
        except (RuntimeError, ImportError):
            name = "cpu"
    try:
        backend.use(name)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--device {name}: {e}") from None
    return name


def _model(cfg, state, arrays):
    """The model to train, its parameters in backend.dtype (fp32 master weights under bf16): a
    resumed checkpoint's (its state.json and model arrays), --init's (strictly checked), or
    --arch's from scratch."""
    if state:
        try:
            config = ModelConfig(**state["model_config"])
        except (TypeError, ValueError) as e:
            raise InputError(f"{cfg.resume}/state.json: model_config: {e}") from None
        return Model.from_arrays(config, arrays)
    if cfg.init:
        return sources.load_model(cfg.init, cfg.arch, cfg.rope_layout)
    try:
        config = preset(cfg.arch)
    except ValueError as e:
        raise InputError(f"--arch: {e}") from None
    return Model.from_scratch(config, seed=cfg.seed)


def check_dtype(dtype, device):
    """--dtype bf16 runs on the kernels only."""
    if dtype == "bf16" and device != "cuda":
        raise InputError(f"--dtype bf16 on {device}: bf16 mixed precision runs on the CUDA kernels; "
                         "use --device cuda, or --dtype fp32 on the CPU")


def check_fit(model, seq_len):
    """The bf16 attention kernel's head dims; the model's positions."""
    mc = model.config
    if backend.bf16 and mc.head_dim not in attention_kernels.FORWARD_ROWS:
        raise InputError(f"--dtype bf16: the bf16 attention kernel has head_dim "
                         f"{' or '.join(map(str, sorted(attention_kernels.FORWARD_ROWS)))}; this model has "
                         f"{mc.head_dim} (use --dtype fp32)")
    if seq_len > mc.max_position_embeddings:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                         f"{mc.max_position_embeddings}")


def _optimizer(cfg, trained, shards, state, arrays):
    """SGD or AdamW over the trained tensors (under ZeRO-1, this rank's shard of the moments); a
    resumed run's state loaded."""
    if cfg.optimizer == "sgd":
        optimizer = SGD(trained, cfg.lr)
    else:
        optimizer = AdamW(trained, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay, cfg.decay_1d,
                          pieces=shards and shards.mine)
    if state:
        try:
            optimizer.load_state(state["optimizer"], arrays)
        except KeyError as e:  # state.json's config trains other tensors than the files hold
            raise InputError(f"{cfg.resume}/optimizer.safetensors: no {e.args[0]} for a trained tensor; "
                             "state.json's config does not match the checkpoint's files") from None
    return optimizer


def _lora(cfg, model, saved, say):
    """Attach LoRA adapters and freeze every base tensor. The adapters are the checkpoint's
    (resume: `saved`), or --lora-from's (their rank, alpha and targets; any given must agree), or
    fresh (A as peft draws it, B zero). cfg gets the resolved values (run.json, checkpoints)."""
    mc = model.config
    if cfg.lora_from and not cfg.resume:
        spec, arrays = peft.read_adapter(cfg.lora_from)
        given = {"--lora-rank": (cfg.lora_rank, spec.rank), "--lora-alpha": (cfg.lora_alpha, spec.alpha),
                 "--lora-targets": (cfg.lora_targets and ",".join(lora.parse_targets(cfg.lora_targets)),
                                    ",".join(spec.targets))}
        clash = [f"{k} {a} (the adapter's: {b})" for k, (a, b) in given.items() if a is not None and a != b]
        if clash:
            raise InputError(f"--lora-from {cfg.lora_from}: {'; '.join(clash)}; drop the option to take the adapter's")
        if cfg.lora_dropout is not None:  # a training choice, not part of what the adapter computes
            spec = lora.LoRASpec(spec.rank, spec.alpha, cfg.lora_dropout, spec.targets)
        adapters = lora.Adapters(spec, mc, arrays, f"--lora-from {cfg.lora_from}")
    else:  # the options (a resumed run's are all resolved), with their defaults
        spec = lora.LoRASpec(cfg.lora_rank, float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha),
                             cfg.lora_dropout or 0.0,
                             lora.parse_targets(",".join(lora.TARGETS) if cfg.lora_targets is None else cfg.lora_targets))
        if cfg.resume and saved is None:
            raise InputError(f"--resume {cfg.resume}: no {checkpoint.ADAPTER}, but the run trained LoRA adapters")
        adapters = (lora.Adapters(spec, mc, saved, f"{cfg.resume}/{checkpoint.ADAPTER}") if cfg.resume
                    else lora.Adapters.fresh(spec, mc, cfg.seed))
    cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout = spec.rank, spec.alpha, spec.dropout
    cfg.lora_targets = ",".join(spec.targets)
    adapters.attach(model)
    trained, total = sum(p.data.size for p in adapters.parameters()), model.num_parameters()
    say(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}), dropout {spec.dropout:g}, on "
        f"{cfg.lora_targets}: {trained:,} trained parameters ({100 * trained / total:.2f}% of {total:,}; the base "
        "is frozen)")
    return adapters


def _teacher(cfg, mc, tokenizer, say):
    """The teacher, frozen: any model source of the student's vocabulary size; with --tokenizer
    given and a tokenizer in the teacher's source, the two tokenizers' vocabularies must agree."""
    path = cfg.teacher
    teacher = sources.load_model(path)
    if teacher.config.vocab_size != mc.vocab_size:
        raise InputError(f"--teacher {path}: its vocabulary has {teacher.config.vocab_size} tokens, the student's "
                         f"{mc.vocab_size}; distillation compares their logits token by token (the same tokenizer)")
    their_tokenizer = sources.own_tokenizer(path) if tokenizer is not None else None
    if their_tokenizer is not None:
        ours, theirs = (t.get_vocab(with_added_tokens=True) for t in (tokenizer, their_tokenizer))
        if theirs != ours:
            differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[0]
            raise InputError(f"--teacher {path}: its tokenizer differs from --tokenizer {cfg.tokenizer} "
                             f"({len(theirs)} vs {len(ours)} entries; first difference: token {differ[0]!r} "
                             f"id {differ[1]}); distillation needs one tokenizer for both")
    for p in teacher.parameters():
        p.requires_grad = False
    say(f"teacher {path}: {arch_name(teacher.config)}, {teacher.num_parameters():,} parameters (frozen); "
        f"loss (1 - {cfg.distill_weight:g}) CE + {cfg.distill_weight:g} T^2 KL at T = {cfg.distill_temperature:g}")
    return teacher


def _chat(cfg, tokenizer):
    """The chat template final.apr carries (--chat-template, else --init's own) and its special
    tokens (--init's, its tokenizer from --tokenizer, else its own): APR metadata, or {}."""
    template = chat.template_for(cfg.init, cfg.chat_template)
    if template is None or cfg.init is None:  # nothing, or no model to name the special tokens
        return chat_metadata(template, {})
    tokens = sources.special_tokens(cfg.init, tokenizer or sources.own_tokenizer(cfg.init))
    return chat_metadata(template, tokens)


def _data(cfg, vocab):
    """The training windows and the validation windows: --val-data whole, or the last
    --val-windows of --data held out (never trained on), at most --eval-windows of them. Under
    --objective dpo a sample is a preference pair (data.PairWindows) and the counts are pairs;
    preference pairs are refused to any other objective."""
    pairs = cfg.objective == "dpo"

    def source(path):
        windows = TokenWindows(path, cfg.seq_len, vocab)
        if pairs:
            return PairWindows(windows, path)
        if isinstance(manifest_of(path).get("pairs"), dict):
            raise InputError(f"{path}: preference pairs (tokenize --preference); --objective {cfg.objective} would "
                             f"train on the rejected completions too: give --objective dpo")
        return windows

    windows = source(cfg.data)
    n, unit = len(windows), "pairs" if pairs else f"windows of {cfg.seq_len + 1} tokens"
    if cfg.val_data:
        val_source, n_train = source(cfg.val_data), n
    else:
        if cfg.val_windows >= n:
            raise InputError(f"{cfg.data}: {n} {unit}; holding out --val-windows {cfg.val_windows} leaves none to "
                             f"train on")
        n_train = n - cfg.val_windows
        val_source = windows if cfg.val_windows else None
    val_ids = None
    if val_source is not None:
        first = 0 if cfg.val_data else n_train
        count = len(val_source) - first
        val_ids = list(range(first, first + min(count, cfg.eval_windows or count)))
    return Data(TrainStream(windows, n_train, cfg.data_order, cfg.seed), val_source, val_ids, n_train,
                not pairs and windows.masks is not None)
