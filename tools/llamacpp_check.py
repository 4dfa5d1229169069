"""Does llama.cpp itself run a GGUF file minitrain wrote, and continue prompts as minitrain does?

Completion: for each prompt, the ids of both tokenizers (minitrain's reading of the file's
vocabulary, and llama.cpp's), then greedy continuations of N tokens by minitrain (from
--reference, default the GGUF itself) and by llama.cpp on the GGUF, compared token by token.

Llama 3's RoPE scaling, where the model has it (llama.cpp reads it as the rope_freqs tensor): the
logits after a long prompt, llama.cpp's against minitrain's with and without the scaling.

Chat, where the GGUF carries a chat template: for each user turn (with a system turn or
without), the prompt ids `minitrain generate --chat` renders (with --reference's template, which
convert wrote into the GGUF) against those of llama-cpp-python's create_chat_completion (the
GGUF's template, rendered and tokenized as its handler does), then minitrain's greedy reply
(ending at the template's end-of-turn token) against create_chat_completion's. Exit 1 on any
difference. Also shown, not counted: whether llama.cpp's built-in formatter
(llama_chat_apply_template, which llama-cli and llama-server use without --jinja: it recognizes
a template's family and writes that family's format) gives the same prompt.

llama.cpp comes from `llama-cpp-python`, built from its sdist (which vendors llama.cpp); it is not
a dependency of minitrain and not in CI (the build takes about 11 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \\
        pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
    python tools/llamacpp_check.py run/out.gguf --reference run/final.apr

On a quantized file llama.cpp computes differently from the exact dequantized model: it rounds
the activations to 8-bit blocks before each quantized matmul, so near-ties can go another way.
"""

import argparse
import ctypes
import sys
from pathlib import Path

PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):"]
CHATS = [(None, "Write a Python function `indent(text, prefix, predicate=None)` that adds 'prefix' to the "
                "beginning of selected lines in 'text'."),
         ("You write Python.", "What does `zip(*rows)` do?")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the GGUF file llama.cpp runs")
    parser.add_argument("--reference", help="the model minitrain runs (default: the GGUF itself)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", help="repeatable (default: three code prompts)")
    parser.add_argument("--chat-max-new-tokens", type=int, default=160, help="enough for a reply to end its turn")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llamacpp_check: llama_cpp is not installed; see this script's docstring for the build")

    from minitrain.formats.sources import load_model
    from minitrain.formats.sources import load_tokenizer

    tokenizer = load_tokenizer(args.gguf)
    model = load_model(args.reference or args.gguf)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=512, n_threads=2, seed=0, verbose=False)
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) on {args.gguf}; minitrain on "
          f"{args.reference or args.gguf}; greedy, {args.max_new_tokens} new tokens")
    same = all([completion(llm, model, tokenizer, prompt, args.max_new_tokens) for prompt in args.prompt or PROMPTS])
    if model.config.rope_scaling is not None:
        same &= scaled_rope(llm, model, tokenizer)
    if "tokenizer.chat_template" in llm.metadata:
        same &= all([chat(llm, model, tokenizer, args.reference or args.gguf, system, user, args.chat_max_new_tokens)
                     for system, user in CHATS])
    else:
        print(f"\n{args.gguf} has no chat template: no chat case")
    sys.exit(0 if same else 1)


def completion(llm, model, tokenizer, prompt, max_new_tokens):
    from minitrain.generate import Sampling, generate

    eos = llm.token_eos()
    ours_prompt = tokenizer.encode(prompt, add_special_tokens=False).ids
    theirs_prompt = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    ours = generate(model, [ours_prompt], max_new_tokens, Sampling(temperature=0), (eos,))[0][0].ids
    llm.reset()
    theirs = []
    for token in llm.generate(theirs_prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(int(token))
        if token == eos or len(theirs) == max_new_tokens:
            break
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"\nprompt {prompt!r}: prompt ids {'equal' if ours_prompt == theirs_prompt else 'DIFFER'} "
          f"({len(ours_prompt)} tokens); continuations {'identical' if ours == theirs else 'DIFFER'} "
          f"({agree} of {len(ours)} tokens agree)")
    print(f"  minitrain: {tokenizer.decode(ours)!r}")
    print(f"  llama.cpp: {tokenizer.decode(theirs)!r}")
    return ours_prompt == theirs_prompt and ours == theirs


