"""Token data: little-endian u32 ids in `.bin` shards, read as non-overlapping windows.

Window k of a shard holds tokens [k*(T+1), (k+1)*(T+1)): input = the first T, target = the last
T (each input token's next token). A shard's tail shorter than T+1 is dropped. Windows are
numbered across shards in lexical file order. Shards are memory-mapped, never read whole.

Loss masks (`minitrain tokenize --chat`): beside a shard NAME.bin, NAME.mask holds one byte per
token, 1 where the token is a training target. Where a shard has one, a target whose mask byte is
0 is IGNORE (-100): the loss leaves its position out (ops/cross_entropy.py). Every shard has a
mask, or none does.

Packed windows (`tokenize --chat --pack --seq-len T`): NAME.pos holds each token's position inside
its conversation (u32; 0 where a conversation starts, then +1 per token). The model turns RoPE by
them and attention never crosses conversations (model.hidden). Each window must start a
conversation: data packed for another --seq-len is refused.

Preference pairs (`tokenize --preference --seq-len T`, manifest.json "pairs"): pair k is windows
2k (prompt + chosen) and 2k + 1 (prompt + rejected), each sequence at its window's start and
padded with EOS (mask 0) after; the masks mark the completions' tokens. PairWindows reads them a
pair at a time.
"""

import json
from collections import namedtuple
from pathlib import Path

import numpy

from minitrain.errors import InputError
from minitrain.ops.cross_entropy import IGNORE


# What an objective is handed for each micro-batch: inputs and targets (B, T), the positions of
# packed windows (else None), and for preference pairs the reference model's log-probabilities of
# its sequences (else None).
Batch = namedtuple("Batch", "inputs targets positions reference")


