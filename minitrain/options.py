"""`pretrain`'s options, each declared once: its name, type, default, choices, bounds and help.

Everything else reads this table: the click options of `minitrain pretrain` (cli.py), the keys of
`--config FILE`, the fields of `TrainConfig` (whose asdict is the "config" of run.json and of a
checkpoint's state.json, in this order), the checks a configuration from any of those passes
(`TrainConfig.resolved`), and what `--resume` lets change. Adding an option is one entry here,
then reading `cfg.NAME` where it acts.

A default of None is an option not given; where that resolves to a value depending on other
options (the learning rate by --mode, LoRA and --teacher's defaults), `shown` says what the help
prints and `TrainConfig.resolved` fills it in.
"""

from dataclasses import asdict, dataclass, field, make_dataclass

from minitrain import backend
from minitrain.config import PRESETS
from minitrain.errors import InputError

MODE_DEFAULTS = {"finetune": {"lr": 5e-5, "warmup_steps": 100}, "from-scratch": {"lr": 3e-4, "warmup_steps": 1000}}
LORA_LR = 2e-4  # the default lr with LoRA: B starts at zero, and peft's examples train adapters at 1e-4 to 3e-4
DISTILL_WEIGHT, DISTILL_TEMPERATURE = 0.5, 2.0  # the defaults with --teacher
DPO_BETA = 0.1  # TRL's DPOConfig default


