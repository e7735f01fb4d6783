"""Run the shared core tests on MicroPython: ``micropython tests/mp/run.py [MODULE ...]``.

A small runner of our own (MicroPython has no pytest): imports each module from
``tests/shared``, calls every ``test_*`` function, prints one line per test and a final
``N passed, M failed`` line, exits 1 if anything failed. Run from the repository root;
``CITYEDGE_CORE`` may point at a directory of compiled .mpy modules instead of
``firmware/``.
"""

import gc
import os
import sys

MODULES = ("test_cbor_shared", "test_p256_shared", "test_cose_batch_shared", "test_frame_shared",
           "test_senml_shared", "test_topics_shared", "test_command_shared",
           "test_rotation_shared", "test_release_shared", "test_trust_statement_shared")


def main(argv):
    core = os.getenv("CITYEDGE_CORE") or "firmware"
    sys.path.insert(0, core)
    sys.path.insert(0, "tests")
    names = argv[1:] or MODULES
    passed = failed = 0
    for name in names:
        mod = __import__("shared." + name, None, None, ["x"])
        for attr in sorted(dir(mod)):
            if not attr.startswith("test_"):
                continue
            gc.collect()
            try:
                getattr(mod, attr)()
            except Exception as e:  # report and go on: one line per test
                failed += 1
                print("FAIL %s.%s: %s %s" % (name, attr, type(e).__name__, e))
                sys.print_exception(e)
            else:
                passed += 1
                print("ok   %s.%s" % (name, attr))
    gc.collect()
    print("heap: %d bytes free, %d allocated" % (gc.mem_free(), gc.mem_alloc()))
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


main(sys.argv)
