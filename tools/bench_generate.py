"""minitrain's KV-cache generation vs transformers `generate`: prefill and decode tokens/s of the
same model, greedy, batch 1, on this machine, side by side.

    python tools/bench_generate.py --model smollm2-135m --model qwen2.5-0.5b

`smollm2-135m` is the real SmolLM2-135M-Instruct (its GGUF, tools/fetch_smollm2.py, dequantized);
`qwen2.5-0.5b` is that preset with random weights (minitrain's from-scratch init). The parent
writes the model once as a Hugging Face directory; minitrain and transformers load that same
directory, each in its own fresh process, alternating for --rounds rounds so machine noise hits
both alike. Both are timed the same way, from outside, on the same random prompt of
--prompt-tokens ids: prefill = one `generate` of 1 new token; decode = (one `generate` of N + 1
new tokens - prefill) / N, with N = --new-tokens and the end-of-text id disabled so both produce
exactly N + 1 tokens. Best of --repeats per process. Threads: torch.get_num_threads() (PyTorch's
default, every core), OpenBLAS's default (every core).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from workload import child

MODELS = ["smollm2-135m", "qwen2.5-0.5b"]


def write_model(name, directory):
    """The model's HF directory: the real SmolLM2's weights, or the preset's from-scratch init."""
    from minitrain import backend
    from minitrain.formats import hf

    if name == "smollm2-135m":
        from fetch_smollm2 import fetch

        from minitrain.formats.gguf import load_gguf

        cfg, arrays = load_gguf(fetch())
    else:
        from minitrain.config import preset
        from minitrain.model import Model

        cfg = preset(name)
        arrays = {n: backend.to_numpy(t.data) for n, t in Model.from_scratch(cfg).params.items()}
    hf.save_dir(directory, cfg, arrays)
    return cfg


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_minitrain(directory, prompt, new, repeats):
    from minitrain.autograd import no_grad
    from minitrain.formats.sources import load_model
    from minitrain.generate import Sampling, generate

    model = load_model(directory)
    greedy = Sampling(temperature=0)
    with no_grad():
        run = lambda n: generate(model, [prompt], n, greedy)  # noqa: E731  (no stop id: exactly n tokens)
        assert len(run(new + 1)[0][0].ids) == new + 1
        return {"one": best_of(repeats, lambda: run(1)), "all": best_of(repeats, lambda: run(new + 1)),
                "threads": "OpenBLAS default"}


def run_torch(directory, prompt, new, repeats):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, top_k=None, top_p=None, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        run = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)  # noqa: E731
        assert run(new + 1).shape[1] == len(prompt) + new + 1
        return {"one": best_of(repeats, lambda: run(1)), "all": best_of(repeats, lambda: run(new + 1)),
                "threads": torch.get_num_threads(), "attn": model.config._attn_implementation}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, help="repeatable; default: both")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["minitrain", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_minitrain if args.child == "minitrain" else run_torch
        print(json.dumps(run(args.dir, json.loads(args.prompt), args.new_tokens, args.repeats)))
        return
    import numpy

    print(f"machine: {os.cpu_count()} CPUs; greedy, batch 1, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} decode steps; best of {args.repeats} per process, {args.rounds} alternating rounds")
    print(f"{'model':<14} {'framework':<13} {'prefill tok/s':>14} {'decode tok/s':>13}  decode ratio minitrain/transformers")
    for name in args.model or MODELS:
        with tempfile.TemporaryDirectory() as d:
            cfg = write_model(name, Path(d) / "hf")
            prompt = [int(i) for i in numpy.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_tokens)]
            best = {}
            for _ in range(args.rounds):
                for framework in ("minitrain", "transformers"):
                    r = child(__file__, framework, "--dir", Path(d) / "hf", "--prompt", json.dumps(prompt),
                              "--new-tokens", args.new_tokens, "--repeats", args.repeats)
                    old = best.get(framework, r)
                    best[framework] = {**r, "one": min(r["one"], old["one"]), "all": min(r["all"], old["all"])}
        rate = {f: (args.prompt_tokens / r["one"], args.new_tokens / (r["all"] - r["one"])) for f, r in best.items()}
        for framework in ("minitrain", "transformers"):
            prefill, decode = rate[framework]
            note = (f"{decode / rate['transformers'][1]:.2f}x" if framework == "minitrain" else
                    f"(torch threads {best[framework]['threads']}, attention {best[framework]['attn']})")
            print(f"{name:<14} {framework:<13} {prefill:14.1f} {decode:13.1f}  {note}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
