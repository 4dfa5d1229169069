"""What a model file carries, read through one door: `open_model(path)` tells an `.apr` file, a
`.gguf` file and a Hugging Face directory apart once (for files, the magic, not the name), and
the object it returns reads what that source keeps, where it keeps it:

                  weights + config          tokenizer             chat template                special tokens
    HF directory  config.json, safetensors  tokenizer.json        chat_template.jinja, else    tokenizer_config.json
                                                                  tokenizer_config.json's
    GGUF file     tensors, <arch>.* keys    tokenizer.ggml.*      tokenizer.chat_template      tokenizer.ggml.*_token_id
    APR file      tensors, metadata         metadata              metadata chat_template       chat_bos_token,
                  (apr_model.py)            tokenizer.json                                     chat_eos_token

The commands use the functions below: `load_source`/`load_model` (the weights, strictly checked;
with `--arch`, whatever the source, the loaded architecture must equal the preset field by
field), `load_tokenizer` (a --tokenizer file: tokenizer.json, or a GGUF or APR file's own),
`model_tokenizer` (the tokenizer that comes with a model), `model_template` and `special_tokens`
(what chat.py renders conversations with), and `describe` through `inspect`.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

from tokenizers import Tokenizer

from minitrain.config import PRESETS, ModelConfig
from minitrain.errors import InputError
from minitrain.formats import gguf, hf, safetensors_io
from minitrain.formats.apr import FLAG_NAMES, read_apr
from minitrain.formats.apr_meta import TOKENIZER_JSON
from minitrain.formats.apr_model import load_apr
from minitrain.formats.json_file import load_json
from minitrain.formats.vocab import find_eos
from minitrain.model import Model

APR_MAGICS = (b"APR\0", b"APR2")


class NoTokenizer(InputError):
    """A model that carries no usable tokenizer (as opposed to a broken one)."""


@dataclass(frozen=True)
class Template:
    """A chat template's Jinja text, and where it came from."""

    text: str
    origin: str  # for messages: "model.gguf (tokenizer.chat_template)"


# --- the three sources --------------------------------------------------------------------------

class Source:
    """A model source at `path`; each kind below reads its own places (see the table above)."""

    kind = label = None

    def __init__(self, path):
        self.path = path


