"""A layer-truncated copy of a model: its first K decoder layers, with its embedding, final norm
and head, as an APR file; a smaller student of the same tokenizer, for distillation.

    python tools/truncate_layers.py SRC DST.apr --layers K [--tokenizer PATH]
"""

import argparse
import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minitrain.formats.apr import apr_tensors
from minitrain.formats.sources import checked_tokenizer  # noqa: E402
from minitrain.formats.apr import write_apr  # noqa: E402
from minitrain.formats.apr_meta import model_metadata  # noqa: E402
from minitrain.formats.sources import load_source  # noqa: E402
from minitrain.model import Model  # noqa: E402

LAYER = re.compile(r"model\.layers\.(\d+)\.")


def truncate(src, dst, layers, tokenizer=None):
    config, arrays = load_source(src)
    if not 1 <= layers <= config.num_hidden_layers:
        sys.exit(f"truncate_layers: --layers {layers}: {src} has {config.num_hidden_layers} layers")
    config = dataclasses.replace(config, num_hidden_layers=layers)
    kept = {n: a for n, a in arrays.items() if not (m := LAYER.match(n)) or int(m.group(1)) < layers}
    model = Model.from_arrays(config, kept)  # checks the table of the truncated model
    write_apr(dst, apr_tensors(config, kept),
              model_metadata(config, model.num_parameters(), tokenizer and checked_tokenizer(tokenizer, config)))
    return f"{src} -> {dst}: the first {layers} layers, {model.num_parameters():,} parameters"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--tokenizer", help="embed this tokenizer (a model source that carries one)")
    args = parser.parse_args()
    print(truncate(args.src, args.dst, args.layers, args.tokenizer))


if __name__ == "__main__":
    main()
