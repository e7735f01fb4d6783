"""The hardware checker's errors: a bad file or an unreachable tool, each with what to do.

``CatalogueError`` is a catalogue or profile that does not hold (it names the entry and the
field); ``EfuseDataError`` is an eFuse capture that is not what ``espefuse summary --format
json`` writes; ``NetDataError`` is a saved network scan that does not hold;
``ScanRefused`` is a network scan of an address the vendor may not control; ``CollectError``
is ``espefuse`` / ``esptool`` failing to read a chip; ``EvidenceError`` is a vendor
declaration or its SBOM that cannot be read as one; ``CheckInputError`` is a ``cityedge hw
check`` run given inputs that do not fit together. All are
``cityedge_host.errors.UserError``: the ``cityedge`` command prints them in one line.
"""

from __future__ import annotations

from cityedge_host.errors import UserError


class CatalogueError(UserError):
    hint = "fix the named entry of the catalogue or profile file and run the command again"


class EfuseDataError(UserError):
    hint = ("pass the file `espefuse summary --format json --file F` wrote (esptool 5.x), "
            "unchanged")


class NetDataError(UserError):
    hint = "pass a file `cityedge hw net --save-scan F` wrote, unchanged"


class ScanRefused(UserError):
    hint = ("scan only a device you control: a loopback, private (10/8, 172.16/12, "
            "192.168/16, fc00::/7) or link-local address; --allow-public for any other, "
            "with the network owner's permission")


class CollectError(UserError):
    hint = ("check the USB cable and the port (`cityedge provision ports` lists them), hold "
            "the board's BOOT button while it resets if it does not answer")


class EvidenceError(UserError):
    hint = ("fix the named field of the declaration (docs/VENDOR_GUIDE.md, 'The evidence "
            "file', shows the format; hardware/cityedge_hardware/examples/ has a complete one)")


class CheckInputError(UserError):
    hint = "see `cityedge hw check --help`; docs/VENDOR_GUIDE.md says which inputs each probe needs"