def token_files(path):
    """One .bin file, or every .bin in a directory (lexical order)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.bin"))
        if not files:
            raise InputError(f"{p}: directory has no .bin token shards")
        return files
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    return [p]


class TokenWindows:
    def __init__(self, path, seq_len, vocab_size):
        if seq_len < 1:
            raise InputError(f"--seq-len must be at least 1, got {seq_len}")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.files = token_files(path)
        self.shards, self.first_window = [], []  # first_window[i]: global index of shard i's window 0
        total = 0
        for f in self.files:
            size = f.stat().st_size
            if size % 4:
                raise InputError(f"{f}: size {size} bytes is not a multiple of 4 (u32 token ids)")
            shard = numpy.memmap(f, dtype="<u4", mode="r") if size else numpy.zeros(0, dtype="<u4")
            self.shards.append(shard)
            self.first_window.append(total)
            total += len(shard) // (seq_len + 1)
        self.masks = self._beside(".mask", numpy.dtype(numpy.uint8))  # per shard its u8 mask, or None without masks
        self.pos = self._beside(".pos", numpy.dtype("<u4"))  # per shard its u32 positions, or None
        if self.pos is not None:
            self._check_positions()
        self.num_windows = total
        if total == 0:
            raise InputError(f"{path}: no window of {seq_len + 1} tokens (--seq-len {seq_len} + 1) in the data")
        self._check_vocab()

    def _beside(self, suffix, dtype):
        """The per-token shards NAME{suffix} beside every NAME.bin, memory-mapped; None if there are
        none; an error if only some shards have one or one's length is not its shard's."""
        found = [f.with_suffix(suffix) for f in self.files if f.with_suffix(suffix).is_file()]
        if not found:
            return None
        if len(found) != len(self.files):
            missing = next(f for f in self.files if not f.with_suffix(suffix).is_file())
            raise InputError(f"{missing.with_suffix(suffix)}: missing; {len(found)} of the {len(self.files)} token "
                             f"shards have a {suffix} shard beside them (all or none must)")
        arrays = []
        for f, shard in zip(found, self.shards):
            size = f.stat().st_size
            if size != len(shard) * dtype.itemsize:
                raise InputError(f"{f}: {size} bytes for the {len(shard)} tokens of {f.with_suffix('.bin').name} "
                                 f"({dtype.itemsize} per token)")
            arrays.append(numpy.memmap(f, dtype=dtype, mode="r") if size else numpy.zeros(0, dtype))
        return arrays

    def _check_positions(self, chunk=1 << 24):
        """Positions start at 0 in every window and go up by one, or back to 0 where a conversation
        starts: checked once, up front, like the token ids."""
        for f, pos in zip(self.files, self.pos):
            f = f.with_suffix(".pos")
            used = len(pos) // (self.seq_len + 1) * (self.seq_len + 1)
            firsts = pos[:used:self.seq_len + 1]
            if firsts.any():
                k = int(numpy.argmax(firsts != 0))
                raise InputError(f"{f}: window {k} starts at position {int(firsts[k])}, not 0: the data was packed "
                                 f"for another --seq-len than {self.seq_len} (its manifest.json says which)")
            for start in range(1, used, chunk):
                now = pos[start: min(start + chunk, used)].astype(numpy.int64)
                before = pos[start - 1: min(start + chunk, used) - 1].astype(numpy.int64)
                bad = (now != 0) & (now != before + 1)
                if bad.any():
                    at = start + int(numpy.argmax(bad))
                    raise InputError(f"{f}: position {int(pos[at])} at token {at} follows {int(pos[at - 1])}: a "
                                     f"conversation's positions go up by one (0 where one starts)")

    def _check_vocab(self, chunk=1 << 24):
        """Every token any window can read must be < vocab_size: checked once, up front, so bad
        data fails before the first step, naming the file and the token's position."""
        for f, shard in zip(self.files, self.shards):
            used = len(shard) // (self.seq_len + 1) * (self.seq_len + 1)
            for start in range(0, used, chunk):
                part = shard[start: min(start + chunk, used)]
                if int(part.max()) >= self.vocab_size:
                    pos = start + int(numpy.argmax(part >= self.vocab_size))
                    raise InputError(f"{f}: token id {int(shard[pos])} at position {pos} (byte {4 * pos}) "
                                     f"is >= the model's vocab_size {self.vocab_size}")

    def __len__(self):
        return self.num_windows

    def _locate(self, k):
        """(shard index, first token) of window k."""
        i = int(numpy.searchsorted(self.first_window, k, side="right")) - 1
        return i, (k - self.first_window[i]) * (self.seq_len + 1)

    def window(self, k):
        """Window k as (T+1,) int64."""
        i, start = self._locate(k)
        return numpy.asarray(self.shards[i][start: start + self.seq_len + 1], dtype=numpy.int64)

    def batch(self, indices):
        """Windows `indices` -> (inputs, targets), each (B, T) int64; with masks, a target is IGNORE
        where its mask byte is 0."""
        w = numpy.stack([self.window(k) for k in indices])  # (B, T+1)
        inputs, targets = w[:, :-1], w[:, 1:]
        if self.masks is not None:
            mask = numpy.stack([self.masks[i][start: start + self.seq_len + 1]
                                for i, start in map(self._locate, indices)])  # (B, T+1) u8
            targets = numpy.where(mask[:, 1:] == 1, targets, IGNORE)
        return inputs, targets

    def positions(self, indices):
        """The inputs' positions inside their conversations, (B, T) int64, for packed data; else
        None (every window is positions 0..T-1)."""
        if self.pos is None:
            return None
        return numpy.stack([numpy.asarray(self.pos[i][start: start + self.seq_len], dtype=numpy.int64)
                            for i, start in map(self._locate, indices)])

    def examples(self, indices):
        """Windows `indices` as an objective's Batch."""
        return Batch(*self.batch(indices), self.positions(indices), None)


def manifest_path(path):
    """Where the manifest.json of token data is: in the directory, or beside the .bin file."""
    p = Path(path)
    return (p if p.is_dir() else p.parent) / "manifest.json"


