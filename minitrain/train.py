"""`minitrain pretrain`: the training loop (semantics: ../shared/docs/reference.md section 3).

One step = `grad_accum` micro-batches of `batch_size` windows (on each of N ranks under
`mpiexec -n N`: dist.py). Each micro-batch loss (a mean over its B*T targets) is back-propagated
on its own with weight 1/(N*grad_accum), and the micro-batch gradients are summed in micro-batch
order, so the step's gradient is the gradient of the mean over all N*grad_accum*B*T targets: the
same as one big batch, and bit for bit the same for any split into ranks. Then: the
global gradient norm (reported before clipping), clipping, the scheduled learning rate set on the
optimizer, the update. Before the first update the validation loss is measured (`init_loss`).

Everything that can be wrong with the inputs (model file, data, options) raises InputError
before step 0 (exit 2); a non-finite loss or gradient norm, or a validation loss more than twice
the previous one, raises TrainingAborted (exit 3) before the bad value is logged.
"""

import json
import math
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minitrain import backend, chat, checkpoint, dist, lora, memory, ops, zero
from minitrain.autograd import no_grad
from minitrain.config import PRESETS, ModelConfig, preset
from minitrain.convert import apr_tensors, checked_tokenizer
from minitrain.data import TokenWindows, TrainStream, target_count
from minitrain.errors import InputError, TrainingAborted, writing
from minitrain.formats import gguf, peft
from minitrain.formats.apr import write_apr
from minitrain.formats.apr_meta import model_metadata
from minitrain.gpu import attention as attention_kernels
from minitrain.model import Model
from minitrain.optim import SGD, AdamW, clip_grads, global_grad_norm
from minitrain.preempt import Preempted, StopRequests
from minitrain.progress import duration
from minitrain.schedule import learning_rate

MODE_DEFAULTS = {"finetune": {"lr": 5e-5, "warmup_steps": 100}, "from-scratch": {"lr": 3e-4, "warmup_steps": 1000}}
RECOMPUTE = ("none", "attention", "mlp", "layer")
DISTILL_WEIGHT, DISTILL_TEMPERATURE = 0.5, 2.0  # the defaults with --teacher
LORA_LR = 2e-4  # the default lr with LoRA: B starts at zero, and peft's examples train adapters at 1e-4 to 3e-4
RESUMABLE_CHANGES = {"steps", "out", "eval_every", "save_every", "keep_last", "resume", "dist_timeout", "zero",
                     "recompute"}  # may differ from the checkpoint's run


