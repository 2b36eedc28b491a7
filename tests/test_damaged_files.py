"""Every damaged checkpoint or safetensors file is refused with CheckpointError, never another exception.

The damages are the ones a disk, a copy or a download does: random bytes changed, the file cut short, bytes
appended. Issue 29 found 3 of 900 such files raising a bare ``NotImplementedError: zip file version 11.4`` from
the zip reader; here a fixed seed draws the same kinds of damage (plus the zip header fields that produced that
error, changed on purpose) and every load must either raise CheckpointError or give back exactly what was saved.

What "exactly what was saved" can mean differs by format. A ``.npz`` checkpoint is a zip archive whose entries
carry a CRC-32, so a changed byte in an array is found; bytes changed in a part of the zip the reader does not
use (a timestamp, a local header's "version needed") or appended after it leave the content intact. A
safetensors file has no checksum at all (its format has none): a changed byte inside a tensor's data loads as
a different number, and nothing can tell. For safetensors the test therefore asks for CheckpointError or a
model of the saved architecture.
"""
import io
import zipfile

import numpy as np
import pytest

import fastbp
from fastbp.checkpoint import CheckpointError

N_RANDOM_DAMAGES = 150  # per file kind: 450 damaged files in all, about a second to load


def state_bytes(thing):
    """Everything a loaded model or trainer holds, as bytes and plain values, for exact comparison."""
    if isinstance(thing, fastbp.Trainer):
        return (state_bytes(thing.model), thing.opt_state.tobytes(), thing.steps_done, thing.epochs_done,
                repr(thing._rng.bit_generator.state), repr(thing.history.as_dict()), thing.loss, thing.optimizer)
    return (list(thing.sizes), list(thing.activations), thing.dtype.name, thing.flat_parameters().tobytes())


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(name, bytes, loader, what loading the intact file gives) for a model .npz, a trainer .npz and a
    safetensors file."""
    folder = tmp_path_factory.mktemp("originals")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(24, 5)), rng.integers(0, 3, size=24)
    trainer = fastbp.Trainer(fastbp.MLP([5, 7, 3], "tanh", seed=1), loss="softmax_cross_entropy", optimizer="adam",
                             lr=0.01, batch_size=8, seed=2)
    trainer.fit(X, y, epochs=2)
    trainer.model.save(folder / "model.npz")
    trainer.save(folder / "trainer.npz")
    trainer.model.save_safetensors(folder / "model.safetensors")
    files = [("model.npz", fastbp.MLP.load), ("trainer.npz", fastbp.Trainer.load),
             ("model.safetensors", fastbp.MLP.load_safetensors)]
    return [(name, (folder / name).read_bytes(), load, state_bytes(load(folder / name))) for name, load in files]


def random_damages(data: bytes, rng: np.random.Generator, count: int):
    """``count`` damaged copies of ``data``: bytes changed, cut short, or bytes appended (a third each)."""
    for i in range(count):
        kind = i % 3
        if kind == 0:  # 1 to 8 bytes changed, anywhere
            damaged = bytearray(data)
            for position in rng.integers(0, len(data), size=rng.integers(1, 9)):
                damaged[position] = (damaged[position] + int(rng.integers(1, 256))) % 256
            yield "changed", bytes(damaged)
        elif kind == 1:  # cut short at a random length (0 included)
            yield "truncated", data[:int(rng.integers(0, len(data)))]
        else:  # 1 to 64 random bytes appended
            yield "appended", data + rng.integers(0, 256, size=rng.integers(1, 65), dtype=np.uint8).tobytes()


def zip_field_damages(data: bytes):
    """The zip fields whose damage made the zip reader raise NotImplementedError or other non-zip errors: the
    "version needed to extract" and the compression method, in the central directory and the local headers,
    and the entry counts of the end record."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    end = data.rindex(b"PK\x05\x06")
    central = data.index(b"PK\x01\x02")
    for field, offset, value in [("central version needed", central + 6, 114),  # "zip file version 11.4"
                                 ("central compression method", central + 10, 99),  # AES: not supported
                                 ("central compression method", central + 10, 12),  # bzip2 with bad data
                                 ("local version needed", infos[0].header_offset + 4, 200),
                                 ("local compression method", infos[0].header_offset + 8, 14),  # lzma, bad data
                                 ("entries on this disk", end + 8, 0xFFFF),
                                 ("total entries", end + 10, 0),
                                 ("central directory size", end + 12, 0xFFFF),
                                 ("central directory offset", end + 16, 0xFFFFFF)]:
        damaged = bytearray(data)
        width = 4 if field.startswith("central directory") else 2  # the end record's size and offset: 4 bytes
        damaged[offset:offset + width] = value.to_bytes(width, "little")
        yield field, bytes(damaged)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["model.npz", "trainer.npz", "model.safetensors"])
def test_every_damaged_file_is_refused_with_checkpoint_error(originals, tmp_path, index):
    name, data, load, intact = originals[index]
    rng = np.random.default_rng(2026_12_06 + index)
    damages = list(random_damages(data, rng, N_RANDOM_DAMAGES))
    if name.endswith(".npz"):
        damages += list(zip_field_damages(data))
    path = tmp_path / name
    refused = 0
    for how, damaged in damages:
        path.write_bytes(damaged)
        try:
            loaded = load(path)
        except CheckpointError:
            refused += 1
            continue
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"{name}, {how}: {type(error).__name__}: {error}")
        if name.endswith(".npz"):  # the zip's CRC-32 guards the content: loaded means loaded intact
            assert state_bytes(loaded) == intact, f"{name}, {how}: loaded different content without an error"
        else:  # safetensors has no checksum: only the architecture is guaranteed
            assert state_bytes(loaded)[:3] == intact[:3], f"{name}, {how}"
    # The damage is real: most damaged files are refused (truncation alone is a third of them).
    assert refused > len(damages) // 2


def test_zip_version_field_gives_checkpoint_error(originals, tmp_path):
    """The case issue 29 reported: 'version needed to extract' 11.4 in the central directory."""
    _, data, _, _ = originals[0]
    damaged = dict(zip_field_damages(data))["central version needed"]
    path = tmp_path / "model.npz"
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"is truncated or corrupt; cannot read it \(NotImplementedError: "
                                              r"zip file version 11.4\)"):
        fastbp.MLP.load(path)


def test_load_safetensors_of_a_checkpoint_says_what_the_file_is(originals, tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(originals[0][1])
    with pytest.raises(CheckpointError, match=r"is not a safetensors file: it is a zip archive: an .npz file \(a "
                                              r"fastbp checkpoint: read it with fastbp.MLP.load"):
        fastbp.MLP.load_safetensors(path)