def manifest_of(path):
    """The manifest.json beside token data (manifest_path), or {} without one; InputError if it is
    not a JSON object."""
    found = manifest_path(path)
    if not found.is_file():
        return {}
    try:
        manifest = json.loads(found.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{found}: not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{found}: expected a JSON object")
    return manifest


class PairWindows:
    """The preference pairs of token windows written by `tokenize --preference` (see the module's
    docstring): pair k is windows 2k (chosen) and 2k + 1 (rejected). A batch of pairs is their 2B
    sequences, the chosen first (TRL's order), cut after the last column that holds a target of
    any of them: what follows is padding, which no earlier position attends to (causal attention),
    so every target's log-probability is what the whole window gives. `reference`: the reference
    model's log-probabilities, (pairs, 2) float64 [chosen, rejected], once they are known."""

    def __init__(self, windows, path):
        pairs = manifest_of(path).get("pairs")
        if not isinstance(pairs, dict):
            raise InputError(f"{path}: no preference pairs (its manifest.json has no \"pairs\"); make them with "
                             f"`minitrain tokenize --preference --seq-len {windows.seq_len}`")
        if pairs.get("seq_len") != windows.seq_len:
            raise InputError(f"{path}: pairs written for --seq-len {pairs.get('seq_len')} (manifest.json), not "
                             f"{windows.seq_len}: train at that --seq-len")
        if windows.masks is None or len(windows) % 2:
            raise InputError(f"{path}: {len(windows)} windows{'' if windows.masks is not None else ' without masks'}: "
                             f"pair data is an even number of windows with their .mask shards")
        self.windows, self.reference = windows, None

    def __len__(self):
        return len(self.windows) // 2

    def examples(self, pairs):
        """Pairs `pairs` -> Batch: inputs and targets (2B, t), t <= T, positions None, and their
        reference log-probabilities (2B,) [chosen..., rejected...] once known."""
        inputs, targets = self.windows.batch([2 * k for k in pairs] + [2 * k + 1 for k in pairs])
        used = numpy.flatnonzero((targets != IGNORE).any(axis=0))
        width = int(used[-1]) + 1 if used.size else 1
        reference = None if self.reference is None else self.reference[pairs].T.reshape(-1)  # (2B,)
        return Batch(inputs[:, :width], targets[:, :width], None, reference)


def target_count(targets):
    """The targets the loss counts (not IGNORE) in a batch's targets."""
    return int(numpy.count_nonzero(numpy.asarray(targets) != IGNORE))


class TrainStream:
    """Training windows 0..n-1 of `windows`, consumed as an endless stream of samples.

    Sample k belongs to epoch e = k // n, position k % n. Sequential order reads window k % n;
    shuffle reads window perm_e[k % n] with perm_e a fresh permutation drawn from
    numpy.random.default_rng([seed, e]). The whole data position is therefore one number, the
    next sample index, and the stream never reaches window n or beyond: windows held out for
    validation after the first n are never trained on, however often the stream wraps around.
    """

    def __init__(self, windows, n, order, seed):
        if order not in ("sequential", "shuffle"):
            raise InputError(f"--data-order {order!r}: expected sequential or shuffle")
        if n < 1:
            raise InputError("no training windows left after the validation hold-out")
        self.windows, self.n, self.order, self.seed = windows, n, order, seed
        self._perm = (None, None)  # (epoch, permutation) cache

    def window_ids(self, start, count):
        ids = []
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.n)
            if self.order == "sequential":
                ids.append(pos)
                continue
            if self._perm[0] != epoch:
                self._perm = (epoch, numpy.random.default_rng([self.seed, epoch]).permutation(self.n))
            ids.append(int(self._perm[1][pos]))
        return ids

    def batch(self, start, count):
        """Samples start..start+count-1 as (inputs, targets), each (count, T)."""
        return self.windows.batch(self.window_ids(start, count))

    def positions(self, start, count):
        """Their positions (count, T) for packed data, else None."""
        return self.windows.positions(self.window_ids(start, count))

    def examples(self, start, count):
        """Samples start..start+count-1 as an objective's Batch."""
        return self.windows.examples(self.window_ids(start, count))
