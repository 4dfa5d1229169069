"""The training step that tools/bench_cpu.py, bench_gpu.py and profile_cpu.py time, written once
so that every comparison runs the same work: a preset built from scratch, random tokens, forward
+ backward + AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0.1); in minitrain, and in Hugging
Face transformers + PyTorch eager with the same config. With a LoRA rank, the base is frozen and
AdamW trains adapters of that rank on all seven linears of every layer (alpha = rank): in
minitrain (lora.py), and in peft on the transformers model.

FLOPs per token (reference.md section 5): 6 N + 12 L H T, with N the parameters that take part in
matmuls: everything but the embedding lookup, the lm_head included (counted even when tied).

Also child(): how the benchmarks run each framework in a fresh process of their own script.
"""

import json
import subprocess
import sys

ADAMW = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}


def flops_per_token(cfg, seq_len):
    from minitrain.config import parameter_count

    head = cfg.vocab_size * cfg.hidden_size
    n = parameter_count(cfg) - head + (head if cfg.tie_word_embeddings else 0)  # lookup out, lm_head matmul in
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len  # q kᵀ and P v, 3x
    return 6 * n + attention


def minitrain_step(cfg, batch, seq_len, lora_rank=None, recompute="none"):
    """(step, optimizer): step() runs one minitrain training step on the backend as it is set now
    (device, dtype), recomputing the blocks `recompute` names. The optimizer is returned so that
    a profiler can wrap its step."""
    import numpy

    from minitrain import lora
    from minitrain.model import Model
    from minitrain.optim import AdamW

    model = Model.from_scratch(cfg, seed=0)
    model.recompute = recompute
    if lora_rank:
        params = lora.Adapters.fresh(lora.LoRASpec(lora_rank, float(lora_rank)), cfg, seed=0).attach(model).adapters.parameters()
    else:
        params = model.parameters()
    opt = AdamW(params, **ADAMW)
    ids = numpy.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1))

    def step():
        for p in params:
            p.zero_grad()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()

    return step, opt


def hf_model(transformers, cfg, attn_implementation=None):
    """The transformers model of the same architecture and config, randomly initialized (torch's
    seed 0), fp32, in training mode, on the CPU; attention by transformers' default, or by
    `attn_implementation` ("eager", "sdpa")."""
    import torch

    from minitrain.formats.hf import config_to_hf

    d = config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(
        cfg.family, **{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")},
        attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float().train()


def peft_model(transformers, cfg, lora_rank):
    """hf_model with peft's LoRA adapters of that rank on the seven linears (the base frozen)."""
    import peft

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(hf_model(transformers, cfg), peft.LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                                                            target_modules=targets))


def torch_step(torch, model, cfg, batch, seq_len, bf16=False, clip=None):
    """step() runs one PyTorch training step of `model` on its device; with bf16, the forward runs
    under bf16 autocast (the loss stays fp32); with clip, the gradients are clipped to that global
    norm before the update (as `minitrain pretrain`'s step does)."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    return step


def child(script, framework, *args):
    """Run `python script --child framework args...` and return the JSON object its last stdout
    line holds; a failed child ends the benchmark with its stderr."""
    out = subprocess.run([sys.executable, script, "--child", framework, *map(str, args)], capture_output=True,
                         text=True)
    if out.returncode:
        how = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit {out.returncode}"
        raise SystemExit(f"{framework} child failed ({how}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])