class HFDirectory(Source):
    kind, label = "hf", "Hugging Face directory"

    def weights(self, arch, rope_layout):
        return hf.load_dir(self.path)

    def tokenizer_file(self):
        if (self.path / "tokenizer.json").is_file():
            return self.path / "tokenizer.json"
        raise NoTokenizer(f"{self.path}: no tokenizer.json; give --tokenizer tokenizer.json (or the .gguf it came "
                          "from)")

    def chat_template(self):
        if (self.path / "chat_template.jinja").is_file():
            return template_file(self.path / "chat_template.jinja")
        value = hf.tokenizer_config(self.path).get("chat_template")
        origin = f"{self.path / 'tokenizer_config.json'} (chat_template)"
        if value is None or value == "":  # a string, or a list of {"name", "template"}
            return None
        if isinstance(value, str):
            return Template(value, origin)
        if isinstance(value, list) and value and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                                     for t in value):
            chosen = next((t for t in value if t.get("name") == "default"), value[0])
            return Template(chosen["template"], f"{origin[:-1]}, {chosen.get('name', 'the first')!s})")
        raise InputError(f"{origin}: expected a string or a list of {{\"name\", \"template\"}} objects, found "
                         f"{json.dumps(value)[:80]}")

    def special_tokens(self, tokenizer):
        """tokenizer_config.json's bos_token and eos_token (strings, or {"content": ...})."""
        config, tokens = hf.tokenizer_config(self.path), {}
        for key in ("bos_token", "eos_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[key] = value
        return tokens

    def describe(self):
        metadata, tensors = load_json(self.path / "config.json"), []
        for f in hf.shard_files(self.path):
            header = safetensors_io.read_header(f)[0]
            tensors += [{"name": n, "dtype": t["dtype"], "shape": t["shape"],
                         "nbytes": t["data_offsets"][1] - t["data_offsets"][0]} for n, t in header.items()]
        tensors.sort(key=lambda t: t["name"].encode())
        return {"format": "hf-safetensors", "metadata": metadata, "tensors": tensors}


class GGUFFile(Source):
    kind, label = "gguf", "GGUF file"

    def weights(self, arch, rope_layout):
        return gguf.load_gguf(self.path)

    def tokenizer_file(self):
        return self.path

    def tokenizer(self):
        return gguf.read_tokenizer(self.path)

    def chat_template(self):
        text = self._keys().get("tokenizer.chat_template")
        return Template(text, f"{self.path} (tokenizer.chat_template)") if isinstance(text, str) and text else None

    def special_tokens(self, tokenizer):
        """The tokens of the ids the keys name: the end of a turn first, then the end of text."""
        values, tokens = self._keys(), {}
        for key, names in (("bos_token", ["tokenizer.ggml.bos_token_id"]),
                           ("eos_token", ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id"])):
            ids = [values[f] for f in names if isinstance(values.get(f), int) and values[f] >= 0]
            if tokenizer is not None and ids and tokenizer.id_to_token(ids[0]) is not None:
                tokens[key] = tokenizer.id_to_token(ids[0])
        return tokens

    def describe(self):
        reader = gguf.open_gguf(self.path)
        values = gguf.fields(reader)
        return {"format": "gguf", "version": str(values.pop("GGUF.version")),
                "metadata": {k: v for k, v in values.items() if not k.startswith("GGUF.")},
                "tensors": [{"name": t.name, "dtype": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)],
                             "nbytes": int(t.n_bytes)} for t in reader.tensors]}

    def _keys(self):
        return gguf.fields(gguf.open_gguf(self.path))


class APRFile(Source):
    kind, label = "apr", "APR file"

    def weights(self, arch, rope_layout):
        return load_apr(self.path, arch, rope_layout)

    def tokenizer_file(self):
        return self.path

    def tokenizer(self):
        meta = read_apr(self.path).metadata
        if TOKENIZER_JSON not in meta:
            has = "a vocabulary without its pre-tokenizer" if "tokenizer.vocabulary" in meta else "no tokenizer"
            raise NoTokenizer(f"{self.path}: the file embeds {has}; give --tokenizer tokenizer.json (or the .gguf it "
                              "came from)")
        return _parsed(self.path, lambda: Tokenizer.from_str(meta[TOKENIZER_JSON]))

    def chat_template(self):
        text = read_apr(self.path).metadata.get("chat_template")
        return Template(text, f"{self.path} (metadata chat_template)") if isinstance(text, str) and text else None

    def special_tokens(self, tokenizer):
        """minitrain's keys chat_bos_token and chat_eos_token."""
        meta = read_apr(self.path).metadata
        return {key: meta[f"chat_{key}"] for key in ("bos_token", "eos_token")
                if isinstance(meta.get(f"chat_{key}"), str)}

    def describe(self):
        apr = read_apr(self.path)
        h = apr.header
        return {"format": "apr", "version": ".".join(map(str, h["version"])), "magic": h["magic"],
                "flags": [name for bit, name in FLAG_NAMES.items() if h["flags"] & bit], "footer": apr.has_footer,
                "metadata": apr.metadata,
                "tensors": [{"name": t.name, "dtype": t.dtype_name, "shape": list(t.shape), "nbytes": t.size}
                            for t in apr.tensors.values()]}


def _magic(path):
    with open(path, "rb") as f:
        return f.read(4)


def open_model(path):
    """The source at `path` (HFDirectory, GGUFFile or APRFile); InputError if there is nothing."""
    p = Path(path)
    if p.is_dir():
        return HFDirectory(p)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    return GGUFFile(p) if _magic(p) == b"GGUF" or p.suffix == ".gguf" else APRFile(p)


# --- weights ------------------------------------------------------------------------------------

def load_source(path, arch=None, rope_layout=None):
    """(ModelConfig, name -> float32 array in the Hugging Face layout) from any model source,
    strictly checked; `arch` (a preset name) supplies what an APR file lacks and must match the
    result; `rope_layout` says how an APR file's rope_type 0 rows are ordered."""
    if arch is not None and arch not in PRESETS:
        raise InputError(f"--arch {arch!r}: unknown; expected one of {', '.join(PRESETS)}")
    source = open_model(path)
    if rope_layout is not None and source.kind != "apr":
        raise InputError(f"--rope-layout is for .apr files (their rope_type 0 is ambiguous); {path} is a "
                         f"{source.label}, whose layout is known")
    cfg, arrays = source.weights(arch, rope_layout)
    if arch is not None:
        check_arch(arch, cfg, str(path))
    return cfg, arrays


def load_model(path, arch=None, rope_layout=None):
    """A Model with the weights of `path`, strictly checked (see load_source)."""
    return Model.from_arrays(*load_source(path, arch, rope_layout))


def check_arch(name, config, source):
    """InputError naming every field where `config` differs from the preset `name`."""
    expected = PRESETS[name]
    diffs = [f"{f.name}: --arch {getattr(expected, f.name)} vs file {getattr(config, f.name)}"
             for f in fields(ModelConfig) if getattr(expected, f.name) != getattr(config, f.name)]
    if diffs:
        raise InputError(f"{source}: does not match --arch {name}: {'; '.join(diffs)}")


# --- tokenizers ---------------------------------------------------------------------------------

def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file, or the one a GGUF or APR file embeds."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such tokenizer file")
    if _magic(p) in (b"GGUF", *APR_MAGICS):
        return open_model(p).tokenizer()
    return _parsed(p, lambda: Tokenizer.from_file(str(p)))


