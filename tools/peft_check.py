"""The peft round trip of a LoRA run: peft loads OUT/adapter on transformers' model of the base,
and its logits are compared with minitrain's (the adapters attached, and the merged final.apr).

    python tools/peft_check.py --base model.gguf --run runs/lora [--data DIR] [--tokens 128]

--base is the run's --init: a Hugging Face directory or a GGUF file (transformers' own GGUF
loader reads it). The tokens are the first --tokens of --data (default: the run's own --data),
all three models in fp32; printed: each one's loss on them and the largest logit difference from
peft's.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    import peft
    import transformers

    from minitrain.autograd import no_grad
    from minitrain.data import TokenWindows
    from minitrain.formats import peft as peft_format
    from minitrain.formats.sources import load_model
    from minitrain.lora import Adapters

    data = args.data or json.loads((args.run / "run.json").read_text())["config"]["data"]
    inputs, targets = TokenWindows(data, args.tokens, 1 << 31).batch([0])
    gguf = {"gguf_file": args.base.name} if args.base.is_file() else {}
    base = transformers.AutoModelForCausalLM.from_pretrained(args.base.parent if gguf else args.base,
                                                             dtype=torch.float32, **gguf)
    theirs = peft.PeftModel.from_pretrained(base, args.run / "adapter")
    with torch.no_grad():
        reference = theirs(torch.tensor(inputs, dtype=torch.int64)).logits.numpy()
    spec, arrays = peft_format.read_adapter(args.run / "adapter")
    model = load_model(args.base)
    models = {"minitrain + adapter": Adapters(spec, model.config, arrays).attach(model),
              "minitrain final.apr": load_model(args.run / "final.apr")}
    print(f"{args.tokens} tokens of {data}; LoRA rank {spec.rank}, alpha {spec.alpha:g}, on {','.join(spec.targets)}")
    print(f"{'peft + transformers':<20} loss {_loss(reference, targets):.6f}")
    with no_grad():
        for name, m in models.items():
            logits = m.forward(inputs).data
            print(f"{name:<20} loss {_loss(logits, targets):.6f}   max |logit - peft's| "
                  f"{numpy.abs(logits - reference).max():.2e} (logits up to {numpy.abs(reference).max():.1f})")
    sys.stdout.flush()


def _loss(logits, targets):
    z = torch.tensor(logits).reshape(-1, logits.shape[-1]).double()
    return float(torch.nn.functional.cross_entropy(z, torch.tensor(targets, dtype=torch.int64).reshape(-1)))


if __name__ == "__main__":
    main()