@dataclass(frozen=True)
class Option:
    name: str  # the TrainConfig field; --name-with-dashes on the command line
    kind: type  # str, int, float or bool (a --name/--no-name flag)
    default: object
    help: str
    choices: tuple = ()
    low: float = None  # the least value allowed (or, with low_open, the bound values lie above)
    high: float = None  # the greatest (or, with high_open, the bound values lie below)
    low_open: bool = False
    high_open: bool = False
    metavar: str = None
    shown: str = None  # the default as --help states it, where it is not `default` itself
    resumable: bool = False  # may be given anew with --resume (the run continues exactly)

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        """InputError unless `value` (not None) has the option's type, is one of its choices and
        lies within its bounds."""
        kinds = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}[self.kind]
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.kind is not bool):
            raise InputError(f"{self.flag} {value!r}: expected {KIND_NAMES[self.kind]}")
        if self.choices and value not in self.choices:
            raise InputError(f"{self.flag} {value!r}: expected one of {', '.join(map(str, self.choices))}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            if self.high is None:
                bounds = f"{'above' if self.low_open else 'at least'} {self.low:g}"
            elif self.low is None:
                bounds = f"{'below' if self.high_open else 'at most'} {self.high:g}"
            else:
                left, right = "([" [not self.low_open], ")]" [not self.high_open]
                bounds = f"in {left}{self.low:g}, {self.high:g}{right}"
            raise InputError(f"{self.flag} must be {bounds}, got {value}")


def _number(x):
    """5e-5, not 5e-05."""
    return f"{x:g}".replace("e-0", "e-")


KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
OPTIONS = (
    Option("data", str, None, "Training tokens: a .bin file or a directory of .bin shards (u32 LE)."),
    Option("out", str, None, "Run directory: final.apr, metrics.jsonl, run.json, step-N/.", shown="runs/<date-time>",
           resumable=True),
    Option("arch", str, None, f"Architecture preset ({', '.join(PRESETS)}). With --init it must match the file, "
           "field by field.", metavar="NAME"),
    Option("init", str, None, "Start from this checkpoint (an .apr or .gguf file, or a Hugging Face directory)."),
    Option("rope_layout", str, None, "For an --init .apr file with the ambiguous rope_type 0: hf (Hugging Face "
           "rows) or interleaved (llama.cpp's rows).", choices=("hf", "interleaved")),
    Option("tokenizer", str, None, "tokenizer.json (or a .gguf's) to embed in final.apr (its vocabulary must fit "
           "the model's)."),
    Option("mode", str, None, "Hyperparameter defaults: " + " or ".join(
        f"{m} (lr {_number(d['lr'])}, warmup {d['warmup_steps']})" for m, d in MODE_DEFAULTS.items()) + ".",
           choices=tuple(MODE_DEFAULTS), shown="finetune with --init, else from-scratch"),
    Option("val_data", str, None, "Validation tokens; without it the last --val-windows windows of --data are "
           "held out."),
    Option("val_windows", int, 16, "Windows of --data held out for validation (0 = none).", low=0),
    Option("seq_len", int, 256, "Tokens per window.", low=1),
    Option("batch_size", int, 8, "Windows per micro-batch.", low=1),
    Option("grad_accum", int, 1, "Micro-batches per step.", low=1),
    Option("steps", int, 1000, "Optimizer steps.", low=1, resumable=True),
    Option("data_order", str, "sequential", "Window order.", choices=("sequential", "shuffle")),
    Option("optimizer", str, "adamw", "adamw, or plain sgd (no momentum, no weight decay).", choices=("adamw", "sgd")),
    Option("lr", float, None, "Peak learning rate.", shown=f"by --mode; {_number(LORA_LR)} with LoRA"),
    Option("min_lr", float, None, "Cosine floor.", shown="lr/10"),
    Option("warmup_steps", int, None, "Linear warmup steps.", low=0, shown="by --mode"),
    Option("schedule", str, "cosine", "After warmup.", choices=("cosine", "constant")),
    Option("weight_decay", float, 0.1, "AdamW decoupled weight decay."),
    Option("decay_1d", bool, False, "Also decay 1-D tensors: norms, biases."),
    Option("beta1", float, 0.9, "AdamW beta1."),
    Option("beta2", float, 0.999, "AdamW beta2."),
    Option("eps", float, 1e-8, "AdamW epsilon."),
    Option("grad_clip", float, 1.0, "Clip the global gradient norm (0 = off).", low=0),
    Option("eval_every", int, 100, "Validate every N steps (0 = only at the end).", low=0, resumable=True),
    Option("eval_windows", int, None, "Validation windows per eval.", low=1, shown="all"),
    Option("save_every", int, 0, "Checkpoint OUT/step-N every N steps (0 = never).", low=0, resumable=True),
    Option("keep_last", int, 0, "After each checkpoint, delete the oldest complete ones beyond the newest N (never "
           "the one just written, never an incomplete one; 0 = keep all).", low=0, metavar="N", resumable=True),
    Option("seed", int, 0, "Seed of the from-scratch init, the shuffle order and LoRA's init and dropout."),
    Option("device", str, "cpu", "cpu, cuda (CuPy and the CUDA kernels), or auto (cuda where there is one).",
           choices=("auto", "cpu", "cuda")),
    Option("dtype", str, "fp32", "fp32, fp64, or bf16 (mixed precision: fp32 master weights, bf16 activations; "
           "CUDA).", choices=backend.PRECISIONS),
    Option("resume", str, None, "Continue exactly from a checkpoint OUT/step-N; `auto`: from the newest complete "
           "checkpoint in --out, or start fresh if there is none (a job script can be restarted as it is).",
           resumable=True),
    Option("dist_timeout", float, 300.0, "Under mpiexec: how long a rank waits for another (dead or hung?) before "
           "all stop.", low=0, low_open=True, metavar="SECONDS", resumable=True),
    Option("zero", int, 0, "1: shard AdamW's moments across the mpiexec ranks (ZeRO-1; the same bits).", low=0,
           high=1, metavar="0|1", resumable=True),
    Option("recompute", str, "none", "Keep fewer activations and recompute them in the backward: each layer's "
           "attention block, its MLP block, or the whole layer, from its input (the same bits).",
           choices=("none", "attention", "mlp", "layer"), resumable=True),
    Option("lora_rank", int, None, "Train LoRA adapters of rank R on the frozen --init model instead of every "
           "weight: OUT/adapter/ (peft's format) and the merged model in final.apr.", low=1, metavar="R",
           shown="none: every weight"),
    Option("lora_alpha", float, None, "Adapter scale alpha/R.", low=0, low_open=True, shown="R"),
    Option("lora_dropout", float, None, "Dropout on the adapters' input while training.", low=0, high=1, high_open=True,
           metavar="P", shown="0"),
    Option("lora_targets", str, None, "Linears to adapt, of q,k,v,o,gate,up,down.", metavar="LIST",
           shown="all seven"),
    Option("lora_from", str, None, "Continue from a peft LoRA adapter directory (e.g. OUT/adapter) on --init's "
           "base; its rank, alpha and targets.", metavar="DIR"),
    Option("objective", str, "sft", "What a step minimizes. sft: next-token cross-entropy (with loss masks, on "
           "the targets only). dpo: Direct Preference Optimization on pairs from `tokenize --preference` (a sample "
           "is a pair: --batch-size, --val-windows and --eval-windows count pairs), -log sigmoid(beta [(log pi(c) - "
           "log ref(c)) - (log pi(r) - log ref(r))]), log-probabilities summed over each completion.",
           choices=("sft", "dpo")),
    Option("beta", float, None, "DPO's beta: how far the policy may move from the reference.", low=0, low_open=True,
           shown=f"{DPO_BETA:g}"),
    Option("ref", str, None, "DPO's reference model (APR, GGUF, Hugging Face; the policy's vocabulary). Its "
           "log-probabilities of every pair are computed once, before the first step, and kept in OUT/reference/ "
           "(a resumed run reads them); it is not held while training.", metavar="PATH", shown="--init"),
    Option("teacher", str, None, "Distill from this model (APR, GGUF, Hugging Face; the student's vocabulary): the "
           "loss is (1 - W) CE + W T^2 KL(teacher || student); the teacher runs forward only.", metavar="PATH"),
    Option("distill_weight", float, None, "W with --teacher.", low=0, high=1, metavar="W",
           shown=f"{DISTILL_WEIGHT:g}"),
    Option("distill_temperature", float, None, "T with --teacher.", low=0, low_open=True, metavar="T",
           shown=f"{DISTILL_TEMPERATURE:g}"),
    Option("chat_template", str, None, "The chat template final.apr carries.", metavar="FILE.jinja",
           shown="--init's own, if it has one"),
)
BY_NAME = {o.name: o for o in OPTIONS}
RESUMABLE = {o.name for o in OPTIONS if o.resumable}


def _lora(self):
    return bool(self.lora_rank or self.lora_from)


def _sequences(self):
    """The sequences a sample holds: 2 for a preference pair (--objective dpo), else 1."""
    return 2 if self.objective == "dpo" else 1


def _resolved(self):
    """A copy with the defaults that depend on other options filled in, every value checked
    against its option, and the options checked against each other."""
    c = TrainConfig(**asdict(self))
    c.mode = c.mode or ("finetune" if c.init else "from-scratch")
    for o in OPTIONS:
        if getattr(c, o.name) is not None:
            o.check(getattr(c, o.name))
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
    if c.zero and c.optimizer == "sgd":
        raise InputError("--zero 1 shards AdamW's moments; --optimizer sgd keeps none (drop --zero)")
    if not c.teacher and (c.distill_weight is not None or c.distill_temperature is not None):
        raise InputError("--distill-weight and --distill-temperature need --teacher PATH")
    if c.teacher:
        c.distill_weight = DISTILL_WEIGHT if c.distill_weight is None else c.distill_weight
        c.distill_temperature = DISTILL_TEMPERATURE if c.distill_temperature is None else c.distill_temperature
        if c.dtype == "bf16":
            raise InputError("--dtype bf16: distillation's fused loss has no bf16 path; use fp32 (or fp64)")
    if c.objective != "dpo" and (c.beta is not None or c.ref is not None):
        raise InputError(f"{'--beta' if c.beta is not None else '--ref'} is for preference pairs: give --objective dpo")
    if c.objective == "dpo":
        c.beta = DPO_BETA if c.beta is None else c.beta
        if not (c.ref or c.init):
            raise InputError("--objective dpo compares the policy with a reference model: give --init PATH (the "
                             "reference by default) or --ref MODEL")
        if c.teacher:
            raise InputError("--teacher distills on next-token targets; --objective dpo trains on pairs: drop one")
        if c.dtype == "bf16":
            raise InputError("--dtype bf16: the sequence log-probabilities have no bf16 path; use fp32 (or fp64)")
    if c.lora and c.dtype == "bf16":
        raise InputError("--dtype bf16: the LoRA linear has no bf16 path; train adapters in fp32 (or fp64)")
    return c


TrainConfig = make_dataclass(
    "TrainConfig", [(o.name, o.kind, field(default=o.default)) for o in OPTIONS],
    namespace={"lora": property(_lora), "sequences": property(_sequences), "resolved": _resolved, "__module__": __name__,
               "__doc__": "One run's options (the table OPTIONS, in its order); `resolved()` before use."})
