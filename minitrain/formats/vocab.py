"""The names tokenizers give their end-of-text token, and finding it in a vocabulary."""

from minitrain.errors import InputError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


def find_eos(tokenizer, source="tokenizer"):
    """The EOS id: the first of EOS_NAMES the vocabulary has. `source` names it in the error."""
    for name in EOS_NAMES:
        eos = tokenizer.token_to_id(name)
        if eos is not None:
            return eos
    raise InputError(f"{source}: no end-of-text token; tried {', '.join(EOS_NAMES)}")
