"""Who may register device models, and upload and read hardware reports: the one place
that says so.

1. Only ``security`` and ``admin`` register a device model and name its vendor
   (``ModelRegistration``); a model is registered once and keeps its vendor.
2. A ``vendor`` token speaks for one vendor (``ApiToken.vendor``, set when the token is
   made): it uploads reports for, and reads the reports of, the models registered to that
   vendor only. A vendor token without a vendor (made before migration 0011) has none.
3. ``security`` and ``admin`` read every report and may upload one for any registered
   model (the city's own lab runs the checker too; a newer failing report is how it
   withdraws a model's pass).
4. Every other role is refused at the route (``require_role``, 403, audited).

A vendor asking for a model that is not its own, or not registered at all, gets the same
403: whether another vendor's model exists is not a vendor's business.
"""

from __future__ import annotations

from cityedge_fleet.auth import Principal
from cityedge_fleet.models import ModelRegistration, Role

REPORT_ROLES = (Role.vendor, Role.security)  # rules 2 and 3 (admin may call everything)


def sees_every_vendor(who: Principal) -> bool:
    """Rule 3."""
    return who.role in (Role.security, Role.admin)


def vendor_scope(who: Principal) -> str | None:
    """The only vendor whose models and reports ``who`` may list; None: every vendor
    (rule 3). A vendor token without a vendor gets "", which no vendor is named."""
    return None if sees_every_vendor(who) else who.vendor or ""


def may_use(who: Principal, registration: ModelRegistration | None) -> bool:
    """May ``who`` upload reports for this model and read its reports? (rules 2 and 3;
    ``None``: the model is not registered, which nobody may upload for)."""
    if registration is None:
        return False
    if sees_every_vendor(who):
        return True
    return who.role == Role.vendor and who.vendor is not None \
        and who.vendor == registration.vendor