@dataclass
class TrainConfig:
    data: str = None
    out: str = None
    arch: str = None
    init: str = None
    rope_layout: str = None  # for an --init .apr file whose rope_type 0 is ambiguous
    tokenizer: str = None  # embedded in final.apr; its vocabulary must fit the model's
    mode: str = None  # finetune with --init, else from-scratch
    val_data: str = None
    val_windows: int = 16
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    data_order: str = "sequential"
    optimizer: str = "adamw"
    lr: float = None  # mode default
    min_lr: float = None  # lr / 10
    warmup_steps: int = None  # mode default
    schedule: str = "cosine"
    weight_decay: float = 0.1
    decay_1d: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = None  # every validation window
    save_every: int = 0
    keep_last: int = 0  # after each save, delete the oldest complete checkpoints beyond this many (0: keep all)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    resume: str = None
    dist_timeout: float = 300.0  # seconds a rank waits for another before it gives up (mpiexec)
    zero: int = 0  # 1: AdamW's moments sharded across the ranks (ZeRO-1, minitrain/zero.py)
    recompute: str = "none"  # attention, mlp, layer: the blocks whose activations the backward recomputes (same bits)
    lora_rank: int = None  # LoRA adapters of this rank on a frozen --init model (lora.py); None: full fine-tune
    lora_alpha: float = None  # the rank (scale alpha/R = 1)
    lora_dropout: float = None  # 0
    lora_targets: str = None  # all seven: q,k,v,o,gate,up,down
    lora_from: str = None  # a peft adapter directory to continue from (its rank, alpha and targets)
    teacher: str = None  # a model of the same vocabulary to distill from (forward only, never trained)
    distill_weight: float = None  # w of (1 - w) CE + w T^2 KL (ops/distill.py); 0.5 with --teacher
    distill_temperature: float = None  # T; 2.0 with --teacher
    chat_template: str = None  # a .jinja file for final.apr; default: --init's own template

    @property
    def lora(self):
        return bool(self.lora_rank or self.lora_from)

    def resolved(self):
        """A copy with the mode-dependent defaults filled in, and sanity checks."""
        c = TrainConfig(**asdict(self))
        c.mode = c.mode or ("finetune" if c.init else "from-scratch")
        if c.mode not in MODE_DEFAULTS:
            raise InputError(f"--mode {c.mode!r}: expected finetune or from-scratch")
        if not c.init and not c.arch:
            raise InputError("--arch NAME is needed to train from scratch (or --init PATH to fine-tune)")
        if c.lora and not c.init:
            raise InputError("LoRA trains adapters on a pretrained model: give it with --init PATH")
        if c.lora and c.lr is None:
            c.lr = LORA_LR
        for key, value in MODE_DEFAULTS[c.mode].items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        c.min_lr = c.lr / 10 if c.min_lr is None else c.min_lr
        for name in ("seq_len", "batch_size", "grad_accum", "steps"):
            if getattr(c, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
        if c.optimizer not in ("adamw", "sgd"):
            raise InputError(f"--optimizer {c.optimizer!r}: expected adamw or sgd")
        if c.schedule not in ("cosine", "constant"):
            raise InputError(f"--schedule {c.schedule!r}: expected cosine or constant")
        if c.recompute not in RECOMPUTE:
            raise InputError(f"--recompute {c.recompute!r}: expected one of {', '.join(RECOMPUTE)}")
        if c.zero not in (0, 1):
            raise InputError(f"--zero {c.zero}: expected 0 (off) or 1 (shard AdamW's moments)")
        if c.zero and c.optimizer == "sgd":
            raise InputError("--zero 1 shards AdamW's moments; --optimizer sgd keeps none (drop --zero)")
        if not c.teacher and (c.distill_weight is not None or c.distill_temperature is not None):
            raise InputError("--distill-weight and --distill-temperature need --teacher PATH")
        if c.teacher:
            c.distill_weight = DISTILL_WEIGHT if c.distill_weight is None else c.distill_weight
            c.distill_temperature = DISTILL_TEMPERATURE if c.distill_temperature is None else c.distill_temperature
            if not 0.0 <= c.distill_weight <= 1.0 or not c.distill_temperature > 0.0:
                raise InputError(f"--distill-weight {c.distill_weight} must be in [0, 1] and --distill-temperature "
                                 f"{c.distill_temperature} above 0")
            if c.dtype == "bf16":
                raise InputError("--dtype bf16: distillation's fused loss has no bf16 path; use fp32 (or fp64)")
        if c.lora and c.dtype == "bf16":
            raise InputError("--dtype bf16: the LoRA linear has no bf16 path; train adapters in fp32 (or fp64)")
        if c.dtype not in backend.PRECISIONS:
            raise InputError(f"--dtype {c.dtype!r}: expected one of {', '.join(backend.PRECISIONS)}")
        return c


def _device(name):
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


def arch_name(config):
    return next((name for name, c in PRESETS.items() if c == config), f"{config.family} (custom)")


def build_model(cfg):
    """The model to train: from --init (strictly checked), from a checkpoint, or from scratch; its
    parameters in backend.dtype (Run sets it from --dtype first: fp32 master weights under bf16)."""
    if cfg.init:
        from minitrain.formats.sources import load_model

        return load_model(cfg.init, cfg.arch, cfg.rope_layout)
    try:
        config = preset(cfg.arch)
    except ValueError as e:
        raise InputError(f"--arch: {e}") from None
    return Model.from_scratch(config, seed=cfg.seed)


def configure(options):
    """(TrainConfig, resumed) from the options given on the command line (name -> value).

    `resume` "auto": the newest complete checkpoint in `out`, or none (a fresh start).
    With `resume`, the configuration is the checkpoint's; only steps, out, the eval/save cadence,
    --keep-last, --dist-timeout and --zero may be given anew (out defaults to the checkpoint's parent
    directory), and any other option given with a different value is an error: the run would not
    continue exactly. The number of ranks may change if the micro-batches per step do not: N ranks
    x grad-accum A must equal the checkpoint's (A follows from N when not given).
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
             if k not in RESUMABLE_CHANGES | {"grad_accum"} and v != getattr(saved, k)]
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
    for k in RESUMABLE_CHANGES & options.keys():
        setattr(saved, k, options[k])
    try:
        return saved.resolved(), resumed
    except (InputError, TypeError, ValueError) as e:  # the checkpoint's own run cannot be what it says
        raise InputError(f"{state_file}: config: {e}") from None


class Run:
    """One training run: model, data, optimizer and the files under --out."""

    def __init__(self, cfg, resumed=None, log=None):
        try:
            self._build(cfg, resumed, log)
        except InputError as e:  # a resumed run's: the checkpoint's configuration, which the line must name
            if not cfg.resume or str(cfg.resume) in str(e):
                raise
            raise InputError(f"--resume {cfg.resume}: {e}") from None

    def _build(self, cfg, resumed, log):
        self.cfg, self.log = cfg, log  # None: sys.stderr as it is when a line is printed
        self.start_time = time.perf_counter()
        self.state = {"step": 0, "init_loss": None, "last_val_loss": None}
        cfg.device = _device(cfg.device)
        self.group = dist.world(cfg.dist_timeout, cfg.device)
        self.lead = self.group.rank == 0  # the rank that writes every file and every line
        if cfg.dtype == "bf16" and cfg.device != "cuda":
            raise InputError(f"--dtype bf16 on {cfg.device}: bf16 mixed precision runs on the CUDA kernels; "
                             "use --device cuda, or --dtype fp32 on the CPU")
        backend.set_dtype(cfg.dtype)
        if resumed:
            state, model_arrays, opt_arrays, adapter_arrays = resumed
            try:
                config = ModelConfig(**state["model_config"])
            except (TypeError, ValueError) as e:
                raise InputError(f"{cfg.resume}/state.json: model_config: {e}") from None
            self.model = Model.from_arrays(config, model_arrays)
        else:
            self.model = build_model(cfg)
        self.adapters = self._lora(cfg, resumed and adapter_arrays) if cfg.lora else None
        self.model.recompute = cfg.recompute
        mc = self.model.config
        if backend.bf16 and mc.head_dim not in attention_kernels.FORWARD_ROWS:
            raise InputError(f"--dtype bf16: the bf16 attention kernel has head_dim "
                             f"{' or '.join(map(str, sorted(attention_kernels.FORWARD_ROWS)))}; this model has "
                             f"{mc.head_dim} (use --dtype fp32)")
        if cfg.seq_len > mc.max_position_embeddings:
            raise InputError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                             f"{mc.max_position_embeddings}")
        self.tokenizer = checked_tokenizer(cfg.tokenizer, mc) if cfg.tokenizer else None
        self.chat = self._chat(cfg)  # what final.apr carries of a chat template
        self.teacher = self._teacher(cfg.teacher, mc) if cfg.teacher else None
        self._data(cfg, mc.vocab_size)
        self.trained = params = self.adapters.parameters() if self.adapters else self.model.parameters()
        self.shards = zero.Shards(self.group, params) if cfg.zero else None
        if cfg.optimizer == "sgd":
            self.optimizer = SGD(params, cfg.lr)
        else:
            self.optimizer = AdamW(params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay, cfg.decay_1d,
                                   pieces=self.shards and self.shards.mine)
        if resumed:
            try:
                self.optimizer.load_state(state["optimizer"], opt_arrays)
            except KeyError as e:  # state.json's config trains other tensors than the files hold
                raise InputError(f"{cfg.resume}/optimizer.safetensors: no {e.args[0]} for a trained tensor; "
                                 "state.json's config does not match the checkpoint's files") from None
            self.state = {k: state[k] for k in self.state}
        self.estimate = None  # memory.Estimate, on the CPU
        gguf.close()  # --init's or --teacher's file and its parsed keys, if either was a GGUF
        if cfg.device == "cpu":  # what the run will hold, before anything is written
            held = sum(p.data.nbytes for m in (self.model, self.teacher) if m for p in m.parameters())
            self.estimate = memory.preflight(mc, cfg, self.group, held, self._say, self.teacher and self.teacher.config,
                                             self.adapters and self.adapters.spec)
        self.out = Path(cfg.out)
        self.micro_per_step = self.group.size * cfg.grad_accum  # micro-batches of a step, all ranks
        self.step_targets = None  # the last step's targets with loss masks (metrics.jsonl target_tokens)
        self.tokens_per_step = self.micro_per_step * cfg.batch_size * cfg.seq_len
        if self.lead:
            with writing(self.out):  # the directory, metrics.jsonl and run.json
                self.out.mkdir(parents=True, exist_ok=True)
                self.metrics = self._open_metrics()
                (self.out / "run.json").write_text(json.dumps(self._run_info(), indent=1) + "\n")

    def _lora(self, cfg, saved):
        """Attach LoRA adapters and freeze every base tensor. The adapters are the checkpoint's
        (resume), or --lora-from's (their rank, alpha and targets; any given must agree), or fresh
        (A as peft draws it, B zero). cfg gets the resolved values (run.json, checkpoints)."""
        mc = self.model.config
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
        adapters.attach(self.model)
        trained = sum(p.data.size for p in adapters.parameters())  # self.trained is not set yet
        self._say(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}), dropout {spec.dropout:g}, on "
                  f"{cfg.lora_targets}: {trained:,} trained parameters ({100 * trained / self.model.num_parameters():.2f}% "
                  f"of {self.model.num_parameters():,}; the base is frozen)")
        return adapters

    def _teacher(self, path, mc):
        """The teacher, frozen: any model source of the student's vocabulary size; with --tokenizer
        given and a tokenizer in the teacher's source, the two tokenizers' vocabularies must agree."""
        from minitrain.formats.sources import load_model
        from minitrain.tokenize import NoTokenizer, load_tokenizer, model_tokenizer

        teacher = load_model(path)
        if teacher.config.vocab_size != mc.vocab_size:
            raise InputError(f"--teacher {path}: its vocabulary has {teacher.config.vocab_size} tokens, the student's "
                             f"{mc.vocab_size}; distillation compares their logits token by token (the same tokenizer)")
        if self.tokenizer is not None:
            try:
                theirs = load_tokenizer(model_tokenizer(path)).get_vocab(with_added_tokens=True)
            except NoTokenizer:
                theirs = None
            ours = self.tokenizer.get_vocab(with_added_tokens=True)
            if theirs is not None and theirs != ours:
                differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[0]
                raise InputError(f"--teacher {path}: its tokenizer differs from --tokenizer {self.cfg.tokenizer} "
                                 f"({len(theirs)} vs {len(ours)} entries; first difference: token {differ[0]!r} "
                                 f"id {differ[1]}); distillation needs one tokenizer for both")
        for p in teacher.parameters():
            p.requires_grad = False
        self._say(f"teacher {path}: {arch_name(teacher.config)}, {teacher.num_parameters():,} parameters (frozen); "
                  f"loss (1 - {self.cfg.distill_weight:g}) CE + {self.cfg.distill_weight:g} T^2 KL at "
                  f"T = {self.cfg.distill_temperature:g}")
        return teacher

    def _chat(self, cfg):
        """The chat template final.apr carries (--chat-template, else --init's own) and its special
        tokens (--init's, its tokenizer from --tokenizer, else its own): APR metadata, or {}."""
        from minitrain.tokenize import NoTokenizer, load_tokenizer, model_tokenizer

        template = chat.template_for(cfg.init, cfg.chat_template)
        if template is None or cfg.init is None:  # nothing, or no model to name the special tokens
            return chat.apr_chat_metadata(template, {})
        try:
            tokenizer = self.tokenizer or load_tokenizer(model_tokenizer(cfg.init))
        except NoTokenizer:
            tokenizer = None
        return chat.apr_chat_metadata(template, chat.special_tokens(cfg.init, tokenizer))

    def _trained_count(self):
        return sum(p.data.size for p in self.trained)

    def _data(self, cfg, vocab):
        self.windows = TokenWindows(cfg.data, cfg.seq_len, vocab)
        n = len(self.windows)
        if cfg.val_data:
            self.val_source, self.val_ids = TokenWindows(cfg.val_data, cfg.seq_len, vocab), None
            n_train = n
        else:
            if cfg.val_windows >= n:
                raise InputError(f"{cfg.data}: {n} windows of {cfg.seq_len + 1} tokens; holding out "
                                 f"--val-windows {cfg.val_windows} leaves none to train on")
            n_train = n - cfg.val_windows
            self.val_source = self.windows if cfg.val_windows else None
        if self.val_source is not None:
            first = 0 if cfg.val_data else n_train
            count = len(self.val_source) - first
            self.val_ids = list(range(first, first + min(count, cfg.eval_windows or count)))
        self.stream = TrainStream(self.windows, n_train, cfg.data_order, cfg.seed)
        self.n_train = n_train

    def _open_metrics(self):
        """metrics.jsonl; a resumed run keeps only the records up to its checkpoint's step."""
        path = self.out / "metrics.jsonl"
        kept = []
        if self.cfg.resume and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.state["step"]]
        f = path.open("w")
        f.writelines(line + "\n" for line in kept)
        f.flush()
        return f

    def _run_info(self):
        mc = self.model.config
        return {"config": asdict(self.cfg), "arch": arch_name(mc), "model_config": mc.as_dict(),
                "params": self.model.num_parameters(), "trained_params": self._trained_count(), "train_windows": self.n_train,
                "val_windows": len(self.val_ids) if self.val_source else 0, "ranks": self.group.size,
                "tokens_per_step": self.tokens_per_step,
                "memory_estimate": self.estimate and {**asdict(self.estimate), "peak": self.estimate.peak}}

    def _write(self, record):
        if self.lead:
            with writing(self.out / "metrics.jsonl"):
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()

    def _say(self, text):
        if self.lead:
            print(text, file=self.log or sys.stderr, flush=True)

    # --- losses -----------------------------------------------------------------------------

    def evaluate(self):
        """Mean loss over the validation windows' targets (batches of batch_size), or None without
        any. Rank r evaluates batches r, r+N, ...; the sums run over all batches in batch order."""
        if self.val_source is None:
            return None
        B, mine = self.cfg.batch_size, []
        starts = range(0, len(self.val_ids), B)
        with no_grad():
            for k in range(self.group.rank, len(starts), self.group.size):
                ids = self.val_ids[starts[k]: starts[k] + B]
                inputs, targets = self.val_source.batch(ids)
                n = target_count(targets)  # B*T without masks
                loss = self.model.loss(inputs, targets, self.val_source.positions(ids))
                mine.append((k, float(loss.data) * n, n))
        total, count = 0.0, 0
        for _, weighted, size in sorted(self.group.gather(mine, -(-len(starts) // self.group.size), 3)):
            total += weighted
            count += size
        return total / max(1, count)

    def train_step(self, step):
        """One update; returns (mean loss, pre-clip grad norm, lr, (mean CE, mean T^2 KL)): the last
        pair is a teacher's run's two loss terms (zeros without one).

        The loss is the mean over the step's targets, all micro-batches and ranks together: each
        micro-batch's loss (the mean over its own n_m targets) is weighted n_m / N, N the step's
        targets. Without masks every micro-batch has B*T targets and the weight is 1 / (micro-batches
        per step), as it always was; with masks (`self.step_targets`: N) the counts come from the
        data, on the host, the same on every rank."""
        cfg, params, group = self.cfg, self.trained, self.group
        counts = self._target_counts(step)  # per micro-batch of the step (all ranks), or None: B*T each
        self.step_targets = None if counts is None else sum(counts)
        weight = backend.xp.asarray(1.0 / self.micro_per_step, dtype=backend.dtype)
        grads, losses = [], []  # this rank's micro-batch gradients (rank 0: already summed) and losses
        for a in range(cfg.grad_accum):
            micro = step * self.micro_per_step + group.rank * cfg.grad_accum + a  # global micro-batch index
            inputs, targets = self.stream.batch(micro * cfg.batch_size, cfg.batch_size)
            positions = self.stream.positions(micro * cfg.batch_size, cfg.batch_size)  # packed data, else None
            if counts is not None:
                n = counts[micro - step * self.micro_per_step]
                weight = backend.xp.asarray(n / self.step_targets if self.step_targets else 0.0, dtype=backend.dtype)
            for p in params:
                p.zero_grad()
            if self.adapters:
                self.adapters.reseed(cfg.seed, micro)
            parts = {}
            loss = self._loss(inputs, targets, positions, parts)
            loss.backward(weight)
            losses += [loss.data, parts.get("ce_loss", 0.0), parts.get("kd_loss", 0.0)]  # read after the loop
            g = [p.grad for p in params]
            if grads and group.rank == 0:  # the first in the chain sums as it goes: one buffer
                grads = [dist.sum_in_order([grads[0], g])]
            else:
                grads.append(g)
        for p, g in zip(params, group.ordered_sum(grads, self.shards and self.shards.layout)):
            p.grad = g  # under ZeRO-1: right in this rank's shard only
        xp = backend.xp  # every micro-batch's loss and a teacher's two terms, read at once: one transfer
        values = backend.to_numpy(xp.stack([xp.asarray(v, dtype=xp.float64) for v in losses]))
        losses = [tuple(row) for row in values.reshape(-1, 3).tolist()]
        rows = group.gather(losses, cfg.grad_accum, 3)  # every micro-batch's, in micro-batch order
        if counts is None:
            loss, ce, kd = (sum(column) / self.micro_per_step for column in zip(*rows))
        else:  # the means of the micro-batches weighted by their targets
            loss, ce, kd = (sum(v * n for v, n in zip(column, counts)) / max(1, self.step_targets)
                            for column in zip(*rows))
        if not math.isfinite(loss):
            raise TrainingAborted(f"step {step + 1}: the training loss is {loss}; stopping (lower --lr?)")
        norm = self.shards.grad_norm() if self.shards else global_grad_norm(params)
        if not math.isfinite(norm):
            raise TrainingAborted(f"step {step + 1}: the gradient norm is {norm}; stopping (lower --lr?)")
        clip_grads(self.shards.grads() if self.shards else [p.grad for p in params], norm, cfg.grad_clip)
        lr = learning_rate(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                           total_steps=cfg.steps, schedule=cfg.schedule)
        self.optimizer.lr = lr
        self.optimizer.step()
        if self.shards:
            self.shards.share()
        return loss, norm, lr, (ce, kd)

    def _target_counts(self, step):
        """The targets of each micro-batch of `step` (every rank's, in micro-batch order) when the
        data has masks; None without (every one then has B*T)."""
        if self.windows.masks is None:
            return None
        B, first = self.cfg.batch_size, step * self.micro_per_step
        return [target_count(self.stream.batch(m * B, B)[1]) for m in range(first, first + self.micro_per_step)]

    def _loss(self, inputs, targets, positions, parts):
        """The micro-batch's training loss; with a teacher, (1 - w) CE + w T^2 KL, its two terms in
        `parts`. `positions`: a packed batch's (model.hidden), else None."""
        if self.teacher is None:
            return self.model.loss(inputs, targets, positions)
        with no_grad():
            teacher_hidden = self.teacher.hidden(inputs, positions=positions).data  # (B, T, Ht): no graph kept
        m = self.model
        return ops.linear_distillation(m.hidden(inputs, positions=positions), m.head, teacher_hidden,
                                       self.teacher.head.data,
                                       targets, self.cfg.distill_weight,
                                       self.cfg.distill_temperature, parts=parts)

    def _eval_and_gate(self, step):
        val = self.evaluate()
        if val is None:
            return None
        if not math.isfinite(val):
            raise TrainingAborted(f"step {step}: the validation loss is {val}; stopping")
        previous = self.state["last_val_loss"]
        if previous is not None and val > 2 * previous:
            raise TrainingAborted(f"step {step}: validation loss {val:.4f} is more than twice the previous "
                                  f"{previous:.4f}: diverging; stopping (lower --lr?)")
        self.state["last_val_loss"] = val
        self._write({"type": "eval", "step": step, "val_loss": val, "ppl": math.exp(min(val, 700.0))})
        return val

    # --- the loop ---------------------------------------------------------------------------

    def run(self):
        cfg = self.cfg
        if self.state["init_loss"] is None:
            init = self._eval_and_gate(0)
            if init is None:  # no validation data: the first training batch's loss, before any update
                with no_grad():
                    init = float(self.model.loss(*self.stream.batch(0, cfg.batch_size),
                                                 self.stream.positions(0, cfg.batch_size)).data)
            self.state["init_loss"] = init
            self._say(f"init_loss {init:.4f} (step 0, before any update; ln V = {math.log(self.model.config.vocab_size):.4f})")
        train_time, last_loss, last_print, last_parts = 0.0, None, 0.0, {}
        first_step = self.state["step"]
        if cfg.resume:
            self._say(f"resumed from {cfg.resume}: step {first_step} of {cfg.steps} done")
        with StopRequests(self._say) as stops:
            for step in range(first_step, cfg.steps):
                train_time, last_loss, last_print, last_parts = self._step(step, first_step, train_time, last_print)
                if (signum := self._stop_agreed(stops)) is not None:
                    self._stop(signum)
        return self.finish(train_time, last_loss, cfg.steps - first_step, last_parts)

    def _step(self, step, first_step, train_time, last_print):
        """One step of run(), its metrics, evaluation, progress line and checkpoint.
        -> (train_time, loss, last_print, the loss's parts)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss, norm, lr, (ce, kd) = self.train_step(step)
        dt = time.perf_counter() - t0
        train_time += dt
        self.state["step"] = done = step + 1
        distilled = {"ce_loss": ce, "kd_loss": kd} if self.teacher else {}
        targets = {} if self.step_targets is None else {"target_tokens": self.step_targets}
        self._write({"type": "step", "step": done, "loss": loss, **distilled, **targets, "grad_norm": norm,
                     "lr": lr, "tokens_per_sec": self.tokens_per_step / dt,
                     "wall_s": time.perf_counter() - self.start_time})
        val = self._eval_and_gate(done) if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps else None
        now = time.perf_counter()
        if now - last_print > 10.0 or val is not None or done == cfg.steps or done == first_step + 1:
            last_print = now
            rate = self.tokens_per_step * (done - first_step) / train_time
            eta = (cfg.steps - done) * train_time / (done - first_step)
            self._say(f"step {done}/{cfg.steps} | loss {loss:.4f}"
                      + (f" (ce {ce:.4f}, kd {kd:.4f})" if self.teacher else "") + f" | lr {lr:.2e} | grad_norm {norm:.3f} | "
                      f"{rate:,.0f} tok/s | ETA {duration(eta)}" + (f" | val_loss {val:.4f}" if val is not None else ""))
        if self._saves_at(done):
            self.save_checkpoint()
        return train_time, loss, last_print, distilled

    def _saves_at(self, step):
        """Whether --save-every checkpoints `step`."""
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    def _checkpoint_dir(self, step):
        return self.out / f"step-{step}"

    def _stop_agreed(self, stops):
        """The signal that stops the run after this step: any rank's (preempt.py), else None."""
        rows = self.group.gather([(float(stops.signum),)] if stops.signum is not None else [], 1, 1)
        return int(max(r[0] for r in rows)) if rows else None

    def _stop(self, signum):
        """Checkpoint the step just done (unless --save-every just did) and raise Preempted."""
        done = self.state["step"]
        if not self._saves_at(done):
            self.save_checkpoint()
        path = self._checkpoint_dir(done)
        raise Preempted(f"stopped by {signal.Signals(signum).name} after step {done} of {self.cfg.steps}: checkpoint "
                        f"{path}; continue with `minitrain pretrain --resume {path}` (or the same command with "
                        f"--resume auto)", signum)

    def save_checkpoint(self):
        optimizer_state = self.optimizer.state(self.shards and self.shards.assemble)  # ZeRO-1: from every rank
        if not self.lead:
            return
        step = self.state["step"]
        checkpoint.save(self._checkpoint_dir(step), self.model.params, optimizer_state,
                        {**self.state, "next_sample": step * self.micro_per_step * self.cfg.batch_size,
                         "ranks": self.group.size,
                         "data_order": {"order": self.cfg.data_order, "seed": self.cfg.seed,
                                        "rng": "numpy.random.default_rng([seed, epoch]).permutation per epoch"},
                         "config": asdict(self.cfg), "model_config": self.model.config.as_dict()},
                        self.adapters and self.adapters.params)
        if self.cfg.keep_last:
            for path in checkpoint.prune(self.out, self.cfg.keep_last, self._checkpoint_dir(step)):
                self._say(f"removed {path} (--keep-last {self.cfg.keep_last})")

    def _memory(self):
        """Measured on every rank: the optimizer state it holds and its peak RSS (bytes)."""
        rows = self.group.gather([(self.optimizer.state_bytes(), _peak_rss())], 1, 2)
        memory = [{"rank": r, "optimizer_state_bytes": int(o), "peak_rss_bytes": int(m)} for r, (o, m) in enumerate(rows)]
        if self.group.size > 1 or self.shards:
            state, rss = (", ".join(f"{m[key] / 1e6:.1f}" for m in memory) for key in ("optimizer_state_bytes", "peak_rss_bytes"))
            self._say(f"memory per rank{' (ZeRO-1)' if self.shards else ''}: optimizer state {state} MB | peak RSS {rss} MB")
        return memory

    def finish(self, train_time, last_loss, steps_run, last_parts):
        model, mc = self.model, self.model.config
        if self.lead:
            arrays = (self.adapters.merged(model.params) if self.adapters else
                      {n: backend.to_numpy(t.data) for n, t in model.params.items()})
            meta = model_metadata(mc, model.num_parameters(), self.tokenizer)
            with writing(self.out / "final.apr", sum(a.nbytes for a in arrays.values())):
                write_apr(self.out / "final.apr", apr_tensors(mc, arrays), {**meta, **self.chat})
            if self.adapters:
                with writing(self.out / "adapter"):
                    peft.write_adapter(self.out / "adapter", self.adapters.spec, self.adapters.arrays(), self.cfg.init)
            self.metrics.close()
        report = {"status": "ok", "arch": arch_name(mc), "params": model.num_parameters(), "steps": self.cfg.steps,
                  "tokens": self.cfg.steps * self.tokens_per_step, "init_loss": self.state["init_loss"],
                  "final_train_loss": last_loss, "final_val_loss": self.state["last_val_loss"],
                  "tokens_per_sec": steps_run * self.tokens_per_step / train_time if train_time else None,
                  "wall_s": time.perf_counter() - self.start_time, "out": str(self.out),
                  "memory_per_rank": self._memory()}
        if self.adapters:
            report["lora"] = {"rank": self.adapters.spec.rank, "alpha": self.adapters.spec.alpha,
                              "targets": self.cfg.lora_targets, "trained_params": self._trained_count(),
                              "adapter": str(self.out / "adapter"),
                              "adapter_bytes": (self.out / "adapter" / peft.WEIGHTS).stat().st_size if self.lead else None}
        if self.teacher:
            report["distill"] = {"teacher": self.cfg.teacher, "weight": self.cfg.distill_weight,
                                 "temperature": self.cfg.distill_temperature,
                                 "final_ce_loss": last_parts.get("ce_loss"), "final_kd_loss": last_parts.get("kd_loss")}
        self._say(f"done: {report['steps']} steps, init_loss {report['init_loss']:.4f} -> final train loss "
                  f"{_fmt(last_loss)}, val loss {_fmt(report['final_val_loss'])}; wrote {self.out / 'final.apr'}")
        return report


def _peak_rss():
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"


