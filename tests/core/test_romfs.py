"""``cityedge.romfs``: images of a compiled tree, and the unix port running from one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge import romfs

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


def run_rom(image: Path, prog: str, heap: str = "256k") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.romfs", "--image", str(image),
                           "-X", "heapsize=" + heap, "-c", prog],
                          capture_output=True, text=True, timeout=60)


def test_image_files_read_back_on_micropython(tmp_path: Path, micropython: str) -> None:
    tree = tmp_path / "tree"
    (tree / "pkg" / "sub").mkdir(parents=True)
    (tree / "pkg" / "a.mpy").write_bytes(b"M" + bytes(range(256)))
    (tree / "pkg" / "sub" / "b.json").write_bytes(b'{"k": 1}')
    (tree / "pkg" / "source.py").write_text("x = 1\n")  # sources stay out of the image
    image = tmp_path / "t.romfs"
    romfs.write_image(tree, image)
    res = run_rom(image, "import os\n"
                  "print(sorted(os.listdir('/rom/pkg')), os.listdir('/rom/pkg/sub'))\n"
                  "print(open('/rom/pkg/a.mpy','rb').read() == b'M' + bytes(range(256)))\n"
                  "print(open('/rom/pkg/sub/b.json').read())\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["['a.mpy', 'sub'] ['b.json']", "True", '{"k": 1}']


@settings(max_examples=10)
@given(files=st.dictionaries(NAMES, st.binary(max_size=300), min_size=1, max_size=6))
def test_any_set_of_files_round_trips(files: dict[str, bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tree = Path(d) / "tree"
        tree.mkdir()
        for name, data in files.items():  # "f_": never a module the program imports (os)
            (tree / ("f_" + name + ".mpy")).write_bytes(data)
        image = Path(d) / "t.romfs"
        romfs.write_image(tree, image)
        prog = ("import os\nfor n in sorted(os.listdir('/rom')):\n"
                "    print(n, open('/rom/' + n, 'rb').read().hex())\n")
        res = run_rom(image, prog)
        assert res.returncode == 0, res.stderr
        want = ["f_%s.mpy %s" % (n, files[n].hex()) for n in sorted(files)]
        assert res.stdout.split("\n")[:-1] == want


def test_bytecode_runs_in_place_not_copied_into_the_heap(core_mpy: Path, tmp_path: Path,
                                                          micropython: str) -> None:
    image = tmp_path / "core.romfs"
    romfs.write_image(core_mpy, image)
    prog = ("import gc\ngc.collect()\na = gc.mem_alloc()\n"
            "import cityedge_core.p256, cityedge_core.batch, cityedge_core.cose\n"
            "gc.collect()\nprint(gc.mem_alloc() - a)\n")
    rom = run_rom(image, prog)
    files = subprocess.run([micropython, "-X", "heapsize=256k", "-c",
                            "import sys\nsys.path.insert(0, %r)\n" % str(core_mpy) + prog],
                           capture_output=True, text=True, timeout=60)
    assert rom.returncode == 0 and files.returncode == 0, rom.stderr + files.stderr
    code = sum((core_mpy / "cityedge_core" / m).stat().st_size
               for m in ("p256.mpy", "batch.mpy", "cose.mpy", "cbor.mpy"))
    # at least half the size of the .mpy files stays out of the heap
    assert int(files.stdout) - int(rom.stdout) > code // 2, (rom.stdout, files.stdout, code)


def test_program_must_be_given_with_c() -> None:
    with pytest.raises(ValueError, match="-c"):
        romfs.micropython_argv(["-X", "heapsize=32k", "script.py"], 1, 1)


def test_not_an_image_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.romfs"
    bad.write_bytes(b"not a romfs image")
    res = run_rom(bad, "print(1)")
    assert res.returncode == 2 and "not a ROMFS image" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \.mpy"):
        romfs.build_image(empty)