def _parsed(path, parse):
    try:
        return parse()
    except Exception as e:  # the library raises a bare Exception with serde's message
        raise InputError(f"{path}: not a valid tokenizer.json ({e})") from None


def model_tokenizer(model_path):
    """The tokenizer file that comes with a model: an HF directory's tokenizer.json, a GGUF or
    APR file itself (load_tokenizer reads what it embeds); NoTokenizer where there is none."""
    return open_model(model_path).tokenizer_file()


def own_tokenizer(model_path):
    """The tokenizer a model carries (model_tokenizer's, loaded), or None where it carries none."""
    try:
        return load_tokenizer(model_tokenizer(model_path))
    except NoTokenizer:
        return None


def checked_tokenizer(path, config):
    """A tokenizers.Tokenizer (load_tokenizer's) whose vocabulary fits the model's rows."""
    tokenizer = load_tokenizer(path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise InputError(f"{path}: tokenizer vocabulary {size} is larger than the model's vocab_size "
                         f"{config.vocab_size}")
    return tokenizer


# --- chat templates -----------------------------------------------------------------------------

def template_file(path):
    """A chat template file (a --chat-template FILE.jinja, an HF directory's chat_template.jinja)."""
    p = Path(path)
    try:
        return Template(p.read_text(encoding="utf-8"), str(p))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--chat-template {p}: cannot read it ({e.strerror if isinstance(e, OSError) else e})") from None


def model_template(model_path):
    """The chat template a model keeps, or None when it keeps none."""
    return open_model(model_path).chat_template()


def special_tokens(model, tokenizer):
    """bos_token and eos_token of a model as it names them (see the table above), else the
    tokenizer's EOS and no BOS (no tokenizer: none). eos_token is the end of a turn for the chat
    templates here."""
    tokens = {"bos_token": "", "eos_token": ""}
    if tokenizer is not None:
        try:
            tokens["eos_token"] = tokenizer.id_to_token(find_eos(tokenizer, str(model)))
        except InputError:  # a tokenizer without an end-of-text token: the template must name its own
            pass
    tokens.update(open_model(model).special_tokens(tokenizer))
    return tokens


def model_of_tokenizer(tokenizer_path):
    """The model a tokenizer belongs to: a GGUF or APR file is its own; a tokenizer.json, the HF
    directory that holds it."""
    p = Path(tokenizer_path)
    return p.parent if p.suffix == ".json" else p

