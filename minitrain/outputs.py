"""What a training run writes under --out, all of it on rank 0 (the other ranks' calls write
nothing):

    run.json        the resolved options, the architecture, counts and the memory estimate,
                    written before the first step
    metrics.jsonl   one JSON object per step and per evaluation, flushed as it comes (a resumed run
                    keeps the records up to its checkpoint's step)
    step-N/         checkpoints (checkpoint.py), the oldest pruned beyond --keep-last
    final.apr       the trained model (with LoRA: merged), its tokenizer and chat template
    adapter/        with LoRA: the adapters in peft's format

An OS error writing any of them (a full disk) is WriteFailed naming the file (errors.writing).
"""

import json
from pathlib import Path

from minitrain import backend, checkpoint
from minitrain.convert import apr_tensors
from minitrain.errors import InputError, writing
from minitrain.formats import peft
from minitrain.formats.apr import write_apr
from minitrain.formats.apr_meta import model_metadata


class RunFiles:
    def __init__(self, cfg, lead, say, tokenizer=None, chat=None):
        """`tokenizer` (a tokenizers.Tokenizer or None) and `chat` (the APR metadata of a chat
        template, or {}) go into final.apr."""
        self.cfg, self.lead, self.say, self.tokenizer, self.chat = cfg, lead, say, tokenizer, chat or {}
        self.out = Path(cfg.out)
        self.metrics = None

    def start(self, info, resumed_step):
        """Make the directory, open metrics.jsonl (keeping a resumed run's records up to
        `resumed_step`) and write run.json (`info`)."""
        if not self.lead:
            return
        with writing(self.out):  # the directory, metrics.jsonl and run.json
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / "metrics.jsonl"
            kept = []
            if self.cfg.resume and path.exists():
                kept = [line for n, line in enumerate(path.read_bytes().splitlines(), 1)
                        if line and _step(path, n, line) <= resumed_step]
            self.metrics = path.open("w")
            self.metrics.writelines(line.decode() + "\n" for line in kept)
            self.metrics.flush()
            (self.out / "run.json").write_text(json.dumps(info, indent=1) + "\n")

    def write(self, record):
        """One line of metrics.jsonl."""
        if self.lead:
            with writing(self.out / "metrics.jsonl"):
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()

    def checkpoint_dir(self, step):
        return self.out / f"step-{step}"

    def save_checkpoint(self, step, model, optimizer_state, adapters, state):
        """OUT/step-N (checkpoint.save), then --keep-last's pruning."""
        if not self.lead:
            return
        checkpoint.save(self.checkpoint_dir(step), model.params, optimizer_state, state, adapters and adapters.params)
        if self.cfg.keep_last:
            for path in checkpoint.prune(self.out, self.cfg.keep_last, self.checkpoint_dir(step)):
                self.say(f"removed {path} (--keep-last {self.cfg.keep_last})")

    def finish(self, model, adapters):
        """final.apr, and with LoRA the adapter directory; close metrics.jsonl. -> with LoRA, the
        adapter's path and bytes for the report (bytes None on the other ranks), else {}."""
        mc = model.config
        if self.lead:
            arrays = (adapters.merged(model.params) if adapters else
                      {n: backend.to_numpy(t.data) for n, t in model.params.items()})
            meta = model_metadata(mc, model.num_parameters(), self.tokenizer)
            with writing(self.out / "final.apr", sum(a.nbytes for a in arrays.values())):
                write_apr(self.out / "final.apr", apr_tensors(mc, arrays), {**meta, **self.chat})
            if adapters:
                with writing(self.out / "adapter"):
                    peft.write_adapter(self.out / "adapter", adapters.spec, adapters.arrays(), self.cfg.init)
            self.metrics.close()
        if not adapters:
            return {}
        return {"adapter": str(self.out / "adapter"),
                "adapter_bytes": (self.out / "adapter" / peft.WEIGHTS).stat().st_size if self.lead else None}


def _step(path, n, line):
    """The step of line n of a resumed run's metrics.jsonl (bytes); InputError naming the line
    when it is not a record of one."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        record = e
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        raise InputError(f"{path}: line {n} is not a metrics record with an integer step ({str(record)[:80]}); "
                         "remove the line (or the file) to resume")
    return record["step"]
