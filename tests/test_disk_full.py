"""A full disk (ENOSPC injected where the bytes are written) while writing a checkpoint,
final.apr, metrics.jsonl or an export: one line naming the path, the cause and for a full disk
how much was needed and is free; what was half written is gone, earlier checkpoints are
untouched; exit 3."""

import errno
import re
import sys

import numpy
import pytest
import safetensors
import safetensors.numpy

from minitrain import checkpoint

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.bin"
    numpy.random.default_rng(0).integers(0, 256, 41 * 17).astype("<u4").tofile(path)
    return path


def command(monkeypatch, capsys, *args):
    """minitrain ARGS in this process -> (exit code, stderr)."""
    from minitrain.cli import main

    monkeypatch.setattr(sys, "argv", ["minitrain", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        main()
    return exit.value.code, capsys.readouterr().err


def pretrain(tokens, out, *more):
    return ["pretrain", "--data", tokens, "--arch", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--steps", "4",
            "--val-windows", "4", "--eval-every", "0", "--warmup-steps", "1", "--out", out, *more]


def only_line(err):
    lines = err.strip().splitlines()
    assert lines[-1].startswith("minitrain: error: cannot write ") and "Traceback" not in err, err
    return lines[-1]


def full_after(calls, real):
    """A save_file that writes `calls` files, then half of the next and fails as a full disk does."""
    count = []

    def save_file(arrays, path, metadata=None):
        count.append(path)
        if len(count) > calls:
            open(path, "wb").write(b"\0" * 100)
            raise safetensors.SafetensorError(FULL)
        real(arrays, path, metadata=metadata)
    return save_file


def test_a_full_disk_at_a_checkpoint_leaves_the_earlier_one_whole(tokens, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(safetensors.numpy, "save_file", full_after(2, safetensors.numpy.save_file))  # step-2: 2 files
    code, err = command(monkeypatch, capsys, *pretrain(tokens, tmp_path / "run", "--save-every", "2"))
    line = only_line(err)
    assert code == 3 and re.fullmatch(rf"minitrain: error: cannot write {tmp_path / 'run' / 'step-4'}: No space left "
                                      rf"on device \([\d,.]+ MB needed, [\d,.]+ MB free on /\S*\)", line), line
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "step" in p.name) == ["step-2"]  # no .partial
    state, model, optimizer, _ = checkpoint.load(tmp_path / "run" / "step-2")
    assert state["step"] == 2 and model and optimizer


def test_a_full_disk_at_final_apr_or_metrics(tokens, tmp_path, monkeypatch, capsys):
    from minitrain.formats import apr

    class Full:
        def __init__(self, path, *args, **kwargs):
            self.f = open(path, *args, **kwargs)

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(apr, "open", Full, raising=False)
    code, err = command(monkeypatch, capsys, *pretrain(tokens, tmp_path / "a"))
    assert code == 3, err
    assert f"cannot write {tmp_path / 'a' / 'final.apr'}: No space left on device (" in only_line(err)
    assert not list((tmp_path / "a").glob("final.apr*"))
    monkeypatch.undo()
    from minitrain.outputs import RunFiles

    real = RunFiles.start

    def start(self, info, resumed_step):  # metrics.jsonl opened, then every write to it fails
        real(self, info, resumed_step)
        self.metrics.close()
        self.metrics = Full(self.out / "metrics.jsonl", "a")

    monkeypatch.setattr(RunFiles, "start", start)
    code, err = command(monkeypatch, capsys, *pretrain(tokens, tmp_path / "b"))
    assert code == 3 and f"cannot write {tmp_path / 'b' / 'metrics.jsonl'}: No space left on device (" in only_line(err)


@pytest.mark.parametrize("dst", ["m.gguf", "m.apr", "hf"])
def test_a_full_disk_during_an_export_leaves_nothing(tokens, tmp_path, monkeypatch, capsys, dst):
    from minitrain.demo import train_bpe

    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    train_bpe([tmp_path / "text.txt"], 300, tmp_path / "tokenizer.json")
    assert command(monkeypatch, capsys, *pretrain(tokens, tmp_path / "run", "--tokenizer", tmp_path / "tokenizer.json"))[0] == 0
    import gguf as gguf_py

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_py.GGUFWriter, "write_tensors_to_file", full)
    monkeypatch.setattr(safetensors.numpy, "save_file", full_after(0, safetensors.numpy.save_file))
    from minitrain.formats import apr

    monkeypatch.setattr(apr.os, "replace", full)
    code, err = command(monkeypatch, capsys, "convert", tmp_path / "run" / "final.apr", tmp_path / "out" / dst)
    assert code == 3, err
    assert f"cannot write {tmp_path / 'out' / dst}: No space left on device (" in only_line(err)
    assert list((tmp_path / "out").iterdir()) == []
