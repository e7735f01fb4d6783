"""Hardware reports in the database: registered device models, uploaded reports, the
newest report of a model and profile, and the enrollment gate that reads it.

The gate's rule (``hardware_gate``), when ``Settings.hw_profile_for(site)`` names a
profile for the device's site: the device enrolls only if the newest report uploaded for
its model (``Device.model``) and that profile meets it. "Newest" is the highest row id,
the order the fleet stored them in: a report's own ``generated_at`` is the vendor's clock
and does not decide, so a newer failing report withdraws an older passing one even if it
claims an older time. No report at all refuses as well. With no profile (the default) the
gate is off and enrollment does not look at reports.

Every function works in the caller's transaction; the caller commits and audits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, select

from cityedge_fleet.config import Settings
from cityedge_fleet.hw_report_check import AcceptedReport
from cityedge_fleet.models import Device, HwReport, ModelRegistration


class ModelTaken(ValueError):
    """The model is registered to another vendor already (a model keeps its vendor)."""


def register_model(session: Session, *, name: str, vendor: str, registered_by: str
                   ) -> tuple[ModelRegistration, bool]:
    """Register ``name`` to ``vendor``; returns the row and whether it is new. The same
    registration again changes nothing; another vendor raises ``ModelTaken``."""
    row = session.get(ModelRegistration, name)
    if row is not None:
        if row.vendor != vendor:
            raise ModelTaken("device model %s is registered to vendor %s already"
                             % (name, row.vendor))
        return row, False
    row = ModelRegistration(name=name, vendor=vendor, registered_by=registered_by)
    session.add(row)
    session.flush()
    return row, True


def list_models(session: Session, *, vendor: str | None) -> Sequence[ModelRegistration]:
    """Every registered model, or ``vendor``'s."""
    query = select(ModelRegistration).order_by(col(ModelRegistration.name))
    if vendor is not None:
        query = query.where(ModelRegistration.vendor == vendor)
    return session.exec(query).all()


def add_report(session: Session, *, registration: ModelRegistration,
               accepted: AcceptedReport, data: bytes, sha256: str, uploaded_by: str
               ) -> HwReport:
    """Store an accepted report (``hw_report_check``) with its bytes, unchanged."""
    report = accepted.report
    row = HwReport(model=registration.name, vendor=registration.vendor,
                   profile=report.profile.name, met=accepted.met, counts=accepted.counts,
                   catalogue_version=report.catalogue.version,
                   tool_version=report.tool.version, generated_at=accepted.generated_at,
                   sha256=sha256, size=len(data), uploaded_by=uploaded_by,
                   report=data.decode("utf-8"))
    session.add(row)
    session.flush()
    return row


def list_reports(session: Session, *, vendor: str | None, model: str | None,
                 profile: str | None, after: int | None, limit: int) -> Sequence[HwReport]:
    """Reports, newest first (``after``: ids below it), limited to ``vendor``'s if given."""
    query = select(HwReport).order_by(col(HwReport.id).desc()).limit(limit)
    if vendor is not None:
        query = query.where(HwReport.vendor == vendor)
    if model is not None:
        query = query.where(HwReport.model == model)
    if profile is not None:
        query = query.where(HwReport.profile == profile)
    if after is not None:
        query = query.where(col(HwReport.id) < after)
    return session.exec(query).all()


def latest_report(session: Session, *, model: str, profile: str) -> HwReport | None:
    """The newest report of ``model`` for ``profile`` (the highest id), or None."""
    return session.exec(select(HwReport).where(HwReport.model == model,
                                               HwReport.profile == profile)
                        .order_by(col(HwReport.id).desc()).limit(1)).first()


@dataclass(frozen=True)
class GateRefusal:
    code: str  # a stable name of the reason (the audit row's ``code``)
    why: str  # what the technician and the audit log are told


def hardware_gate(session: Session, settings: Settings, device: Device
                  ) -> tuple[HwReport | None, GateRefusal | None]:
    """The rule of the module docstring: (the report that lets ``device`` in, or None
    when the gate is off) or a refusal."""
    profile = settings.hw_profile_for(device.site)
    if profile is None:
        return None, None
    report = latest_report(session, model=device.model, profile=profile)
    if report is None:
        return None, GateRefusal("hw-report-missing", (
            "device model %s has no hardware report for profile %s, which this fleet "
            "requires before enrollment: the model's vendor uploads one (`cityedge hw "
            "upload`)" % (device.model, profile)))
    if not report.met:
        return None, GateRefusal("hw-report-not-met", (
            "the newest hardware report for device model %s and profile %s (report %s, "
            "uploaded %s by %s) does not meet the profile: the vendor fixes the failures "
            "and uploads a passing report" % (device.model, profile, report.id,
                                              report.uploaded_at.isoformat(timespec="seconds"),
                                              report.uploaded_by)))
    return report, None
