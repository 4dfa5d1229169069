"""Does llama.cpp itself run a GGUF file minitrain wrote, and continue prompts as minitrain does?

For each prompt: the ids of both tokenizers (minitrain's reading of the file's vocabulary, and
llama.cpp's), then greedy continuations of N tokens by minitrain (from --reference, default the
GGUF itself) and by llama.cpp on the GGUF, compared token by token. Exit 1 on any difference.

llama.cpp comes from `llama-cpp-python`, built from its sdist (which vendors llama.cpp); it is not
a dependency of minitrain and not in CI (the build takes about 11 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \\
        pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
    python tools/llamacpp_check.py run/out.gguf --reference run/final.apr

On a quantized file llama.cpp computes differently from the exact dequantized model: it rounds
the activations to 8-bit blocks before each quantized matmul, so near-ties can go another way.
"""

import argparse
import sys

PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the GGUF file llama.cpp runs")
    parser.add_argument("--reference", help="the model minitrain runs (default: the GGUF itself)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", help="repeatable (default: three code prompts)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llamacpp_check: llama_cpp is not installed; see this script's docstring for the build")

    from minitrain.formats.sources import load_model
    from minitrain.generate import Sampling, generate
    from minitrain.tokenize import load_tokenizer

    tokenizer = load_tokenizer(args.gguf)
    model = load_model(args.reference or args.gguf)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=512, n_threads=2, seed=0, verbose=False)
    eos = llm.token_eos()
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) on {args.gguf}; minitrain on "
          f"{args.reference or args.gguf}; greedy, {args.max_new_tokens} new tokens")
    same = True
    for prompt in args.prompt or PROMPTS:
        ours_prompt = tokenizer.encode(prompt, add_special_tokens=False).ids
        theirs_prompt = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        ours = generate(model, [ours_prompt], args.max_new_tokens, Sampling(temperature=0), eos)[0][0].ids
        llm.reset()
        theirs = []
        for token in llm.generate(theirs_prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(int(token))
            if token == eos or len(theirs) == args.max_new_tokens:
                break
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        ok = ours_prompt == theirs_prompt and ours == theirs
        same &= ok
        print(f"\nprompt {prompt!r}: prompt ids {'equal' if ours_prompt == theirs_prompt else 'DIFFER'} "
              f"({len(ours_prompt)} tokens); continuations {'identical' if ours == theirs else 'DIFFER'} "
              f"({agree} of {len(ours)} tokens agree)")
        print(f"  minitrain: {tokenizer.decode(ours)!r}")
        print(f"  llama.cpp: {tokenizer.decode(theirs)!r}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
