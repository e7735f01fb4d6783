"""The field technician's provisioning tool: device over serial, fleet over HTTPS."""