def scaled_rope(llm, model, tokenizer, tokens=480):
    """Llama 3's RoPE scaling, where short prompts cannot show it (the stretched frequencies turn
    by little within a few dozen positions): the logits after a prompt of `tokens` tokens (the
    standard library's json/decoder.py), llama.cpp's (with the file's rope_freqs) against
    minitrain's with the scaling and without it. llama.cpp must be nearer the first by 10x."""
    import dataclasses
    import json as stdlib_json

    import llama_cpp
    import numpy

    from minitrain.autograd import no_grad
    from minitrain.model import Model

    ids = tokenizer.encode(Path(stdlib_json.__file__).with_name("decoder.py").read_text(),
                           add_special_tokens=False).ids[:tokens]
    scoring = llama_cpp.Llama(model_path=llm.model_path, n_ctx=512, n_threads=2, seed=0, verbose=False,
                              logits_all=True)  # llama-cpp-python keeps no logits without it
    scoring.eval(ids)
    theirs = numpy.array(scoring.scores[len(ids) - 1], dtype=numpy.float64)
    plain = Model(dataclasses.replace(model.config, rope_scaling=None), model.params)
    with no_grad():
        ours, unscaled = (m.forward(numpy.array([ids])).data[0, -1].astype(numpy.float64) for m in (model, plain))
    near, far = float(abs(theirs - ours).max()), float(abs(theirs - unscaled).max())
    print(f"\nRoPE scaling, the logits after {len(ids)} tokens: llama.cpp vs minitrain max |diff| {near:.4f}; "
          f"vs minitrain without the scaling {far:.4f} ({'llama.cpp applies it' if 10 * near < far else 'NOT SHOWN'})")
    return 10 * near < far


def chat(llm, model, tokenizer, reference, system, user, max_new_tokens):
    import llama_cpp

    from minitrain.chat import render
    from minitrain.cli import chat_prompting
    from minitrain.generate import Sampling, generate
    from minitrain.formats.vocab import find_eos

    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": user}]
    template, tokens, stop_ids = chat_prompting(reference, tokenizer, None, find_eos(tokenizer, reference))
    ours_prompt = tokenizer.encode(render(template, messages, add_generation_prompt=True, **tokens),
                                   add_special_tokens=False).ids
    ours = generate(model, [ours_prompt], max_new_tokens, Sampling(temperature=0), stop_ids, (),
                    tokenizer.decode)[0][0]
    # create_chat_completion's prompt: the GGUF's template rendered and tokenized as its handler does
    vocab = llm._model
    formatted = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token=vocab.token_get_text(llm.token_eos()),
        bos_token=vocab.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else "")(messages=messages)
    jinja_prompt = llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
    builtin_prompt = llm.tokenize(builtin_template(llm, messages).encode(), add_bos=False, special=True)
    llm.reset()
    reply = llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                       top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0)
    theirs, finish = reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]
    prompts_equal = ours_prompt == jinja_prompt and reply["usage"]["prompt_tokens"] == len(ours_prompt)
    replies_equal = ours.text == theirs and (ours.finish == "eos") == (finish == "stop")
    print(f"\nchat {'system ' + repr(system) + ', ' if system else ''}user {user!r}: prompt ids "
          f"{'equal' if prompts_equal else 'DIFFER'} ({len(ours_prompt)} tokens); replies "
          f"{'identical' if replies_equal else 'DIFFER'} (minitrain ends at: {ours.finish}, llama.cpp: {finish})")
    print(f"  minitrain: {ours.text!r}")
    print(f"  llama.cpp: {theirs!r}")
    if builtin_prompt != ours_prompt:
        print(f"  llama.cpp's built-in formatter writes another prompt ({len(builtin_prompt)} tokens): "
              f"{tokenizer.decode(builtin_prompt, skip_special_tokens=False)!r}")
    return prompts_equal and replies_equal


def builtin_template(llm, messages):
    """The prompt llama.cpp's own C++ formatter writes (llama_chat_apply_template, on the template
    it recognizes in the GGUF's), with the generation prompt."""
    import llama_cpp

    template = llama_cpp.llama_model_chat_template(llm._model.model, None)
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    size = llama_cpp.llama_chat_apply_template(template, chat, len(keep), True, None, 0)
    if size < 0:
        return "<llama.cpp does not recognize this template>"
    buffer = ctypes.create_string_buffer(size + 1)
    llama_cpp.llama_chat_apply_template(template, chat, len(keep), True, buffer, size + 1)
    return buffer.raw[:size].decode()


if __name__ == "__main__":
    main()
